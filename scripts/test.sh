#!/usr/bin/env bash
# Sets up, builds and runs every fmwire test; the last line is
# "N passed, N failed, N skipped", counting test cases, and the exit code is non-zero on
# any failure. Five runs:
#   release     the normal build, warnings as errors
#   sanitized   the same tests under AddressSanitizer + UndefinedBehaviorSanitizer
#   tsan        the same tests under ThreadSanitizer, less the slowest (see
#               tests/meson.build: 'worker kv transfer' and the engine's
#               slowest cases), and one more case: no ThreadSanitizer report
#               from any process, the system tests' servers included
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

# Each stage's heading says how far into the run it starts, so that a CI
# log shows where the 45 minutes went.
stage() { printf '== %s (at %dm%02ds)\n' "$1" $((SECONDS / 60)) $((SECONDS % 60)); }

configure() {
  local dir=$1
  shift
  if [[ -d $dir ]]; then
    meson setup --reconfigure "$dir" "$@" >"$dir.configure.log" 2>&1
  else
    meson setup "$dir" "$@" >"$dir.configure.log" 2>&1
  fi || { cat "$dir.configure.log"; return 1; }
}

# Configures and builds one configuration; ninja's output goes to
# DIR.build.log, whose end is printed (all of its last 150 lines when the
# build fails).
build() {
  local dir=$1
  shift
  configure "$dir" -Dwerror=true "$@" || return 1
  if ! ninja -C "$dir" >"$dir.build.log" 2>&1; then
    tail -150 "$dir.build.log"
    echo "$dir: the build failed"
    return 1
  fi
  tail -1 "$dir.build.log"
}

# The next build starts in the background, at the lowest priority, while a
# test stage runs: the tests leave much of the CPU idle (sleeping system
# tests, waits on I/O: 40-50% idle in the ASan stage), and a niced build
# takes only that, giving way whenever a test wants the CPU. START DIR ARGS
# sets $building; finish_build DIR waits for it and prints what it said.
start_build() {
  local dir=$1
  ( renice -n 19 -p $BASHPID >/dev/null; build "$@" ) >"$dir.stage.log" 2>&1 &
  building=$!
}
finish_build() {
  local dir=$1 status=0
  wait "$building" || status=$?
  cat "$dir.stage.log"
  return $status
}

# Runs one built configuration's tests; leaves its meson test log behind.
run_tests() {
  stage "$1: test"
  meson test -C "$1" --print-errorlogs --num-processes 2 || true
}

results=()
stage "build-release: build"
release_built=0
build build-release -Dbuildtype=release || release_built=1
# Line tables only (-g1) in the sanitizer builds: the reports' file:line,
# at four fifths of the compile time of full debug information (137 s
# against 111 s for gateway/websocket_sink.cpp under TSan).
start_build build-sanitized -Dbuildtype=debug -Dcpp_args=-g1 -Db_sanitize=address,undefined -Dbenchmarks=false
((release_built == 0)) && run_tests build-release
results+=("release=build-release/meson-logs/testlog.json")

stage "build-sanitized: build (begun in the background)"
sanitized_built=0
finish_build build-sanitized || sanitized_built=1
start_build build-tsan -Dbuildtype=debugoptimized -Dcpp_args=-g1 -Db_sanitize=thread -Dbenchmarks=false -Dcuda=disabled
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
((sanitized_built == 0)) && run_tests build-sanitized
results+=("sanitized=build-sanitized/meson-logs/testlog.json")

stage "build-tsan: build (begun in the background)"
tsan_built=0
finish_build build-tsan || tsan_built=1
# The fuzz targets' clang build, likewise, while the TSan tests run.
( renice -n 19 -p $BASHPID >/dev/null; bash scripts/fuzz.sh --build ) >build-fuzz.stage.log 2>&1 &
fuzz_building=$!
# Every process writes its reports to build-tsan.reports/report.PID (the
# system tests' servers too, whose exit codes a test may not read); any
# report is a failure. Suppressions: scripts/tsan.supp (third-party code only).
rm -rf build-tsan.reports
mkdir -p build-tsan.reports
export TSAN_OPTIONS="halt_on_error=0:second_deadlock_stack=1:suppressions=$PWD/scripts/tsan.supp:log_path=$PWD/build-tsan.reports/report"
((tsan_built == 0)) && run_tests build-tsan
results+=("tsan=build-tsan/meson-logs/testlog.json")
unset TSAN_OPTIONS
tsan_reports=(build-tsan.reports/report.*)
if [[ -e ${tsan_reports[0]} ]]; then
  echo "== tsan: ${#tsan_reports[@]} processes reported"
  for report in "${tsan_reports[@]}"; do grep -m1 -A40 'WARNING: ThreadSanitizer' "$report"; done
  results+=("tsan reports=1")
else
  results+=("tsan reports=0")
fi

stage "fuzz: build (begun in the background)"
wait "$fuzz_building" || true  # a target that did not build fails its own case below
cat build-fuzz.stage.log

# One case per fuzz target, each its own run of scripts/fuzz.sh, two at a
# time: libFuzzer runs on one thread, so each of two targets side by side
# has a core of its own for its whole time, as it would alone.
mapfile -t fuzz_targets < <(bash scripts/fuzz.sh --list)
mkdir -p build-fuzz
for ((i = 0; i < ${#fuzz_targets[@]}; i += 2)); do
  pair=("${fuzz_targets[@]:i:2}")
  stage "fuzz ${pair[*]}"
  pids=()
  for target in "${pair[@]}"; do
    bash scripts/fuzz.sh "${FMWIRE_FUZZ_SECONDS:-30}" "$target" >"build-fuzz/run-$target.out" 2>&1 &
    pids+=($!)
  done
  for j in "${!pair[@]}"; do
    status=0
    wait "${pids[j]}" || status=$?
    echo "-- fuzz ${pair[j]}"
    cat "build-fuzz/run-${pair[j]}.out"
    results+=("fuzz ${pair[j]}=$status")
  done
done

stage "instruction gate"
gate_results=build-release/instruction-gate.json
rm -f "$gate_results"
python3 scripts/instruction_gate.py --build build-release --results "$gate_results"
results+=("instructions=$gate_results")

# The chaos soak: clients streaming while processes die and links fail; one
# case, failed by any wrong, hung or leaked request (its last line says).
stage "soak"
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
stage "summary"
python3 scripts/summarize_tests.py "${checked[@]}"
