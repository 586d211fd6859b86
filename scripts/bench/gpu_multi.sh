#!/usr/bin/env bash
# Llama 3 8B shape (or SIZE/RECIPE), seq 8192, on the GPUs of one machine: the PyTorch FSDP2 peer
# (`peer_fsdp.py`, torchrun) and mbridge in ONE device call (issue #9's benchmark).
# Build first with scripts/device/build.sh, then run through the device tool with carry
# [".devbuild/gz"] on a 4-GPU kind:   bash scripts/bench/gpu_multi.sh 8
# Args: ITERS [LAYOUT...]; a layout is "TPxPPxDP[xCP][:overrides]" (comma-separated overrides),
# default "1x4x1" (pipeline over the 4 GPUs, 1F1B, 16 micro-batches per step).
# Env: PEER=0 skips the peer, PEER_AC=full runs it with full activation checkpointing,
# GBS (default 16) global batch in sequences; SIZE (1b|3b|8b, default 8b) with RECIPE (default
# llama3_8b), SEQ (default 8192) and MBS (default 1) pick another model shape, e.g.
#   SIZE=1b RECIPE=llama32_1b SEQ=4096 MBS=2 GBS=4 bash scripts/bench/gpu_multi.sh 20 '1x1x2'
set -uo pipefail
cd "$(dirname "$0")/../.."
ITERS="${1:-8}"; shift
LAYOUTS=("${@:-1x4x1}")
SIZE="${SIZE:-8b}"; RECIPE="${RECIPE:-llama3_8b}"; SEQ="${SEQ:-8192}"; MBS="${MBS:-1}"
source scripts/bench/gpu_common.sh
gpu_setup
export NCCL_NVLS_ENABLE=0
NGPU=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sort | uniq -c
if [ "${PEER:-1}" = 1 ]; then
  echo "== peer: FSDP2 + per-block torch.compile, $SIZE, seq $SEQ, micro batch $MBS, AC ${PEER_AC:-none}, $NGPU GPUs"
  # The peer as ../shared/bench ships it (`labels = input`) and training on next-token labels
  # (PEER_WORKLOADS, "shipped train"; see peer_torch.py for why both).
  for workload in ${PEER_WORKLOADS:-shipped train}; do
    PEER_WORKLOAD=$workload timeout 300 torchrun --nproc-per-node "$NGPU" scripts/bench/peers/peer_fsdp.py \
      "$SIZE" "$SEQ" "$MBS" "${PEER_AC:-none}" 2>&1 | grep -E '^\{|Error|error' | tail -3
  done
fi
for layout in "${LAYOUTS[@]}"; do
  IFS=x read -r tp pp dp cp <<<"${layout%%:*}"
  cp=${cp:-1}
  extra=()
  [[ "$layout" == *:* ]] && IFS=, read -ra extra <<<"${layout#*:}"
  echo "== mbridge $RECIPE, TP $tp x PP $pp x DP $dp x CP $cp, seq $SEQ, micro batch $MBS, global batch ${GBS:-16} ${extra[*]}"
  mem_watch_start 500
  timeout 420 "$BIN" pretrain --recipe "$RECIPE" --device cuda --nproc-per-node $((tp * pp * dp * cp)) \
    model.tensor_model_parallel_size="$tp" model.pipeline_model_parallel_size="$pp" \
    model.context_parallel_size="$cp" model.seq_length="$SEQ" train.micro_batch_size="$MBS" \
    train.global_batch_size="${GBS:-16}" train.train_iters="$ITERS" scheduler.lr_warmup_iters=2 \
    logger.log_interval=2 logger.log_throughput=true validation.eval_iters=0 \
    '~checkpoint.save' '~checkpoint.load' '~logger.tensorboard_dir' "${extra[@]}" 2>&1 \
    | grep -iE "iteration +[0-9]+/|error|memory \(GB\)|overlap_grad_reduce:" | tail -9
  echo "peak GPU memory of any GPU (MiB, nvidia-smi): $(mem_watch_stop)"
done
