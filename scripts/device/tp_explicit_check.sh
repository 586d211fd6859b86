#!/usr/bin/env bash
# Tensor parallelism in the layers' written-out backward (the CUDA default) over NCCL, 2 GPUs:
#   f32 tiny_llama TP=2 and TP=2 with sequence parallelism against the CPU (also with
#   LayerNorm, biases and QK-norm), bf16 TP=2 + SP against one GPU, then Llama-3.2-1B TP=2 + SP
#   timed with the written-out backward and with candle's autograd (MBRIDGE_EXPLICIT_LAYERS=0);
#   LoRA adapters (dim 4) on a 2-step tiny_llama base, f32 TP=2 (and TP=2 + SP) over NCCL
#   against the CPU.
# Run on the GPU machine after   source .devbuild/bin/env.sh .devbuild/bin/mbridge
# LORA_ONLY=1 runs the LoRA comparison alone.
set -uo pipefail
M=${MBRIDGE:-.devbuild/bin/mbridge}
O=${TP_OUT:-/tmp/tp_explicit}
mkdir -p "$O"
common=(--recipe tiny_llama train.train_iters=20 validation.eval_iters=0 logger.log_interval=1)
biased=(model.normalization='"LayerNorm"' model.add_bias_linear=true model.qk_layernorm=true)
wide=(model.hidden_size=256 model.ffn_hidden_size=688 model.num_attention_heads=4
  model.num_query_groups=2 model.seq_length=256)
tp=(--nproc-per-node 2 model.tensor_model_parallel_size=2)
sp=model.sequence_parallel=true
port=29800
run() {
  local name=$1; shift
  port=$((port + 10))
  timeout "${RUN_LIMIT:-60}" "$M" pretrain "${common[@]}" --master-port "$port" "$@" >"$O/$name.log" 2>&1 || echo "$name: exit $?"
}
losses() { grep -o 'lm loss: [0-9.E+-]*' "$O/$1.log" | awk '{print $3}'; }
compare() {
  paste <(losses "$1") <(losses "$2") | awk -v a="$1" -v b="$2" '{d=($1-$2)/$1; if(d<0)d=-d; if(d>m)m=d} END{printf "%s vs %s: max rel %.2e over %d steps\n", b, a, m, NR}'
}
# LoRA under TP: column-parallel adapters' A gradients summed over TP, row-parallel adapters'
# A x summed before the replicated B (the written-out backward, the CUDA default).
lora=(+peft.dim=4 +peft.alpha=8.0 checkpoint.pretrained_checkpoint="\"$O/base\"")
run lora_base --device cpu train.train_iters=2 "+checkpoint.save=\"$O/base\""
run lora_cpu --device cpu "${lora[@]}"
run lora_gpu_tp2 --device cuda "${tp[@]}" "${lora[@]}"
run lora_gpu_tp2_sp --device cuda "${tp[@]}" $sp "${lora[@]}"
compare lora_cpu lora_gpu_tp2
compare lora_cpu lora_gpu_tp2_sp
if [ -n "${LORA_ONLY:-}" ]; then
  grep -h -m1 -i "error" "$O"/lora*.log
  exit 0
fi
run cpu --device cpu
run gpu_tp2 --device cuda "${tp[@]}"
run gpu_tp2_sp --device cuda "${tp[@]}" $sp
run cpu_biased --device cpu "${biased[@]}"
run gpu_tp2_sp_biased --device cuda "${tp[@]}" $sp "${biased[@]}"
run wide_gpu1_bf16 --device cuda "${wide[@]}" mixed_precision='"bf16_mixed"'
run wide_gpu_tp2_sp_bf16 --device cuda "${tp[@]}" $sp "${wide[@]}" mixed_precision='"bf16_mixed"'
compare cpu gpu_tp2; compare cpu gpu_tp2_sp; compare cpu_biased gpu_tp2_sp_biased
compare wide_gpu1_bf16 wide_gpu_tp2_sp_bf16
for f in "$O"/*.log; do grep -m1 -i "error" "$f" | sed "s|^|$(basename "$f"): |"; done
big=(pretrain --recipe llama32_1b --device cuda "${tp[@]}" $sp model.seq_length=4096
  train.micro_batch_size=1 train.global_batch_size=2 train.train_iters=10 logger.log_interval=5
  logger.log_throughput=true validation.eval_iters=0 scheduler.lr_warmup_iters=2
  '~checkpoint.save' '~checkpoint.load' '~logger.tensorboard_dir')
for explicit in 1 0; do
  echo "== 1B TP=2 + SP, seq 4096, MBRIDGE_EXPLICIT_LAYERS=$explicit"
  MBRIDGE_EXPLICIT_LAYERS=$explicit timeout 120 "$M" "${big[@]}" --master-port $((port + 100 + explicit)) 2>&1 |
    grep -E "iteration +10/|rror" | grep -oE "elapsed time per iteration \(ms\): [0-9.]*|TFLOP/s/GPU\): [0-9.]*|mem-max-allocated-gigabytes: [0-9.]*|.*rror.*" | tr '\n' ' '; echo
done
