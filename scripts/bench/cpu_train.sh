#!/usr/bin/env bash
# CPU training throughput of `mbridge pretrain` (a benchmark, not a test).
#
# Builds the release binary, trains a few iterations of
#   * tiny_llama    (2 layers, hidden 64, seq 64; the CPU test recipe) and
#   * gpt_125m_cpu  (12 layers, hidden 768, 12 heads, seq 512, 32k vocab; ≈134M parameters)
# on mock data and prints: model, params, tokens/iter, ms/iter, tokens/s.
#
# ms/iter is the mean of the per-iteration times of the Megatron log line (log_interval=1),
# leaving out the first iteration (allocator and thread-pool warm-up). Knobs (environment):
#   TINY_ITERS (default 30), M125_ITERS (default 4), CARGO_TARGET_DIR (default ./target).
# Extra arguments are passed to both runs as overrides, e.g. `train.global_batch_size=4`.
set -euo pipefail
cd "$(dirname "$0")/../.."

TINY_ITERS=${TINY_ITERS:-30}
M125_ITERS=${M125_ITERS:-4}
BIN="${CARGO_TARGET_DIR:-target}/release/mbridge"

echo "building release binary ..." >&2
cargo build --release --quiet

bench() {
    local recipe=$1 iters=$2
    shift 2
    local log
    log=$("$BIN" pretrain --recipe "$recipe" "train.train_iters=$iters" logger.log_interval=1 \
        validation.eval_iters=0 "$@" 2>&1) || { echo "$log" >&2; return 1; }
    # Pull params, sequence length, global batch and the per-iteration times out of the log.
    echo "$log" | awk -v name="$recipe" '
        /number of parameters on/ { params = $NF }
        /^model: / { for (i = 1; i <= NF; i++) if ($i == "seq") seq = $(i + 1) }
        /elapsed time per iteration \(ms\):/ {
            split($0, a, "elapsed time per iteration \\(ms\\): "); split(a[2], b, " ")
            split($0, c, "global batch size: "); split(c[2], d, " ")
            gbs = d[1]; n++
            if (n > 1) { sum += b[1]; m++ }
        }
        END {
            if (m == 0) { print name ": no timed iterations" > "/dev/stderr"; exit 1 }
            ms = sum / m; tok = gbs * seq
            printf "%-14s %12s %12d %12.1f %12.0f\n", name, params, tok, ms, tok / (ms / 1000)
        }'
}

# Other work on the machine slows the runs down: the load average goes with the numbers.
echo "machine: $(nproc) CPU cores ($(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)), no GPU;" \
    "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
printf "%-14s %12s %12s %12s %12s\n" model params tokens/iter ms/iter tokens/s
bench tiny_llama "$TINY_ITERS" "$@"
bench gpt_125m_cpu "$M125_ITERS" "$@"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
