#!/usr/bin/env bash
# Every CUDA kernel of mbridge's training step, timed by CUPTI (no nsys needed): builds
# kernel_trace.cpp on the device against the CUPTI of PyTorch's wheels, loads it into mbridge
# through CUDA_INJECTION64_PATH and prints the per-iteration table of the profiled steps
# (`profiling.use_nsys_profiler` window: steps 3..8). The peer's table: profile_peer.py.
# Build first with scripts/device/build.sh; run with carry [".devbuild/gz"]:
#   bash scripts/bench/gpu_kernels.sh            # Llama-3.2-1B, seq 4096, micro batch 2
#   LORA=1 bash scripts/bench/gpu_kernels.sh     # also the 8B LoRA step (gpu_lora.sh's)
#   DP=2 bash scripts/bench/gpu_kernels.sh 'ddp.overlap_grad_reduce=true'   # DP ranks (one
#     table per rank: kernel time above the wall time means kernels overlapped)
# Further arguments are overrides of the 1B run.
# Shows the first $SHOW (45) lines of each table; all $TOP (60) rows go to $OUT/kernels_*.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/bench/gpu_common.sh
gpu_setup
SITE=$(python3 -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
LIB=$(find "$SITE/nvidia" -name "libcupti.so*" | sort | tail -1)
INC=$(find "$SITE/nvidia" -name cupti_activity.h | head -1 | xargs dirname)
[ -n "$LIB" ] && [ -n "$INC" ] || { echo "error: no CUPTI in PyTorch's wheels under $SITE/nvidia" >&2; exit 2; }
# The cu13 wheels leave out crt/host_defines.h (nvcc's); triton's copy of the headers has it.
CRT=$(find "$SITE" -path "*include/crt/host_defines.h" | head -1 | xargs -r dirname | xargs -r dirname)
newest() { grep -o "} $1[0-9]*;" "$INC/cupti_activity.h" | tr -d '}; ' | sort -V | tail -1; }
TRACER=/tmp/kernel_trace.so
g++ -std=c++17 -O2 -shared -fPIC scripts/bench/kernel_trace.cpp -I"$INC" ${CRT:+-I"$CRT"} \
  -DKREC="$(newest CUpti_ActivityKernel)" -DMCREC="$(newest CUpti_ActivityMemcpy)" \
  -DMSREC="$(newest CUpti_ActivityMemset)" "$LIB" -Wl,-rpath,"$(dirname "$LIB")" -o "$TRACER" \
  || exit 3
TRACE_ENV="CUDA_INJECTION64_PATH=$TRACER KERNEL_TRACE_ITERS=5 KERNEL_TRACE_TOP=${TOP:-60}"
PROFILE=(profiling.use_nsys_profiler=true profiling.profile_step_start=3 profiling.profile_step_end=8)
DP="${DP:-1}"
if [ "$DP" -gt 1 ]; then
  # Every rank profiles the same window, so each rank's table is per iteration.
  RANKS=$(seq -s, 0 $((DP - 1)))
  DEVICE=(--device cuda --nproc-per-node "$DP" "profiling.profile_ranks=[$RANKS]")
else
  DEVICE=(--device cuda:0)
fi
echo "== mbridge llama32_1b, seq 4096, micro batch 2, DP $DP $*: kernels per iteration"
# shellcheck disable=SC2086
env $TRACE_ENV "$BIN" pretrain --recipe llama32_1b "${DEVICE[@]}" \
  model.seq_length=4096 train.micro_batch_size=2 train.global_batch_size=$((2 * DP)) train.train_iters=9 \
  scheduler.lr_warmup_iters=2 logger.log_interval=1 validation.eval_iters=0 "${PROFILE[@]}" \
  '~checkpoint.save' '~checkpoint.load' '~logger.tensorboard_dir' "$@" 2>&1 \
  | grep -E "KTRACE|iteration +8/|error|Error" | tee "${OUT:-/tmp}/kernels_1b.txt" | head -n "${SHOW:-45}"
if [ "${LORA:-0}" = 1 ]; then
  echo "== mbridge 8B LoRA, seq 4096: kernels per iteration"
  PEER=0 TAIL=200 MBRIDGE_ENV="$TRACE_ENV" bash scripts/bench/gpu_lora.sh 4096 1 9 logger.log_interval=1 "${PROFILE[@]}" 2>&1 \
    | grep -E "KTRACE|iteration +8/|error|Error" | tee "${OUT:-/tmp}/kernels_lora8b.txt" \
    | head -n "${SHOW:-45}"
fi
