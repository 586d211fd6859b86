#!/usr/bin/env bash
# A rank that dies or hangs under NCCL: the other rank must exit with an error naming the
# cause, never hang (issue #9). Two ranks started torchrun-style by hand (so no launcher
# stops the survivor for us), DP=2 over NCCL, tiny_llama with 8 layers.
#   1. SIGKILL rank 1 mid-run: rank 0 must exit within seconds ("rank 1 is gone").
#   2. SIGSTOP rank 1 mid-run (alive but hung): rank 0 must exit after
#      dist.distributed_timeout_minutes = 1 ("no progress" or a receive timeout).
# Run on a 2-GPU machine after   source .devbuild/bin/env.sh .devbuild/bin/mbridge
# (DEVICE=cpu runs the same over the CPU backend.)
set -uo pipefail
M=${MBRIDGE:-.devbuild/bin/mbridge}
O=${OUT:-/tmp/nccl_dead_rank}
mkdir -p "$O"
args=(pretrain --recipe tiny_llama --device "${DEVICE:-cuda}" train.train_iters=1000000 validation.eval_iters=0
  logger.log_interval=1 model.num_layers=8 dist.distributed_timeout_minutes=1)
start_ranks() { # $1 = case name, $2 = port
  pids=()
  for r in 0 1; do
    RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$2 \
      "$M" "${args[@]}" >"$O/$1.rank$r.log" 2>&1 &
    pids+=($!)
  done
  # Wait for training to run (iteration 5 logged by the logging rank).
  for _ in $(seq 1 600); do
    cat "$O/$1".rank*.log 2>/dev/null | grep -q "iteration        5/" && return 0
    sleep 0.1
  done
  echo "$1: training did not start"; for f in "$O/$1".rank*.log; do tail -3 "$f"; done
  kill -9 "${pids[@]}" 2>/dev/null; return 1
}
finish() { # $1 = case name, $2 = signal sent to rank 1, $3 = limit (s) for rank 0 to exit
  local t0 rc
  t0=$(date +%s.%N)
  kill "-$2" "${pids[1]}"
  timeout "$3" tail --pid="${pids[0]}" -f /dev/null
  rc=$?
  local dt; dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b - a}')
  if [ $rc -ne 0 ]; then
    echo "$1: rank 0 still running after $3 s (FAIL)"; kill -9 "${pids[0]}"
  else
    wait "${pids[0]}"; echo "$1: rank 0 exited with code $? after ${dt} s"
  fi
  grep -h -m1 -iE "error" "$O/$1.rank0.log" | cut -c1-400
  kill -9 "${pids[1]}" 2>/dev/null; wait "${pids[1]}" 2>/dev/null
}
start_ranks sigkill 29811 && finish sigkill KILL 30
start_ranks sigstop 29821 && finish sigstop STOP 150
