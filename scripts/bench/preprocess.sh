#!/usr/bin/env bash
# `mbridge preprocess-data` against Megatron-LM's tools/preprocess_data.py on the same corpus,
# tokenizer (HF tokenizer.json, 32k byte-level BPE) and worker count; checks that both wrote
# the same .bin/.idx bytes and prints a throughput table. A benchmark, not a test.
#
# Needs: a Python with torch, transformers, tokenizers, megatron-core 0.16.1 (+ six, nltk not
# needed) — PYTHON (default /work/pyenv/bin/python); a Megatron-LM checkout of the matching
# release for tools/preprocess_data.py and megatron/training — MEGATRON_LM (default /tmp/mlm;
# e.g. `git clone -b core_v0.16.1 https://github.com/NVIDIA/Megatron-LM`).
# Knobs: MB (corpus size, default 40), WORKERS (space-separated list, default "1 2").
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-/work/pyenv/bin/python}
MEGATRON_LM=${MEGATRON_LM:-/tmp/mlm}
MB=${MB:-40}
WORKERS=${WORKERS:-"1 2"}
BIN="${CARGO_TARGET_DIR:-target}/release/mbridge"
[ -f "$MEGATRON_LM/tools/preprocess_data.py" ] || { echo "error: no tools/preprocess_data.py under MEGATRON_LM=$MEGATRON_LM" >&2; exit 2; }

echo "building release binary ..." >&2
cargo build --release --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" scripts/bench/preprocess_corpus.py "$work" "$MB" >&2
bytes=$(stat -c %s "$work/corpus.jsonl")

timeit() { local t0 t1; t0=$(date +%s.%N); "$@" >"$work/last.log" 2>&1 || { cat "$work/last.log" >&2; return 1; }; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }

printf "%-8s %-10s %10s %10s %8s  %s\n" workers tool seconds MB/s speedup "same bytes"
for w in $WORKERS; do
    meg=$(cd "$MEGATRON_LM" && timeit "$PYTHON" tools/preprocess_data.py --input "$work/corpus.jsonl" \
        --output-prefix "$work/meg" --tokenizer-type HuggingFaceTokenizer \
        --tokenizer-model "$work/tokenizer" --workers "$w" --append-eod --log-interval 100000000)
    mb=$(timeit "$BIN" preprocess-data --input "$work/corpus.jsonl" --output-prefix "$work/mb" \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$work/tokenizer" --workers "$w" \
        --append-eod --log-interval 100000000)
    same=yes
    for ext in bin idx; do cmp -s "$work/meg_text_document.$ext" "$work/mb_text_document.$ext" || same=NO; done
    printf "%-8s %-10s %10.2f %10.2f %8s\n" "$w" megatron "$meg" "$(echo "$bytes/1000000/$meg" | bc -l)" "1.00"
    printf "%-8s %-10s %10.2f %10.2f %8.2f  %s\n" "$w" mbridge "$mb" "$(echo "$bytes/1000000/$mb" | bc -l)" "$(echo "$meg/$mb" | bc -l)" "$same"
done
