#!/usr/bin/env bash
# Chaos soak (issue 17): scripts/soak.sh [--minutes N] [soak.py's other options]
# Runs scripts/soak.py against the release build (build-release/cli/fmwire,
# or FMWIRE_BINARY); default 10 minutes, CI runs it for 3. Its last line:
#   soak: N requests, N exact, N retryable errors, 0 wrong, 0 hung, 0 leaked
# Exit code 0 when nothing was wrong, hung or leaked.
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/soak.py --fmwire "${FMWIRE_BINARY:-build-release/cli/fmwire}" "$@"
