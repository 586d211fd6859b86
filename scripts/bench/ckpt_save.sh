#!/usr/bin/env bash
# Checkpoint save bandwidth of a ~1.24B-parameter model vs `dd` write bandwidth on the same
# disk, plus the training-loop stall of an asynchronous save (issue 7's performance targets:
# save >= 70% of dd; async stall < 5% of a save).
#
# Usage: scripts/bench/ckpt_save.sh [dir (default: a temp dir under ./target)] [bf16|f32] [layers]
# Env: CARGO_LOCK=<file> serialises the build with other cargo runs (flock) on a shared
# CARGO_TARGET_DIR. PROFILE=release to build the example with --release (default: the dev profile, whose
# dependencies are optimised). MBRIDGE_NO_DIRECT_IO=1 measures buffered writes instead of
# O_DIRECT. Needs ~3x the checkpoint size free (2.5 GB per bf16 copy).
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-$(mktemp -d "${CARGO_TARGET_DIR:-target}/ckpt-bench.XXXXXX")}
DTYPE=${2:-bf16}
LAYERS=${3:-16}
mkdir -p "$DIR"
trap 'rm -rf "$DIR"/iter_* "$DIR"/dd.bin "$DIR"/latest_*' EXIT
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), disk $(df -h "$DIR" | awk 'NR==2 {print $1, $2}')"
FLAGS=()
[[ "${PROFILE:-dev}" == release ]] && FLAGS=(--release)
${CARGO_LOCK:+flock "$CARGO_LOCK"} cargo build -q "${FLAGS[@]}" --example ckpt_save_bench
BIN=${CARGO_TARGET_DIR:-target}/$([[ "${PROFILE:-dev}" == release ]] && echo release || echo debug)/examples/ckpt_save_bench
# Bytes of the model (Llama-3.2-1B shapes, see the example) for dd to write the same amount.
PARAMS=$(( 128256 * 2048 + LAYERS * (3072 * 2048 + 2048 * 2048 + 16384 * 2048 + 2048 * 8192 + 2 * 2048) + 2048 ))
MB=$(( PARAMS * $([[ "$DTYPE" == f32 ]] && echo 4 || echo 2) / 1048576 ))
# dd before and after the save (the first big writer on a box may pay page-cache reclaim):
# $MB MiB of zeros in 1 MiB blocks, fsynced once at the end like each checkpoint file; then
# the same with oflag=direct in 8 MiB blocks, as the save writes large files.
dd_mbps() {
  local line
  if [[ "${1:-}" == direct ]]; then
    line=$(dd if=/dev/zero of="$DIR/dd.bin" bs=8M count="$((MB / 8))" oflag=direct conv=fsync 2>&1 | tail -1)
  else
    line=$(dd if=/dev/zero of="$DIR/dd.bin" bs=1M count="$MB" conv=fsync 2>&1 | tail -1)
  fi
  rm -f "$DIR/dd.bin"
  echo "dd: $line" >&2
  awk -v line="$line" 'BEGIN { n = split(line, f, ","); split(f[1], b, " "); split(f[n-1], s, " "); printf "%.0f", b[1] / 1e6 / s[1] }'
}
DD1=$(dd_mbps)
DDD1=$(dd_mbps direct)
OUT=$("$BIN" "$DIR" "$DTYPE" "$LAYERS")
echo "$OUT"
SAVE=$(sed -n 's/.*sync_save_MBps=\([0-9]*\).*/\1/p' <<<"$OUT")
rm -rf "$DIR"/iter_*
DD2=$(dd_mbps)
DDD2=$(dd_mbps direct)
echo "dd_MBps_before=$DD1 dd_MBps_after=$DD2 dd_direct_MBps_before=$DDD1 dd_direct_MBps_after=$DDD2 save_MBps=$SAVE save_vs_dd_mean=$(awk -v a="$SAVE" -v b="$DD1" -v c="$DD2" 'BEGIN { printf "%.0f%%", 200 * a / (b + c) }') save_vs_dd_direct_mean=$(awk -v a="$SAVE" -v b="$DDD1" -v c="$DDD2" 'BEGIN { printf "%.0f%%", 200 * a / (b + c) }')"
