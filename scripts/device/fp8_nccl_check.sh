#!/usr/bin/env bash
# FP8 (tensorwise current scaling) over NCCL on 2 GPUs against one GPU, 30 steps, same seed:
#   TP=2, TP=2 with sequence parallelism and DP=2 with the distributed optimizer. With
#   MBRIDGE_A (an earlier build), one GPU's run again with that build: two micro-batches per
#   step, so the weights the step quantizes once and holds meet the earlier build's
#   quantizing at every GEMM.
# FP8 runs at TP=2 do not equal one GPU's bit for bit, as in Transformer Engine: each rank
# quantizes its shard of a weight and of a row-parallel layer's input with its own scale. The
# bf16 runs of the same layouts show the size of the differences that are not FP8's.
# Run on the GPU machine (2 GPUs) from the repository root, after
#   source .devbuild/bin/env.sh .devbuild/bin/mbridge
set -uo pipefail
M=${MBRIDGE:-.devbuild/bin/mbridge}
O=${OUT:-/tmp/fp8_nccl}
mkdir -p "$O"
# tiny_llama widened so that every FP8 GEMM dimension (per TP rank) is a multiple of 16.
common=(--recipe tiny_llama --device cuda train.train_iters=30 validation.eval_iters=0
  logger.log_interval=1 model.hidden_size=256 model.ffn_hidden_size=768
  model.num_attention_heads=4 model.num_query_groups=2 model.seq_length=256
  train.micro_batch_size=2 train.global_batch_size=4)
fp8=(mixed_precision=bf16_with_fp8_current_scaling_mixed mixed_precision.fp8_param_gather=false
  mixed_precision.fp8_param=false mixed_precision.first_last_layers_bf16=false)
bf16=(mixed_precision=bf16_mixed)
two=(--nproc-per-node 2)
tp=(model.tensor_model_parallel_size=2)
port=29900
run() {
  local name=$1; shift
  port=$((port + 10))
  local t0=$SECONDS
  timeout "${RUN_LIMIT:-60}" "${BIN_OF_RUN:-$M}" pretrain "${common[@]}" --master-port "$port" "$@" >"$O/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s"
}
for p in fp8 bf16; do
  declare -n prec=$p
  run "${p}_gpu1" "${prec[@]}"
  run "${p}_tp2" "${two[@]}" "${tp[@]}" "${prec[@]}"
  run "${p}_tp2_sp" "${two[@]}" "${tp[@]}" model.sequence_parallel=true "${prec[@]}"
  run "${p}_dp2" "${two[@]}" ddp.use_distributed_optimizer=true "${prec[@]}"
done
[ -n "${MBRIDGE_A:-}" ] && BIN_OF_RUN=$MBRIDGE_A run fp8_gpu1_build_a "${fp8[@]}"
losses() { grep -o 'lm loss: [0-9.E+-]*' "$O/$1.log" | awk '{print $3}'; }
# Relative differences over the steps whose reference loss is above 1 (the tiny model
# memorizes the mock data: near zero, relative differences mean nothing), and the largest
# absolute difference over all steps.
compare() {
  paste <(losses "$1") <(losses "$2") | awk -v a="$1" -v b="$2" \
    '{d=($1-$2)/$1; if(d<0)d=-d; if($1>1){if(d>m)m=d; k++}; e=$1-$2; if(e<0)e=-e; if(e>x)x=e; l1=$1; l2=$2}
     END{printf "%-14s vs %-14s max rel %.2e over the %d steps with loss > 1, max abs %.2e over %d (last %s / %s)\n", b, a, m, k, x, NR, l1, l2}'
}
echo "losses (first 12 steps):"
for n in fp8_gpu1 fp8_tp2 fp8_tp2_sp bf16_gpu1 bf16_tp2; do
  printf '%-12s %s\n' "$n" "$(losses "$n" | head -12 | xargs printf '%.4f ')"
done
for p in fp8 bf16; do
  for n in tp2 tp2_sp dp2; do compare "${p}_gpu1" "${p}_$n"; done
done
[ -n "${MBRIDGE_A:-}" ] && compare fp8_gpu1_build_a fp8_gpu1
compare bf16_gpu1 fp8_gpu1
for f in "$O"/*.log; do grep -m1 -i "error" "$f" | sed "s|^|$(basename "$f"): |"; done
