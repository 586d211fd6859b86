#!/usr/bin/env bash
# Build the CUDA binary here (no GPU needed) into .devbuild/bin for the device `run` tool to carry.
# Usage: scripts/device/build.sh            (from the repository root)
# Uses one CUDA target dir per machine so candle's kernel build (~7 min) happens once.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mbridge-target-cuda}"
shared="${MBRIDGE_SHARED:-../shared}"
[ -x "$shared/device/build-cuda.sh" ] || { echo "error: $shared/device/build-cuda.sh not found (set MBRIDGE_SHARED)" >&2; exit 2; }
bash "$shared/device/build-cuda.sh" --bin mbridge "$@"
# The binary (~63 MiB) plus the working tree exceeds the device's 64 MiB carry limit:
# also leave a gzip -9 copy (~16 MiB) with env.sh in .devbuild/gz; carry that folder and
# run `scripts/device/unpack.sh` there first (scripts/bench/gpu_train.sh does it itself).
mkdir -p .devbuild/gz
gzip -9 -c .devbuild/bin/mbridge > .devbuild/gz/mbridge.gz
cp -f .devbuild/bin/env.sh .devbuild/gz/env.sh
ls -la .devbuild/bin/ .devbuild/gz/
