#!/usr/bin/env bash
# Two ranks started the way torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK,
# LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment, one process per GPU), DP=2
# over NCCL, against the CPU backend on one process. Run on a 2-GPU machine after
#   source .devbuild/bin/env.sh .devbuild/bin/mbridge
set -uo pipefail
M=${MBRIDGE:-.devbuild/bin/mbridge}
O=${OUT:-/tmp/torchrun_env}
mkdir -p "$O"
common=(--recipe tiny_llama train.train_iters=20 validation.eval_iters=0 logger.log_interval=1)
timeout 60 "$M" pretrain "${common[@]}" --device cpu >"$O/cpu.log" 2>&1
pids=()
for r in 0 1; do
  RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29733 \
    timeout 90 "$M" pretrain "${common[@]}" --device cuda >"$O/rank$r.log" 2>&1 &
  pids+=($!)
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done
echo "torchrun-style ranks: exit $rc"
losses() { grep -o 'lm loss: [0-9.E+-]*' "$1" | awk '{print $3}'; }
# The log line comes from the last rank, as in Megatron.
last=$(grep -l 'lm loss' "$O"/rank*.log | tail -1)
paste <(losses "$O/cpu.log") <(losses "$last") | awk '{d=($1-$2)/$1; if(d<0)d=-d; if(d>m)m=d} END{printf "torchrun-style DP=2 on 2 GPUs vs CPU: max rel %.2e over %d steps\n", m, NR}'
grep -h -m2 -i "error" "$O"/rank*.log
