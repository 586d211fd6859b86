#!/usr/bin/env bash
# Pipeline parallelism over NCCL versus the CPU backend: tiny_llama with 8 layers, 8
# micro-batches, 20 steps, f32. On 2 GPUs: PP=2 and PP=2 × VP=2; on 4 GPUs also PP=4,
# PP=4 × VP=2, TP=2 × PP=2 and PP=2 × DP=2 with the distributed optimizer. PP ≥ 3 and the
# interleaved schedule only finish when the neighbour exchanges are grouped (see
# src/parallel/pipeline/plan.rs). Run on the GPU machine after
#   source .devbuild/bin/env.sh .devbuild/bin/mbridge
set -uo pipefail
M=${MBRIDGE:-.devbuild/bin/mbridge}
O=${OUT:-/tmp/pp_nccl}
mkdir -p "$O"
common=(--recipe tiny_llama train.train_iters=20 validation.eval_iters=0 logger.log_interval=1
  model.num_layers=8 train.global_batch_size=8 train.micro_batch_size=1)
port=29650
run() {
  local name=$1; shift
  port=$((port + 10))
  timeout "${RUN_LIMIT:-90}" "$M" pretrain "${common[@]}" --master-port "$port" "$@" >"$O/$name.log" 2>&1
  echo "$name: exit $?"
}
losses() { grep -o 'lm loss: [0-9.E+-]*' "$O/$1.log" | awk '{print $3}'; }
compare() {
  paste <(losses cpu_f32) <(losses "$1") | awk -v n="$1" '{d=($1-$2)/$1; if(d<0)d=-d; if(d>m)m=d} END{printf "%s vs cpu_f32: max rel %.2e over %d steps\n", n, m, NR}'
}
pp() { echo model.pipeline_model_parallel_size="$1"; }
vp() { echo model.virtual_pipeline_model_parallel_size="$1"; }
run cpu_f32 --device cpu
cases=("gpu2_pp2|2|$(pp 2)" "gpu2_pp2_vp2|2|$(pp 2) $(vp 2)")
if [ "$(nvidia-smi -L | wc -l)" -ge 4 ]; then
  cases+=("gpu4_pp4|4|$(pp 4)" "gpu4_pp4_vp2|4|$(pp 4) $(vp 2)"
    "gpu4_tp2_pp2|4|model.tensor_model_parallel_size=2 $(pp 2)"
    "gpu4_pp2_dp2_zero1|4|$(pp 2) ddp.use_distributed_optimizer=true")
fi
for c in "${cases[@]}"; do
  IFS='|' read -r name n overrides <<<"$c"
  # shellcheck disable=SC2086  # the overrides are separate words
  run "$name" --device cuda --nproc-per-node "$n" $overrides
  compare "$name"
done
for f in "$O"/gpu*.log; do grep -m1 -i "error" "$f" | sed "s|^|$(basename "$f"): |"; done
