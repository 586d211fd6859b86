# Sourced by the GPU benchmark scripts (run from the repository root on the device machine).

# Unpacks the carried CUDA build (.devbuild/gz) and sets BIN to the mbridge binary.
gpu_setup() {
  scripts/device/unpack.sh || exit 2
  BIN=.devbuild/bin/mbridge
  # shellcheck disable=SC1091
  source .devbuild/bin/env.sh "$BIN" >/dev/null
}

# Samples every GPU's used memory every ${1:-200} ms until mem_watch_stop.
mem_watch_start() {
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms "${1:-200}" > /tmp/mem.log &
  MEM_WATCH=$!
}

# Stops the sampler and prints the largest sample (MiB) of any GPU.
mem_watch_stop() {
  kill "$MEM_WATCH" 2>/dev/null
  wait "$MEM_WATCH" 2>/dev/null
  sort -n /tmp/mem.log | tail -1
}
