#!/usr/bin/env bash
# GPU training throughput: mbridge vs the PyTorch peers, in ONE device call (same GPU).
# Build first with scripts/device/build.sh, then run this through the device tool with
# carry [".devbuild/gz"] (or [".devbuild/bin"] while binary + tree fit 64 MiB), e.g.:
#   bash scripts/bench/gpu_train.sh 1024 2 20
# Env: SIZE (peer model size, 1b), RECIPE (llama32_1b), PEERS ("titan hf"), PEER_WORKLOADS
# ("shipped train"; also "mock", see peers/peer_torch.py), PEER_STEPS (10), TAIL (mbridge log
# lines shown, 7), CLOCK_MS (nvidia-smi sampling period, 500).
# Args: SEQ MBS ITERS [OVERRIDES...] (defaults 1024 2 20; overrides go to mbridge, e.g.
# model.recompute_granularity=full model.recompute_method=uniform model.recompute_num_layers=1). Prints the peers' JSON lines and mbridge's log lines.
set -uo pipefail
cd "$(dirname "$0")/../.."
SEQ="${1:-1024}"; MBS="${2:-2}"; ITERS="${3:-20}"
source scripts/bench/gpu_common.sh
gpu_setup
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
SIZE=${SIZE:-1b}; RECIPE=${RECIPE:-llama32_1b}; PEERS=${PEERS:-titan hf}
mark() { echo "== $1" >> /tmp/clocks.log; }
run_peers() {
  echo "== peers ($SIZE shape, seq $SEQ, micro batch $MBS: $PEERS) =="
  specs=(); for p in $PEERS; do specs+=("$p:$SIZE:$SEQ:$MBS"); done
  # The peer as ../shared/bench ships it (`labels = input`: titan's loss collapses to 0) and
  # training on next-token labels (PEER_WORKLOADS, "shipped train"; see peer_torch.py).
  for workload in ${PEER_WORKLOADS:-shipped train}; do
    # The workload changes titan only (HF variants shift their labels themselves).
    run=("${specs[@]}")
    [ "$workload" = train ] && { run=(); for x in "${specs[@]}"; do [[ $x == titan:* ]] && run+=("$x"); done; }
    [ ${#run[@]} -gt 0 ] || continue
    mark "peer-$workload"
    PEER_WORKLOAD=$workload python3 scripts/bench/peers/peer_torch.py "${run[@]}" 2>&1 | grep '^{' \
      || echo "peer failed"
  done
}
run_mbridge() {
  echo "== mbridge ($RECIPE recipe, bf16_mixed, seq $SEQ, micro batch $MBS) =="
  mem_watch_start 200
  "$BIN" pretrain --recipe "$RECIPE" --device cuda:0 \
    model.seq_length="$SEQ" train.micro_batch_size="$MBS" \
    train.global_batch_size="$MBS" train.train_iters="$ITERS" scheduler.lr_warmup_iters=2 \
    logger.log_interval=5 logger.log_throughput=true validation.eval_iters=0 \
    '~checkpoint.save' '~checkpoint.load' '~logger.tensorboard_dir' "${@}" 2>&1 \
    | grep -E "iteration|error|memory \(GB\)" | tail -n "${TAIL:-7}"
  echo "mbridge peak GPU memory (MiB, nvidia-smi): $(mem_watch_stop)"
}
# The GPU's SM clock, power and temperature during each run (a hot GPU clocks lower, so
# the second run of a call may be at a disadvantage: MBRIDGE_FIRST=1 swaps the order; at the
# power limit, a run that moves more bytes also runs its kernels at a lower clock).
: > /tmp/clocks.log
# Appending (O_APPEND) keeps the run marks below from being overwritten by nvidia-smi's writes.
# The last field is the clock event (throttle) reasons bitmask: 0x4 = the software power cap.
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active \
  --format=csv,noheader -lms "${CLOCK_MS:-500}" >> /tmp/clocks.log &
CLOCKS=$!
if [ "${MBRIDGE_FIRST:-0}" = 1 ]; then
  mark mbridge; run_mbridge "${@:4}"; run_peers
else
  run_peers; mark mbridge; run_mbridge "${@:4}"
fi
kill "$CLOCKS" 2>/dev/null
echo "GPU under load (samples above 300 W), per run: mean SM clock, power, temperature, share of samples held by the power cap"
awk -F', ' '/^== /{name=$0; sub(/^== /, "", name); next}
  name != "" && $3 + 0 > 300 {n[name]++; c[name]+=$2; p[name]+=$3; t[name]+=$4
    # bit 0x4 of the reasons mask: its last hex digit is 4-7 or c-f.
    if (tolower(substr($5, length($5), 1)) ~ /[4567cdef]/) cap[name]++}
  END {for (k in n) printf "  %-12s %3d samples  %6.0f MHz  %5.0f W  %3.0f C  power cap %3.0f%%\n", k, n[k], c[k]/n[k], p[k]/n[k], t[k]/n[k], 100*cap[k]/n[k]}' \
  /tmp/clocks.log
