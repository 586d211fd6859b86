#!/usr/bin/env bash
# On the device: unpack the carried .devbuild/gz (see build.sh) into .devbuild/bin, unless an
# uncompressed binary was carried. Usage: source-free, `scripts/device/unpack.sh` from the root.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -x .devbuild/bin/mbridge ]; then exit 0; fi
[ -f .devbuild/gz/mbridge.gz ] || { echo "error: neither .devbuild/bin/mbridge nor .devbuild/gz/mbridge.gz was carried" >&2; exit 2; }
mkdir -p .devbuild/bin
gunzip -c .devbuild/gz/mbridge.gz > .devbuild/bin/mbridge
chmod +x .devbuild/bin/mbridge
cp -f .devbuild/gz/env.sh .devbuild/bin/env.sh
