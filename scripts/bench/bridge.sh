#!/usr/bin/env bash
# import-hf / export-hf speed on random Llama-shaped models vs `cp` of the same files on the
# same disk, and peak RSS (issue 6: >= 70% of cp; 8B import in < 4 GiB RSS).
#
# Usage: scripts/bench/bridge.sh [sizes (default: "1b 3b"; 8b needs ~35 GB free)] [dir]
# Env: CARGO_LOCK=<file> serialises the build with other cargo runs (flock) on a shared
# CARGO_TARGET_DIR. PROFILE=release builds with --release (default: the dev profile, whose dependencies
# are optimised). Every generated model and output is deleted before the next size.
# `cp` is followed by `sync` of the copied files, since import and export fsync every file.
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZES=${1:-"1b 3b"}
DIR=${2:-$(mktemp -d "${CARGO_TARGET_DIR:-target}/bridge-bench.XXXXXX")}
mkdir -p "$DIR"
trap 'rm -rf "$DIR"/hf "$DIR"/ck "$DIR"/out "$DIR"/cp' EXIT
FLAGS=()
[[ "${PROFILE:-dev}" == release ]] && FLAGS=(--release)
${CARGO_LOCK:+flock "$CARGO_LOCK"} cargo build -q "${FLAGS[@]}" --bin mbridge --example gen_hf_model
T=${CARGO_TARGET_DIR:-target}/$([[ "${PROFILE:-dev}" == release ]] && echo release || echo debug)
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), disk $(df -h "$DIR" | awk 'NR==2 {print $1, $2, $4 " free"}')"

now() { date +%s.%N; }
# Seconds to copy directory $1 to $DIR/cp and fsync the copies.
cp_secs() {
  rm -rf "$DIR/cp"
  local t0; t0=$(now)
  cp -r "$1" "$DIR/cp"
  sync "$DIR"/cp/*
  awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'
  rm -rf "$DIR/cp"
}
# Runs "$@" under /usr/bin/time; prints "seconds max_rss_kib".
timed() {
  /usr/bin/time -f "%e %M" -o "$DIR/time.txt" "$@" >/dev/null
  cat "$DIR/time.txt"
}
mbps() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.0f", b / s / 1e6 }'; }

# Disk peak: twice the model (the source and one copy or output at a time).
for size in $SIZES; do
  rm -rf "$DIR"/hf "$DIR"/ck "$DIR"/out
  "$T/examples/gen_hf_model" "$DIR/hf" "$size"
  sync
  bytes=$(cat "$DIR"/hf/*.safetensors | wc -c)
  cps=$(cp_secs "$DIR/hf")
  read -r isecs irss < <(timed "$T/mbridge" import-hf "$DIR/hf" "$DIR/ck")
  rm -rf "$DIR/hf"
  cp_mbps=$(mbps "$bytes" "$cps")
  imp_mbps=$(mbps "$bytes" "$isecs")
  echo "size=$size weights_bytes=$bytes cp_s=$cps cp_MBps=$cp_mbps import_s=$isecs import_MBps=$imp_mbps import_vs_cp=$(awk -v a="$imp_mbps" -v b="$cp_mbps" 'BEGIN { printf "%.0f%%", 100 * a / b }') import_max_rss_MiB=$((irss / 1024))"
  cbytes=$(cat "$DIR"/ck/iter_0000000/model/*.safetensors | wc -c)
  cps=$(cp_secs "$DIR/ck/iter_0000000/model")
  read -r esecs erss < <(timed "$T/mbridge" export-hf "$DIR/ck" "$DIR/out")
  cp_mbps=$(mbps "$cbytes" "$cps")
  exp_mbps=$(mbps "$cbytes" "$esecs")
  echo "size=$size ckpt_bytes=$cbytes cp_s=$cps cp_MBps=$cp_mbps export_s=$esecs export_MBps=$exp_mbps export_vs_cp=$(awk -v a="$exp_mbps" -v b="$cp_mbps" 'BEGIN { printf "%.0f%%", 100 * a / b }') export_max_rss_MiB=$((erss / 1024))"
  rm -rf "$DIR"/ck "$DIR"/out
done
