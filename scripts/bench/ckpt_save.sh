#!/usr/bin/env bash
# Checkpoint save bandwidth of a ~1.24B-parameter model vs `dd` write bandwidth on the same
# disk, plus the training-loop stall of an asynchronous save (issue 7's performance targets:
# save >= 70% of dd; async stall < 5% of a save).
#
# Usage: scripts/bench/ckpt_save.sh [dir (default: a temp dir under ./target)] [bf16|f32] [layers]
# Env: PROFILE=release to build the example with --release (default: the dev profile, whose
# dependencies are optimised). Needs ~3x the checkpoint size free (2.5 GB per bf16 copy).
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
cargo build -q "${FLAGS[@]}" --example ckpt_save_bench
BIN=${CARGO_TARGET_DIR:-target}/$([[ "${PROFILE:-dev}" == release ]] && echo release || echo debug)/examples/ckpt_save_bench
OUT=$("$BIN" "$DIR" "$DTYPE" "$LAYERS")
echo "$OUT"
BYTES=$(sed -n 's/.* bytes=\([0-9]*\).*/\1/p' <<<"$OUT")
SAVE=$(sed -n 's/.*sync_save_MBps=\([0-9]*\).*/\1/p' <<<"$OUT")
rm -rf "$DIR"/iter_*
# dd: the same number of bytes, fsynced once at the end, like the checkpoint's files.
MB=$(( BYTES / 1048576 ))
DD=$(dd if=/dev/zero of="$DIR/dd.bin" bs=1M count="$MB" conv=fsync 2>&1 | tail -1)
echo "dd: $DD"
DDMBPS=$(awk -v mb="$MB" -v line="$DD" 'BEGIN { n = split(line, f, ","); split(f[n-1], s, " "); printf "%.0f", mb * 1.048576 / s[1] }')
echo "dd_MBps=$DDMBPS save_MBps=$SAVE save_vs_dd=$(awk -v a="$SAVE" -v b="$DDMBPS" 'BEGIN { printf "%.0f%%", 100 * a / b }')"
