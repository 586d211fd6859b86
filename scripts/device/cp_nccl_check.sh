#!/usr/bin/env bash
# Context parallelism over NCCL versus the CPU backend, tiny_llama, 20 steps.
#   f32 (composite attention): CP=2 on 2 GPUs; on 4 GPUs also CP=4, CP=2 × TP=2 with sequence
#   parallelism, CP=2 × DP=2 with the distributed optimizer and CP=2 × PP=2 — each against
#   the one-process CPU curve.
#   bf16 with head_dim 64 (the fused flash kernel, whose query chunks sit at the end of the
#   gathered keys): CP=2 against one GPU at CP=1, and both against the CPU in f32.
# Run on the GPU machine after   source .devbuild/bin/env.sh .devbuild/bin/mbridge
set -uo pipefail
M=${MBRIDGE:-.devbuild/bin/mbridge}
O=${OUT:-/tmp/cp_nccl}
mkdir -p "$O"
common=(--recipe tiny_llama train.train_iters=20 validation.eval_iters=0 logger.log_interval=1
  train.global_batch_size=8 train.micro_batch_size=2)
# head_dim 64 and a longer sequence, so bf16 attention runs in the fused kernel.
wide=(model.hidden_size=256 model.ffn_hidden_size=688 model.num_attention_heads=4
  model.num_query_groups=2 model.seq_length=256)
port=29750
run() {
  local name=$1; shift
  port=$((port + 10))
  timeout "${RUN_LIMIT:-120}" "$M" pretrain "${common[@]}" --master-port "$port" "$@" >"$O/$name.log" 2>&1
  echo "$name: exit $?"
}
losses() { grep -o 'lm loss: [0-9.E+-]*' "$O/$1.log" | awk '{print $3}'; }
compare() {
  paste <(losses "$1") <(losses "$2") | awk -v a="$1" -v b="$2" '{d=($1-$2)/$1; if(d<0)d=-d; if(d>m)m=d} END{printf "%s vs %s: max rel %.2e over %d steps\n", b, a, m, NR}'
}
cp() { echo model.context_parallel_size="$1"; }
run cpu_f32 --device cpu
cases=("gpu2_cp2|2|$(cp 2)")
if [ "$(nvidia-smi -L | wc -l)" -ge 4 ]; then
  cases+=("gpu4_cp4|4|$(cp 4)"
    "gpu4_cp2_tp2_sp|4|$(cp 2) model.tensor_model_parallel_size=2 model.sequence_parallel=true"
    "gpu4_cp2_dp2_zero1|4|$(cp 2) ddp.use_distributed_optimizer=true"
    "gpu4_cp2_pp2|4|$(cp 2) model.pipeline_model_parallel_size=2")
fi
for c in "${cases[@]}"; do
  IFS='|' read -r name n overrides <<<"$c"
  # shellcheck disable=SC2086  # the overrides are separate words
  run "$name" --device cuda --nproc-per-node "$n" $overrides
  compare cpu_f32 "$name"
done
bf16=(mixed_precision='"bf16_mixed"')
run wide_cpu_f32 --device cpu "${wide[@]}"
run wide_gpu1_bf16 --device cuda "${wide[@]}" "${bf16[@]}"
run wide_gpu2_cp2_bf16 --device cuda --nproc-per-node 2 "${wide[@]}" "${bf16[@]}" "$(cp 2)"
compare wide_gpu1_bf16 wide_gpu2_cp2_bf16
compare wide_cpu_f32 wide_gpu1_bf16
compare wide_cpu_f32 wide_gpu2_cp2_bf16
for f in "$O"/*.log; do grep -m1 -i "error" "$f" | sed "s|^|$(basename "$f"): |"; done
