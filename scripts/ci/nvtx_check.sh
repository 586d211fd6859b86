#!/usr/bin/env bash
# NVTX ranges reach a profiler the way they reach Nsight Systems, on the CPU:
#   1. installs NVIDIA's `nvidia-nvtx` wheel (CUDA 13's libnvtx3interop.so.1 + nvtx3 headers,
#      the same wheel PyTorch brings to the GPU machine) into a cache;
#   2. compiles a stand-in tool (~20 lines of C) that registers itself through NVTX's injection
#      interface (NVTX_INJECTION64_PATH + InitializeInjectionNvtx2, as nsys does) and writes
#      every push/pop to a file;
#   3. runs `mbridge pretrain` (tiny_llama, 2 iterations, profiling.nvtx_ranges=true, the
#      GPU's written-out layers) with it and checks the nesting: iteration > forward-backward
#      > each micro-batch's forward > layer i forward and its backward > layer i backward
#      (last layer first), then grad-reduce-and-clip and optimizer, for both iterations.
# Prints a SKIPPED block and exits 0 only where the wheel or a C compiler cannot be had.
# Uses $MBRIDGE_BIN or <target>/debug/mbridge (built by `cargo test` / `cargo build`).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)

skip() {
  echo
  echo "############################################################"
  echo "# SKIPPED: NVTX check: $*"
  echo "############################################################"
  echo
  exit 0
}

bin=${MBRIDGE_BIN:-${CARGO_TARGET_DIR:-$repo/target}/debug/mbridge}
[[ -x $bin ]] || (cd "$repo" && cargo build --bin mbridge)
command -v cc >/dev/null || skip "no C compiler (cc) for the stand-in tool"
cache=${MBRIDGE_NVTX_CACHE:-$HOME/.cache/mbridge-nvtx}
nvtx=$cache/nvidia/cu13
if [[ ! -f $nvtx/lib/libnvtx3interop.so.1 ]]; then
  python3 -m pip install -q --disable-pip-version-check --no-deps --target "$cache" \
    "nvidia-nvtx==13.0.85" || skip "cannot install the nvidia-nvtx wheel from PyPI"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/tool.c" <<'EOF'
#include <stdio.h>
#include <stdlib.h>
#include "nvtx3/nvToolsExt.h"
static FILE* out;
static int depth;
static int push(const char* m) { fprintf(out, "%*s%s\n", depth * 2, "", m); return depth++; }
static int pop(void) { return --depth; }
/* Called by the NVTX library on the first NVTX call: claim RangePushA and RangePop. */
int InitializeInjectionNvtx2(NvtxGetExportTableFunc_t get) {
  const NvtxExportTableCallbacks* cb = (const NvtxExportTableCallbacks*)get(NVTX_ETID_CALLBACKS);
  NvtxFunctionTable t;
  unsigned int n;
  if (!(out = fopen(getenv("NVTX_CHECK_OUT"), "w"))) return 0;
  if (!cb->GetModuleFunctionTable(NVTX_CB_MODULE_CORE, &t, &n)) return 0;
  *t[NVTX_CBID_CORE_RangePushA] = (NvtxFunctionPointer)push;
  *t[NVTX_CBID_CORE_RangePop] = (NvtxFunctionPointer)pop;
  return 1;
}
EOF
cc -shared -fPIC -I"$nvtx/include" -o "$work/libtool.so" "$work/tool.c"

(cd "$work" && NVTX_INJECTION64_PATH="$work/libtool.so" NVTX_CHECK_OUT="$work/ranges.txt" \
  MBRIDGE_NVTX_LIBRARY="$nvtx/lib/libnvtx3interop.so.1" MBRIDGE_EXPLICIT_LAYERS=1 \
  "$bin" pretrain --recipe tiny_llama train.train_iters=2 validation.eval_iters=0 \
  profiling.nvtx_ranges=true >"$work/log.txt" 2>&1) || { cat "$work/log.txt" >&2; exit 1; }

expected=$(for i in 1 2; do
  printf 'iteration %s\n  forward-backward\n' "$i"
  # tiny_llama: 2 micro-batches per step, 2 layers each.
  for m in 0 1; do
    printf '    chunk 0 micro-batch %s forward\n      layer 0 forward\n      layer 1 forward\n' "$m"
    printf '    chunk 0 micro-batch %s backward\n      layer 1 backward\n      layer 0 backward\n' "$m"
  done
  printf '  grad-reduce-and-clip\n  optimizer\n'
done)
if [[ "$(cat "$work/ranges.txt")" != "$expected" ]]; then
  echo "NVTX CHECK FAILED: ranges seen by the tool:" >&2
  cat "$work/ranges.txt" >&2
  echo "---- expected:" >&2
  echo "$expected" >&2
  echo "---- mbridge log:" >&2
  cat "$work/log.txt" >&2
  exit 1
fi
grep -q "NVTX ranges go through" "$work/log.txt" || { cat "$work/log.txt" >&2; exit 1; }
echo "NVTX check passed: $(wc -l <"$work/ranges.txt") ranges reached the injected tool"
