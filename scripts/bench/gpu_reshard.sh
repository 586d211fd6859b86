#!/usr/bin/env bash
# Issue #12's resharding run, on the GPUs at hand: Llama-3.2-1B shape, bf16_mixed, a checkpoint
# saved by one TP×PP layout resumes in another and continues the loss curve of the
# uninterrupted run. Default: saved with TP=2×PP=2 at iteration 5, resumed with TP=1×PP=4
# (4 GPUs; the 8-GPU run of the issue is TP=4×PP=2 → TP=2×PP=4: FROM=4x2 TO=2x4).
# Build first with scripts/device/build.sh, then run through the device tool with carry
# [".devbuild/gz"]:   bash scripts/bench/gpu_reshard.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/bench/gpu_common.sh
gpu_setup
export NCCL_NVLS_ENABLE=0
FROM=${FROM:-2x2}; TO=${TO:-1x4}; ITERS=${ITERS:-10}; HALF=$((ITERS / 2))
O=${RESHARD_DIR:-/tmp/reshard}; rm -rf "$O/ckpt"; mkdir -p "$O"
common=(pretrain --recipe "${RECIPE:-llama32_1b}" --device cuda model.seq_length="${SEQ:-2048}"
  train.micro_batch_size=1 train.global_batch_size=8 train.train_iters="$ITERS"
  logger.log_interval=1 validation.eval_iters=0 scheduler.lr_warmup_iters=2
  '~logger.tensorboard_dir' '~checkpoint.load' '~checkpoint.save')
layout() {
  IFS=x read -r tp pp <<<"$1"
  echo "--nproc-per-node $((tp * pp)) model.tensor_model_parallel_size=$tp model.pipeline_model_parallel_size=$pp"
}
losses() { grep -o 'iteration *[0-9]*/.*lm loss: [0-9.E+-]*' "$1" | awk '{print $2+0, $NF}'; }
port=29900
run() {
  local name=$1; shift
  port=$((port + 10))
  # shellcheck disable=SC2046  # layout() yields separate words
  timeout 240 "$BIN" "${common[@]}" --master-port "$port" "$@" >"$O/$name.log" 2>&1
  echo "$name: exit $?"
}
# shellcheck disable=SC2046
run straight $(layout "$FROM")
# shellcheck disable=SC2046
run first_half $(layout "$FROM") "++checkpoint.save=$O/ckpt" "++train.exit_interval=$HALF"
# shellcheck disable=SC2046
run resumed $(layout "$TO") "++checkpoint.save=$O/ckpt" "++checkpoint.load=$O/ckpt"
grep -h "successfully saved\|loading checkpoint\|loaded checkpoint" "$O"/*.log | head -4
echo "iteration | TP×PP $FROM straight | $FROM then $TO after $HALF | rel diff"
awk 'NR==FNR {want[$1]=$2; next} ($1 in want) {d=($2-want[$1])/want[$1]; if(d<0)d=-d;
  printf "%9d | %s | %s | %.2e\n", $1, want[$1], $2, d}' <(losses "$O/straight.log") \
  <(cat <(losses "$O/first_half.log") <(losses "$O/resumed.log"))
for f in "$O"/*.log; do grep -m1 -i "error" "$f" | sed "s|^|$(basename "$f"): |"; done
