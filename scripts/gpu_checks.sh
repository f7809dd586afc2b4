#!/usr/bin/env bash
# The checks that need a GPU, run on a machine that has one but none of the
# build's dependencies: programs built elsewhere, with their shared
# libraries, are packed into a folder (`pack`), and that folder is run where
# the GPU is (`run`). CI has no GPU; these cases are skipped there.
#
#   scripts/gpu_checks.sh pack BUILD_DIR PACK_DIR   # here, after ninja
#   scripts/gpu_checks.sh run PACK_DIR [OUT_DIR]    # on the GPU machine
set -uo pipefail

pack() {
  local build=$1 pack=$2
  rm -rf "$pack" && mkdir -p "$pack/bin" "$pack/lib" "$pack/libcxx"
  cp "$build/cli/fmwire" "$build/tests/engine_tests" "$build/bench/bench_engine_cuda" \
     "$build/engine/cuda/libfmwire_engine_cuda.so" "$pack/bin/"
  # Every library the programs need except glibc's, the C++ runtime (kept
  # apart: used only where the machine's own is older) and CUDA's (the GPU
  # machine has its own, matching its driver).
  ldd "$pack"/bin/* | awk '/=> \// {print $3}' | sort -u | while read -r lib; do
    case $(basename "$lib") in
      libc.so*|libm.so*|libpthread*|libdl*|librt*|ld-linux*|libgcc_s*) ;;
      libcuda*|libcublas*) ;;
      libstdc++*) cp -L "$lib" "$pack/libcxx/" ;;
      *) cp -L "$lib" "$pack/lib/" ;;
    esac
  done
  du -sh "$pack"
}

run() {
  local pack
  pack=$(realpath "$1")
  local out=${2:-/tmp/gpu-checks}
  mkdir -p "$out"
  local cublas
  cublas=$(find / -xdev -name 'libcublas.so.13' -not -path '*/proc/*' 2>/dev/null | head -1)
  export LD_LIBRARY_PATH="$pack/bin:$pack/lib:$(dirname "${cublas:-/usr/local/cuda/lib64/x}"):/usr/local/cuda/lib64"
  if ! "$pack/bin/fmwire" version >/dev/null 2>&1; then
    export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$pack/libcxx"
  fi
  export FMWIRE_CUDA_MODULE="$pack/bin/libfmwire_engine_cuda.so"
  local failed=0
  step() {
    echo "=== $*"
    local started=$SECONDS
    "$@" || { echo "!!! FAILED ($?): $*"; failed=$((failed + 1)); }
    echo "=== $((SECONDS - started)) s"
  }
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  step "$pack/bin/fmwire" version
  step "$pack/bin/engine_tests" --source-file='*cuda_backend_test*' --duration=true
  step "$pack/bin/engine_tests"
  step python3 tests/system/worker_cli_test.py "$pack/bin/fmwire" uring device_cuda
  step python3 tests/system/disaggregation_cli_test.py "$pack/bin/fmwire" uring cuda_matches_colocated
  step "$pack/bin/bench_engine_cuda" --quick --json "$out/engine_cuda.json"
  if command -v compute-sanitizer >/dev/null; then
    step timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 \
      "$pack/bin/engine_tests" --source-file='*cuda_backend_test*'
  fi
  echo "gpu checks: $failed failed"
  return $((failed > 0))
}

case ${1:-} in
  pack) pack "$2" "$3" ;;
  run) run "$2" "${3:-}" ;;
  *) echo "usage: $0 pack BUILD_DIR PACK_DIR | run PACK_DIR [OUT_DIR]" >&2; exit 2 ;;
esac
