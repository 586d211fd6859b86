#!/usr/bin/env bash
# Issue #8's remaining GPU checks in one device call (one GPU):
#   1. Llama-3.2-1B, bf16_mixed vs f32 for STEPS steps on the same mock data and seed: the
#      per-step relative difference of the loss (max, mean, last 20 steps).
#   2. fp16_mixed (dynamic loss scaling) on the same model: the loss scale of each log line.
#   3. profiling on CUDA: the Chrome trace and the memory report of a 2-step window (file
#      sizes and the report's GPU fields).
# Build first with scripts/device/build.sh, then run through the device tool with carry
# [".devbuild/gz"]:   bash scripts/bench/gpu_track.sh 1024 200
# Knobs: MBS, GBS (default 2 and 2), DATA (see below), TRACK_ONLY=1 (step 1 only),
# BF16_LIMIT / F32_LIMIT (seconds per run). VS="overrides" VS_NAME=name compares bf16 with
# another run instead of f32, e.g. FP8:
#   VS_NAME=fp8 VS="mixed_precision=bf16_with_fp8_current_scaling_mixed
#   mixed_precision.fp8_param_gather=false mixed_precision.fp8_param=false" TRACK_ONLY=1 ...
set -uo pipefail
cd "$(dirname "$0")/../.."
SEQ="${1:-1024}"; STEPS="${2:-200}"
source scripts/bench/gpu_common.sh
# BIN=... RECIPE=tiny_llama DEVICE=cpu CLEAR= tries the script on the CPU (tiny_llama has no
# checkpoint or tensorboard paths to clear).
[ -n "${BIN:-}" ] || gpu_setup
O=${OUT:-/tmp/track}; mkdir -p "$O"
common=(pretrain --recipe "${RECIPE:-llama32_1b}" --device "${DEVICE:-cuda:0}" model.seq_length="$SEQ"
  train.micro_batch_size="${MBS:-2}" train.global_batch_size="${GBS:-2}" logger.log_interval=1 validation.eval_iters=0)
# DATA=DIR trains on DIR/zipf_text_document (.bin/.idx) with the tokenizer in DIR/tokenizer,
# as scripts/bench/preprocess_corpus.py and `mbridge preprocess-data` write them: a corpus
# whose loss levels off well above zero, unlike the mock data's counting sequences.
if [ -n "${DATA:-}" ]; then
  common+=("++dataset.blend=[\"$DATA/zipf_text_document\"]" '++dataset.split="969,30,1"'
    'tokenizer.tokenizer_type="HuggingFaceTokenizer"' "++tokenizer.tokenizer_model=\"$DATA/tokenizer\"")
fi
# shellcheck disable=SC2206  # separate words on purpose
clear=(${CLEAR-'~checkpoint.save' '~checkpoint.load'})
[ -n "${CLEAR-x}" ] && notb=('~logger.tensorboard_dir') || notb=()
common+=("${clear[@]}")
losses() { grep -o 'lm loss: [0-9.E+-]*' "$1" | awk '{print $3}'; }
ms() { grep -o 'per iteration (ms): [0-9.]*' "$1" | tail -1 | awk '{print $4}'; }
# shellcheck disable=SC2206  # separate words on purpose
vs=(${VS:-'~mixed_precision'}); VN=${VS_NAME:-f32}
echo "== ${RECIPE:-llama32_1b} bf16_mixed vs $VN, seq $SEQ, micro batch ${MBS:-2}, global batch ${GBS:-2}, $STEPS steps"
timeout "${BF16_LIMIT:-200}" "$BIN" "${common[@]}" "${notb[@]}" train.train_iters="$STEPS" >"$O/bf16.log" 2>&1; echo "bf16 exit $? ($(ms "$O/bf16.log") ms/iter)"
timeout "${F32_LIMIT:-300}" "$BIN" "${common[@]}" "${notb[@]}" train.train_iters="$STEPS" "${vs[@]}" >"$O/f32.log" 2>&1; echo "$VN exit $? ($(ms "$O/f32.log") ms/iter)"
paste <(losses "$O/bf16.log") <(losses "$O/f32.log") | awk -v n="$STEPS" -v vn="$VN" '
  {d=($1-$2)/$2; if(d<0)d=-d; s+=d; if(d>m){m=d; at=NR}; if(NR>n-20){a+=$1; b+=$2; k++}}
  END{printf "steps %d: per-step |bf16-%s|/%s max %.2f%% (step %d), mean %.2f%%; last 20 mean loss bf16 %.4f %s %.4f (%.2f%%)\n",
      NR, vn, vn, 100*m, at, 100*s/NR, a/k, vn, b/k, 100*(a-b)/b}'
grep -h -m1 -i "error" "$O/bf16.log" "$O/f32.log"
paste <(losses "$O/bf16.log") <(losses "$O/f32.log") | awk -v vn="$VN" 'NR==1 || NR%25==0 {printf "  step %d: bf16 %.4f %s %.4f\n", NR, $1, vn, $2}'
[ -n "${TRACK_ONLY:-}" ] && exit 0
echo "== fp16_mixed, 40 steps"
timeout 120 "$BIN" "${common[@]}" "${notb[@]}" train.train_iters=40 mixed_precision='"fp16_mixed"' >"$O/fp16.log" 2>&1; echo "fp16 exit $?"
grep -o 'lm loss: [0-9.E+-]* | loss scale: [0-9.E+-]*' "$O/fp16.log" | awk 'NR%5==1'
grep -o 'number of skipped iterations: *[0-9]*' "$O/fp16.log" | awk '{n+=$NF} END{print "skipped (overflow) iterations in total:", n}'
grep -h -m1 -i "error" "$O/fp16.log"
echo "== profiling window (steps 3-4) on CUDA"
rm -rf "$O/prof"; mkdir -p "$O/prof/tb"
timeout 120 "$BIN" "${common[@]}" "++logger.tensorboard_dir=$O/prof/tb" train.train_iters=5 \
  profiling.use_pytorch_profiler=true profiling.profile_step_start=3 profiling.profile_step_end=5 \
  profiling.record_memory_history=true profiling.memory_snapshot_path="$O/prof/mem.pickle" >"$O/prof.log" 2>&1
echo "profiling exit $?"; ls -la "$O/prof" "$O/prof/torch_profile" 2>&1 | grep -E "json|total"
python3 - "$O/prof" <<'PY'
import json, sys, pathlib
d = pathlib.Path(sys.argv[1])
m = json.loads((d / "mem_0.json").read_text())
print("memory report:", m.get("device"), "complete", m.get("complete"), "steps", m["steps"])
t = json.loads(next((d / "torch_profile").glob("rank-*.json")).read_text())
ev = t["traceEvents"]
print("trace:", len(ev), "events; names:", sorted({e.get("name") for e in ev if e.get("ph") == "X"})[:12])
PY
