#!/usr/bin/env bash
# LoRA finetuning throughput, Llama 3 8B shape: HF PEFT (the peer, `peer_torch.py lora8b`) and
# `mbridge finetune --peft lora` in ONE device call (same GPU). Issue #10's benchmark.
# Build first with scripts/device/build.sh, then run through the device tool with carry
# [".devbuild/gz"]:   bash scripts/bench/gpu_lora.sh 4096 1 20
# The base model is a random Llama-3-8B-shaped Hugging Face checkpoint written by
# transformers on the device (nothing can be downloaded there); mbridge converts it on the
# fly (`checkpoint.pretrained_checkpoint` = that directory) and trains on mock data.
# Args: SEQ MBS ITERS [OVERRIDES...]; env PEER=0 skips the peer, BASE=dir reuses a base,
# MBRIDGE_ENV="K=V ..." is set for the mbridge process only (gpu_kernels.sh's tracer).
set -uo pipefail
cd "$(dirname "$0")/../.."
SEQ="${1:-4096}"; MBS="${2:-1}"; ITERS="${3:-20}"
source scripts/bench/gpu_common.sh
gpu_setup
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
BASE=${BASE:-/tmp/llama3-8b-random}
if [ ! -f "$BASE/config.json" ]; then
  echo "== writing a random Llama-3-8B-shaped HF checkpoint to $BASE"
  python3 - "$BASE" <<'EOF' || exit 3
import sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
t = time.time()
cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                  max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, torch_dtype="bfloat16")
torch.manual_seed(0)
with torch.device("cuda"):
    m = LlamaForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained(sys.argv[1], safe_serialization=True, max_shard_size="5GB")
print(f"written in {time.time() - t:.0f} s")
EOF
fi
if [ "${PEER:-1}" = 1 ]; then
  echo "== peer: HF transformers + PEFT LoRA r32 (q,k,v,o,gate,up,down), seq $SEQ, micro batch $MBS"
  PEER_LINE=$(python3 scripts/bench/peers/peer_torch.py "lora8b:8b:$SEQ:$MBS" 2>&1 | grep '^{' || echo "peer failed")
  echo "$PEER_LINE"
fi
echo "== mbridge finetune --peft lora (llama3_8b recipe: r32 on linear_qkv/proj/fc1/fc2), seq $SEQ, micro batch $MBS"
mem_watch_start 200
# shellcheck disable=SC2086
env ${MBRIDGE_ENV:-} "$BIN" finetune --recipe llama3_8b --peft lora --device cuda:0 \
  checkpoint.pretrained_checkpoint="\"$BASE\"" \
  tokenizer.tokenizer_type='"NullTokenizer"' +tokenizer.vocab_size=128255 \
  '~dataset.packed_sequence_specs' model.seq_length="$SEQ" train.micro_batch_size="$MBS" \
  train.global_batch_size="$MBS" train.train_iters="$ITERS" scheduler.lr_warmup_iters=2 \
  logger.log_interval=5 logger.log_throughput=true validation.eval_iters=0 \
  '~checkpoint.save' '~checkpoint.load' '~logger.tensorboard_dir' "${@:4}" 2>&1 \
  | grep -E "iteration|error|Error|memory \(GB\)|initialized|sections:|KTRACE" | tail -n "${TAIL:-8}"
echo "mbridge peak GPU memory (MiB, nvidia-smi): $(mem_watch_stop)"
# Again at the end, so a caller that keeps only the last lines still sees both engines.
if [ -n "${PEER_LINE:-}" ]; then echo "peer: $PEER_LINE"; fi
