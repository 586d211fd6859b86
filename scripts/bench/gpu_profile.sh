#!/usr/bin/env bash
# Where the time goes, mbridge and its peers side by side in ONE device call (one GPU):
#  - PyTorch SDPA per backend (flash, cuDNN, efficient) against mbridge's flash kernels on the
#    same attention shapes (`attn_peer.py`, `mbridge selftest cuda --filter flash_attn`);
#  - the torch.compile peer's CUDA kernels of a Llama-3.2-1B step (`profile_peer.py`);
#  - mbridge's synchronized section times of the same step (`--log-level debug`);
#  - with LORA=1 also the 8B LoRA step's sections (base written as in gpu_lora.sh).
# Build first with scripts/device/build.sh; run with carry [".devbuild/gz"]:
#   bash scripts/bench/gpu_profile.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/bench/gpu_common.sh
gpu_setup
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "profilers on PATH: nsys=$(command -v nsys || echo none) ncu=$(command -v ncu || echo none)"
echo "== attention: PyTorch SDPA"
python3 scripts/bench/attn_peer.py 2>&1 | grep -E "^sdpa|Error"
echo "== attention: mbridge"
"$BIN" selftest cuda --filter flash_attn 2>&1 | grep -E "bench|FAIL|passed|failed" | grep -v "^PASS"
echo "== peer (titan, 1b, seq 4096, micro batch 2) kernels"
python3 scripts/bench/profile_peer.py 1b 4096 2 2>&1 | grep -vE "Warning|warn" | head -30
sections() {
  grep -E "sections:|iteration +[0-9]+/" | tail -3 | sed 's/ | /\n    /g'
}
echo "== mbridge llama32_1b sections (synchronized, so slower than the plain run)"
"$BIN" --log-level debug pretrain --recipe llama32_1b --device cuda:0 \
  model.seq_length=4096 train.micro_batch_size=2 train.global_batch_size=2 train.train_iters=6 \
  scheduler.lr_warmup_iters=2 logger.log_interval=1 validation.eval_iters=0 \
  '~checkpoint.save' '~checkpoint.load' '~logger.tensorboard_dir' 2>&1 | sections
if [ "${LORA:-0}" = 1 ]; then
  echo "== mbridge 8B LoRA sections"
  PEER=0 bash scripts/bench/gpu_lora.sh 4096 1 6 --log-level debug logger.log_interval=1 2>&1 | sections
fi
