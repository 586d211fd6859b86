#!/usr/bin/env bash
# A/B of two mbridge builds on one GPU, in ONE device call, runs alternating (A B A B ...) so
# that neither build always meets the hotter GPU: B is the carried build (.devbuild/gz, see
# scripts/device/build.sh), A an earlier one gzipped at A_GZ (e.g. the previous commit's
# .devbuild/gz/mbridge.gz copied to .devbuild/base/mbridge.gz; carry both folders).
# Usage on the device: A_GZ=.devbuild/base/mbridge.gz ROUNDS=2 bash scripts/bench/gpu_ab.sh \
#   --recipe llama32_1b model.seq_length=4096 train.global_batch_size=8 ...
# GPU picks the device (default 0; two A/Bs can run at once on two GPUs), TAG prefixes each
# result line. The arguments go to `mbridge pretrain` after fixed logging/no-checkpoint settings. Prints
# each run's last log line (ms per iteration, TFLOP/s, memory, loss) and its mean SM clock and power.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/bench/gpu_common.sh
gpu_setup
A_GZ=${A_GZ:-.devbuild/base/mbridge.gz}
[ -f "$A_GZ" ] || { echo "error: $A_GZ (build A) was not carried" >&2; exit 2; }
BIN_A=.devbuild/bin/mbridge-a-${GPU:-0}
gunzip -c "$A_GZ" > "$BIN_A" && chmod +x "$BIN_A"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
run() {
  local name=$1 bin=$2; shift 2
  nvidia-smi -i "${GPU:-0}" --query-gpu=clocks.sm,power.draw --format=csv,noheader,nounits -lms 500 > "/tmp/ab-${GPU:-0}-$name.clk" &
  local clk=$!
  local line
  line=$(timeout "${RUN_LIMIT:-240}" "$bin" pretrain --device "cuda:${GPU:-0}" logger.log_throughput=true \
    validation.eval_iters=0 '~checkpoint.save' '~checkpoint.load' '~logger.tensorboard_dir' "$@" 2>&1 \
    | grep -E "iteration +[0-9]+/|rror" | tail -1)
  kill "$clk" 2>/dev/null; wait "$clk" 2>/dev/null
  local load
  load=$(awk -F', ' '$2 > 300 {n++; c += $1; p += $2} END {if (n) printf "%.0f MHz %.0f W", c/n, p/n}' "/tmp/ab-${GPU:-0}-$name.clk")
  echo "${TAG:-}$name [$load]: $(echo "$line" | grep -oE "elapsed time per iteration \(ms\): [0-9.]*|TFLOP/s/GPU\): [0-9.]*|mem-max-allocated-gigabytes: [0-9.]*|lm loss: [0-9.E+-]*|.*rror.*" | tr '\n' ' ')"
}
for r in $(seq 1 "${ROUNDS:-2}"); do
  run "A$r" "$BIN_A" "$@"
  run "B$r" "$BIN" "$@"
done
