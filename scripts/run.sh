#!/usr/bin/env bash
# Sets up, builds and runs fmwire's main job. Until the gateway issue brings
# `fmwire up`, that is `fmwire demo`: a token stream and a KV transfer encoded
# as frames and decoded again from a byte stream.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [[ ! -d build ]]; then
  meson setup build -Dbuildtype=release >/dev/null
fi
ninja -C build cli/fmwire >/dev/null
exec ./build/cli/fmwire demo "$@"
