#!/usr/bin/env bash
# Pipeline parallelism over NCCL versus the CPU backend: tiny_llama, 20 steps, f32. PP=2 on 2
# GPUs, and TP=2 × PP=2 on 4 GPUs when 4 are visible. Run on the GPU machine after
#   source .devbuild/bin/env.sh .devbuild/bin/mbridge
set -uo pipefail
M=${MBRIDGE:-.devbuild/bin/mbridge}
O=${OUT:-/tmp/pp_nccl}
mkdir -p "$O"
common=(--recipe tiny_llama train.train_iters=20 validation.eval_iters=0 logger.log_interval=1)
run() {
  local name=$1; shift
  timeout "${RUN_LIMIT:-60}" "$M" pretrain "${common[@]}" "$@" >"$O/$name.log" 2>&1
  echo "$name: exit $?"
}
losses() { grep -o 'lm loss: [0-9.E+-]*' "$O/$1.log" | awk '{print $3}'; }
compare() {
  paste <(losses cpu_f32) <(losses "$1") | awk -v n="$1" '{d=($1-$2)/$1; if(d<0)d=-d; if(d>m)m=d} END{printf "%s vs cpu_f32: max rel %.2e over %d steps\n", n, m, NR}'
}
run cpu_f32 --device cpu
run gpu2_pp2 --device cuda --nproc-per-node 2 --master-port 29651 model.pipeline_model_parallel_size=2
compare gpu2_pp2
if [ "$(nvidia-smi -L | wc -l)" -ge 4 ]; then
  run gpu4_tp2_pp2 --device cuda --nproc-per-node 4 --master-port 29661 \
    model.tensor_model_parallel_size=2 model.pipeline_model_parallel_size=2
  compare gpu4_tp2_pp2
  run gpu4_pp2_dp2_zero1 --device cuda --nproc-per-node 4 --master-port 29671 \
    model.pipeline_model_parallel_size=2 ddp.use_distributed_optimizer=true
  compare gpu4_pp2_dp2_zero1
fi
for f in "$O"/gpu*.log; do grep -m1 -i "error" "$f" | sed "s|^|$(basename "$f"): |"; done
