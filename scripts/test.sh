#!/usr/bin/env bash
# Sets up, builds and runs every fmwire test; the last line is
# "N passed, N failed, N skipped", counting test cases, and the exit code is non-zero on
# any failure. Four runs:
#   release     the normal build, warnings as errors
#   sanitized   the same tests under AddressSanitizer + UndefinedBehaviorSanitizer
#   fuzz        each libFuzzer target (scripts/fuzz.sh --list) for a bounded
#               time (FMWIRE_FUZZ_SECONDS, default 30 each; scripts/fuzz.sh
#               runs them longer), one counted case per target
#   instructions  the hot paths' instruction counts under callgrind against
#               bench/instruction_baseline.json (scripts/instruction_gate.py),
#               one test case per workload, with the release build's program
#   soak        the chaos soak (scripts/soak.sh) for 3 minutes with the release
#               build: one counted case
set -uo pipefail
cd "$(dirname "$0")/.."

if ! bash scripts/setup.sh; then
  echo "setup failed"
  echo "0 passed, 1 failed, 0 skipped"
  exit 1
fi

# OpenAI's Node SDK for the gateway's system tests, at the version pinned in
# tests/system/node/package-lock.json; fetched once, from the npm registry.
if [[ ! -d tests/system/node/node_modules/openai ]]; then
  echo "== npm ci --prefix tests/system/node"
  npm ci --prefix tests/system/node --no-audit --no-fund ||
    echo "npm ci failed: the gateway's OpenAI SDK tests will fail"
fi

configure() {
  local dir=$1
  shift
  if [[ -d $dir ]]; then
    meson setup --reconfigure "$dir" "$@" >"$dir.configure.log" 2>&1
  else
    meson setup "$dir" "$@" >"$dir.configure.log" 2>&1
  fi || { cat "$dir.configure.log"; return 1; }
}

# Builds and runs one configuration; leaves its meson test log behind.
run_suite() {
  local dir=$1
  shift
  echo "== $dir: build"
  configure "$dir" -Dwerror=true "$@" || return 1
  ninja -C "$dir" || return 1
  echo "== $dir: test"
  meson test -C "$dir" --print-errorlogs --num-processes 2 || true
}

results=()
run_suite build-release -Dbuildtype=release
results+=("release=build-release/meson-logs/testlog.json")

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
run_suite build-sanitized -Dbuildtype=debug -Db_sanitize=address,undefined -Dbenchmarks=false
results+=("sanitized=build-sanitized/meson-logs/testlog.json")

# One case per fuzz target, each its own run of scripts/fuzz.sh.
for target in $(bash scripts/fuzz.sh --list); do
  echo "== fuzz $target"
  bash scripts/fuzz.sh "${FMWIRE_FUZZ_SECONDS:-30}" "$target"
  results+=("fuzz $target=$?")
done

echo "== instruction gate"
gate_results=build-release/instruction-gate.json
rm -f "$gate_results"
python3 scripts/instruction_gate.py --build build-release --results "$gate_results"
results+=("instructions=$gate_results")

# The chaos soak: clients streaming while processes die and links fail; one
# case, failed by any wrong, hung or leaked request (its last line says).
echo "== soak"
FMWIRE_BINARY=build-release/cli/fmwire bash scripts/soak.sh --minutes 3
results+=("soak=$?")

# A suite that did not build leaves no log: count it as one failure.
checked=()
for result in "${results[@]}"; do
  value=${result#*=}
  if [[ $value == *.json && ! -f $value ]]; then
    checked+=("${result%%=*}=1")
  else
    checked+=("$result")
  fi
done
echo "== summary"
python3 scripts/summarize_tests.py "${checked[@]}"
