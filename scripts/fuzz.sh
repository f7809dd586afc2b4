#!/usr/bin/env bash
# Fuzzes the frame decoder for a bounded time under ASan and UBSan.
#   scripts/fuzz.sh [SECONDS]   (default 300)
# Builds with clang into build-fuzz, seeds a corpus from the encoder, runs
# libFuzzer, and exits non-zero on any crash or sanitizer report. The number
# of executions is in libFuzzer's last lines ("Done N runs in S second(s)").
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-300}
build=build-fuzz

if [[ ! -d $build ]]; then
  CXX=clang++ meson setup "$build" -Dfuzzing=true -Dtests=false -Dbenchmarks=false \
    -Dbuildtype=debugoptimized -Db_sanitize=address,undefined -Db_lundef=false >/dev/null
fi
ninja -C "$build" tests/fuzz/frame_decoder_fuzz tests/fuzz/frame_corpus_writer >/dev/null

corpus=$build/corpus
mkdir -p "$corpus"
"$build/tests/fuzz/frame_corpus_writer" "$corpus"

export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
# -rss_limit_mb bounds memory; -max_len lets whole frames with attachments in.
"$build/tests/fuzz/frame_decoder_fuzz" "$corpus" -max_total_time="$seconds" -max_len=65536 \
  -rss_limit_mb=2048 -timeout=10 -artifact_prefix="$build/" -print_final_stats=1 2>"$build/fuzz.log" || {
  tail -60 "$build/fuzz.log"
  echo "fuzz: the frame decoder failed; the crashing input is named above"
  exit 1
}
grep -E "^Done|stat::number_of_executed_units|stat::peak_rss_mb" "$build/fuzz.log" || true
echo "fuzz: frame decoder survived ${seconds}s under ASan+UBSan"
