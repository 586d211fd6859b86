#!/usr/bin/env bash
# DP/TP over NCCL versus one GPU versus the CPU backend: tiny_llama, 20 steps, same seed.
# Run on the GPU machine (2 GPUs) from the repository root, after
#   source .devbuild/bin/env.sh .devbuild/bin/mbridge
# Writes one log per run to ${OUT:-/tmp/dp_nccl} and prints the lm-loss columns side by side.
set -uo pipefail
M=${MBRIDGE:-.devbuild/bin/mbridge}
O=${OUT:-/tmp/dp_nccl}
mkdir -p "$O"
common=(--recipe tiny_llama train.train_iters=20 validation.eval_iters=0 logger.log_interval=1)
run() {
  local name=$1; shift
  local t0=$SECONDS
  # A hung collective must not eat the whole call: each run gets ${RUN_LIMIT:-45} s.
  timeout "${RUN_LIMIT:-45}" "$M" pretrain "${common[@]}" "$@" >"$O/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s"
}
run cpu_f32 --device cpu
run gpu1_f32 --device cuda
run gpu2_dp_zero1_f32 --device cuda --nproc-per-node 2 --master-port 29611 \
  ddp.use_distributed_optimizer=true ddp.overlap_grad_reduce=true ddp.overlap_param_gather=true \
  ++ddp.bucket_size=6000
run gpu2_dp_f32 --device cuda --nproc-per-node 2 --master-port 29621 \
  ddp.overlap_grad_reduce=true ++ddp.bucket_size=6000
run gpu2_tp_f32 --device cuda --nproc-per-node 2 --master-port 29631 model.tensor_model_parallel_size=2
run gpu1_bf16 --device cuda mixed_precision=bf16_mixed
run gpu2_dp_zero1_bf16 --device cuda --nproc-per-node 2 --master-port 29641 \
  mixed_precision=bf16_mixed ddp.use_distributed_optimizer=true
losses() { grep -o 'lm loss: [0-9.E+-]*' "$O/$1.log" | awk '{print $3}'; }
names=(cpu_f32 gpu1_f32 gpu2_dp_zero1_f32 gpu2_dp_f32 gpu2_tp_f32 gpu1_bf16 gpu2_dp_zero1_bf16)
for n in "${names[@]}"; do losses "$n" >"$O/$n.loss"; done
(cd "$O" && paste "${names[@]/%/.loss}") | awk -v h="${names[*]}" 'BEGIN{print "it " h} {print NR, $0}'
# Largest relative difference of each run from the CPU f32 curve (bf16 runs: from gpu1_bf16).
for n in gpu1_f32 gpu2_dp_zero1_f32 gpu2_dp_f32 gpu2_tp_f32; do
  paste "$O/cpu_f32.loss" "$O/$n.loss" | awk -v n="$n" '{d=($1-$2)/$1; if(d<0)d=-d; if(d>m)m=d} END{printf "%s vs cpu_f32: max rel %.2e over %d steps\n", n, m, NR}'
done
paste "$O/gpu1_bf16.loss" "$O/gpu2_dp_zero1_bf16.loss" | awk '{d=($1-$2)/$1; if(d<0)d=-d; if(d>m)m=d} END{printf "gpu2_dp_zero1_bf16 vs gpu1_bf16: max rel %.2e over %d steps\n", m, NR}'
grep -h "distributed optimizer\|data parallel:\|overlap_grad_reduce:" "$O"/gpu2_dp_zero1_f32.log "$O"/gpu2_dp_f32.log | head -6
for n in "${names[@]}"; do grep -m1 -i "error" "$O/$n.log" | sed "s/^/$n: /"; done
