#!/usr/bin/env bash
# GPU training throughput: mbridge vs the PyTorch peers, in ONE device call (same GPU).
# Build first with scripts/device/build.sh, then run this through the device tool with
# carry [".devbuild/gz"] (or [".devbuild/bin"] while binary + tree fit 64 MiB), e.g.:
#   bash scripts/bench/gpu_train.sh 1024 2 20
# Env: SIZE (peer model size, 1b), RECIPE (llama32_1b), PEERS ("titan hf").
# Args: SEQ MBS ITERS [OVERRIDES...] (defaults 1024 2 20; overrides go to mbridge, e.g.
# model.recompute_granularity=full model.recompute_method=uniform model.recompute_num_layers=1). Prints the peers' JSON lines and mbridge's log lines.
set -uo pipefail
cd "$(dirname "$0")/../.."
SEQ="${1:-1024}"; MBS="${2:-2}"; ITERS="${3:-20}"
source scripts/bench/gpu_common.sh
gpu_setup
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
SIZE=${SIZE:-1b}; RECIPE=${RECIPE:-llama32_1b}; PEERS=${PEERS:-titan hf}
run_peers() {
  echo "== peers ($SIZE shape, seq $SEQ, micro batch $MBS: $PEERS) =="
  specs=(); for p in $PEERS; do specs+=("$p:$SIZE:$SEQ:$MBS"); done
  python3 scripts/bench/peers/peer_torch.py "${specs[@]}" 2>&1 | grep '^{' || echo "peer failed"
}
run_mbridge() {
  echo "== mbridge ($RECIPE recipe, bf16_mixed, seq $SEQ, micro batch $MBS) =="
  mem_watch_start 200
  "$BIN" pretrain --recipe "$RECIPE" --device cuda:0 \
    model.seq_length="$SEQ" train.micro_batch_size="$MBS" \
    train.global_batch_size="$MBS" train.train_iters="$ITERS" scheduler.lr_warmup_iters=2 \
    logger.log_interval=5 logger.log_throughput=true validation.eval_iters=0 \
    '~checkpoint.save' '~checkpoint.load' '~logger.tensorboard_dir' "${@}" 2>&1 \
    | grep -E "iteration|error|memory \(GB\)" | tail -7
  echo "mbridge peak GPU memory (MiB, nvidia-smi): $(mem_watch_stop)"
}
# The GPU's SM clock, power and temperature during both runs (a hot GPU clocks lower, so
# the second run of a call may be at a disadvantage: MBRIDGE_FIRST=1 swaps the order).
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv,noheader \
  -lms 1000 > /tmp/clocks.log &
CLOCKS=$!
if [ "${MBRIDGE_FIRST:-0}" = 1 ]; then run_mbridge "${@:4}"; run_peers; else run_peers; run_mbridge "${@:4}"; fi
kill "$CLOCKS" 2>/dev/null
echo "GPU SM clock / power / temperature, each second above 300 W (under load):"
awk -F', ' '$3 + 0 > 300' /tmp/clocks.log
