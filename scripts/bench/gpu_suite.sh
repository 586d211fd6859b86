#!/usr/bin/env bash
# Everything a GPU session checks, in ONE device call (machine start-up is the costly part):
#   1. `mbridge selftest cuda` (fused kernels vs the f32 reference; benchmarks off unless BENCH=1),
#   2. scripts/bench/gpu_train.sh: Llama-3.2-1B shape, seq 4096, micro batch 2 — the torch.compile
#      peer and mbridge on the same GPU (PEERS="titan" by default; add "hf" for HF transformers),
#   3. scripts/device/dp_nccl_check.sh when 2+ GPUs are visible (DP/TP over NCCL vs 1 GPU vs CPU),
#   4. Llama-3.2-3B shape at seq 4096 (peer + mbridge) if BUDGET seconds are not used up yet.
# Usage on the device (carry [".devbuild/gz"]): BUDGET=540 bash scripts/bench/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
BUDGET=${BUDGET:-540}
export PEERS=${PEERS:-titan}
scripts/device/unpack.sh || exit 2
source .devbuild/bin/env.sh .devbuild/bin/mbridge >/dev/null
left() { echo $((BUDGET - SECONDS)); }
echo "== selftest cuda"
timeout 120 .devbuild/bin/mbridge selftest cuda $([ "${BENCH:-0}" = 1 ] || echo --no-bench) 2>&1 | grep -E "FAIL|passed|failed|error" | head -20
echo "== 1B, seq 4096 ($(left) s left)"
timeout $(( $(left) > 260 ? 240 : $(left) - 20 )) bash scripts/bench/gpu_train.sh 4096 2 20
gpus=$(nvidia-smi -L | wc -l)
if [ "$gpus" -ge 2 ] && [ "$(left)" -gt 150 ]; then
  echo "== NCCL checks on $gpus GPUs ($(left) s left)"
  RUN_LIMIT=${RUN_LIMIT:-25} timeout $(( $(left) - 10 )) bash scripts/device/dp_nccl_check.sh
fi
if [ "$(left)" -gt 150 ]; then
  echo "== 3B, seq 4096 ($(left) s left)"
  SIZE=3b RECIPE=llama32_3b timeout $(( $(left) - 10 )) bash scripts/bench/gpu_train.sh 4096 2 10
fi
echo "suite done in $SECONDS s"
