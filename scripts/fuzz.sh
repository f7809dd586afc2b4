#!/usr/bin/env bash
# Fuzzes fmwire's parsers for a bounded time each under ASan and UBSan.
#   scripts/fuzz.sh [SECONDS] [TARGET...]   (default 300 s, every target)
#   scripts/fuzz.sh --list                  the targets, one a line
#   scripts/fuzz.sh --build                 builds every target, runs none
# Builds with clang into build-fuzz and runs each target's libFuzzer binary
# for SECONDS, from its seeds (the frame decoder's written by
# frame_corpus_writer, the others' checked in under tests/fuzz/corpus/);
# what it finds goes to build-fuzz/corpus-TARGET. Exits non-zero when any
# target crashes or a sanitizer reports; the crashing input is kept in
# build-fuzz/. The executions are in libFuzzer's last lines ("Done N runs in
# S second(s)"), printed for each target.
set -euo pipefail
cd "$(dirname "$0")/.."

# TARGET, libFuzzer's -max_len for it, then any other libFuzzer options.
targets=(
  "frame_decoder 65536"      # a receive buffer: whole frames with attachments
  "openai_request 16384"     # a request body (JSON)
  "http_request 16384"       # what a client sends: request line, headers, body
  "websocket_message 16384"  # WebSocket frames after the upgrade
  # A KV session peer's steps (worker/kv_transfers.h): ~60 runs a second,
  # too few for libFuzzer's slow growth of input lengths (it would stay
  # under 40 bytes, a dozen steps, for minutes): whole lengths at once.
  "kv_session 512 -len_control=0"
)
if [[ ${1:-} == --list ]]; then
  for entry in "${targets[@]}"; do echo "${entry%% *}"; done
  exit 0
fi
build_only=
if [[ ${1:-} == --build ]]; then
  build_only=1
  shift
fi
seconds=${1:-300}
shift || true
wanted=("$@")
if [[ ${#wanted[@]} -eq 0 ]]; then
  for entry in "${targets[@]}"; do wanted+=("${entry%% *}"); done
fi

build=build-fuzz
# -O1 with line tables only: what libFuzzer's documentation builds with, and
# a cold build of the gateway for the fuzz stage in about 4/5 of -O2 -g's time
# (gateway/websocket_sink.cpp: 207 s against 268 s).
if [[ ! -d $build ]]; then
  CXX=clang++ meson setup "$build" -Dfuzzing=true -Dtests=false -Dbenchmarks=false \
    -Dbuildtype=debugoptimized -Doptimization=1 -Dcpp_args=-gline-tables-only \
    -Db_sanitize=address,undefined -Db_lundef=false >/dev/null
fi
if [[ -n $build_only ]]; then
  outputs=(tests/fuzz/frame_corpus_writer)
  for entry in "${targets[@]}"; do outputs+=("tests/fuzz/${entry%% *}_fuzz"); done
  exec ninja -C "$build" "${outputs[@]}"
fi

export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1

# Runs one target; non-zero when it found something.
fuzz() {
  local target=$1 max_len=$2
  shift 2
  local corpus=$build/corpus-$target log=$build/fuzz-$target.log
  local seeds=tests/fuzz/corpus/$target
  mkdir -p "$corpus"
  # One ninja at a time in the build folder: test.sh runs two targets at once.
  if [[ $target == frame_decoder ]]; then
    flock "$build/.fuzz-build.lock" ninja -C "$build" tests/fuzz/frame_decoder_fuzz tests/fuzz/frame_corpus_writer \
      >/dev/null || return 1
    seeds=$build/corpus-frame_decoder-seeds
    mkdir -p "$seeds"
    "$build/tests/fuzz/frame_corpus_writer" "$seeds" || return 1
  else
    flock "$build/.fuzz-build.lock" ninja -C "$build" "tests/fuzz/${target}_fuzz" >/dev/null || return 1
  fi
  # New inputs go to the first folder, never into the checked-in seeds;
  # -rss_limit_mb bounds memory.
  if ! "$build/tests/fuzz/${target}_fuzz" "$corpus" "$seeds" -max_total_time="$seconds" -max_len="$max_len" \
    -rss_limit_mb=2048 -timeout=10 -artifact_prefix="$build/$target-" -print_final_stats=1 "$@" 2>"$log"; then
    tail -60 "$log"
    echo "fuzz: $target failed; the crashing input is named above"
    return 1
  fi
  grep -E "^Done|stat::number_of_executed_units|stat::peak_rss_mb" "$log" || true
  echo "fuzz: $target survived ${seconds}s under ASan+UBSan"
}

failed=0
for target in "${wanted[@]}"; do
  found=
  for entry in "${targets[@]}"; do
    [[ ${entry%% *} == "$target" ]] && found=$entry
  done
  if [[ -z $found ]]; then
    echo "fuzz: no target $target (scripts/fuzz.sh --list)"
    failed=1
    continue
  fi
  # shellcheck disable=SC2086  # the entry's words: name, -max_len, options
  fuzz $found || failed=1
done
exit "$failed"
