#!/usr/bin/env bash
# Sets up, builds and runs fmwire's main job: `fmwire up`, the OpenAI-
# compatible gateway, a router and two workers with the built-in model on
# http://127.0.0.1:8000. It streams a demo completion, then serves until
# Ctrl-C. Arguments go to `fmwire up` (--port, --workers, --model, --no-demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [[ ! -d build ]]; then
  meson setup build -Dbuildtype=release >/dev/null
fi
ninja -C build cli/fmwire >/dev/null
exec ./build/cli/fmwire up "$@"
