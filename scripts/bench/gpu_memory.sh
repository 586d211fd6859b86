#!/usr/bin/env bash
# Where a training step's memory goes, from mbridge's memory report (profiling.record_memory_history):
# runs `mbridge pretrain` for 2 iterations with the report on both, then prints per iteration
# the peak and where it was reached, the memory in use at each micro-batch pass's start and
# end, and the largest increases between consecutive points of the timeline.
# Usage on the device (repository root, after the build was carried):
#   GPU=0 NAME=fp8_ga8 bash scripts/bench/gpu_memory.sh --recipe llama3_8b model.num_layers=16 ...
# The arguments go to `mbridge pretrain` after fixed logging/no-checkpoint settings. Reports
# land in ${OUT:-/tmp}/memory-$NAME.json, the log in ${OUT:-/tmp}/memory-$NAME.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/bench/gpu_common.sh
gpu_setup
name=${NAME:-run}
out=${OUT:-/tmp}
mkdir -p "$out"
timeout "${RUN_LIMIT:-300}" "$BIN" pretrain --device "cuda:${GPU:-0}" train.train_iters=2 \
  validation.eval_iters=0 logger.log_interval=1 '~checkpoint.save' '~checkpoint.load' \
  '~logger.tensorboard_dir' profiling.record_memory_history=true "profiling.profile_ranks=[0]" \
  "profiling.memory_snapshot_path=$out/memory-$name.json" profiling.profile_step_start=0 \
  profiling.profile_step_end=2 "$@" >"$out/memory-$name.log" 2>&1
echo "$name: exit $? ($(grep -cE 'iteration +[0-9]+/' "$out/memory-$name.log") iterations logged)"
grep -E "iteration +[0-9]+/|rror|memory \(GB\)" "$out/memory-$name.log" | tail -4 | cut -c1-400
python3 - "$out/memory-${name}_0.json" <<'PY'
import json, sys
try:
    doc = json.load(open(sys.argv[1]))
except OSError as e:
    sys.exit(f"no report: {e}")
G = 2**30
print("totals (GiB):", {k: round(v / G, 2) for k, v in doc["totals_bytes"].items()})
for step in doc["steps"]:
    tl = step.get("timeline", [])
    pk = step.get("timeline_peak") or {}
    print(f"iteration {step['iteration']}: max allocated {step.get('max_allocated_bytes', 0) / G:.2f} GiB;"
          f" timeline peak {pk.get('bytes', 0) / G:.2f} GiB at '{pk.get('at')}' after '{pk.get('after')}'")
    for p in tl:
        if p["cat"] in ("microbatch", "phase", "step"):
            print(f"  {p['at']:>5} {p['name']:<36} {p.get('allocated_bytes', 0) / G:8.2f} GiB"
                  f" (max {p.get('max_allocated_bytes', 0) / G:.2f})")
    jumps = sorted(((b.get("allocated_bytes", 0) - a.get("allocated_bytes", 0), a, b)
                    for a, b in zip(tl, tl[1:])), key=lambda j: -j[0])[:8]
    for d, a, b in jumps:
        print(f"  +{d / G:6.2f} GiB from '{a['at']} {a['name']}' to '{b['at']} {b['name']}'")
PY
