#!/usr/bin/env bash
# Installs every build, test and benchmark dependency of fmwire from Debian 12
# packages. Safe to run any number of times: when everything is present it
# touches nothing and asks no mirror.
set -euo pipefail

packages=(
  # build
  g++ meson ninja-build pkg-config python3
  # tests: the install test builds examples/ out of tree with CMake
  # (find_package(fmwire)), as well as with pkg-config; readelf and nm (binutils)
  # check the installed library's soname and exports
  cmake binutils
  # libraries (Boost 1.81 for Asio, Beast, JSON, program_options)
  libboost1.81-dev libboost-json1.81-dev libboost-program-options1.81-dev
  capnproto libcapnp-dev liburing-dev libzstd-dev libxxhash-dev
  # OpenSSL 3: the gateway's API key hashes, stream ids and HTTPS; the
  # openssl command makes the HTTPS tests' certificates and runs s_client
  libssl-dev openssl
  # logging: spdlog (on Debian's fmt), one log for every process (log/log.h)
  libspdlog-dev
  # tests: doctest, clang's libFuzzer runtime for the decoder fuzzer
  doctest-dev clang libclang-rt-14-dev
  # tests: a real etcd (3.4) for the gateway's discovery tests
  etcd-server etcd-client
  # tests: real HTTP clients of the gateway (curl; Node for OpenAI's SDK)
  curl nodejs
  # tests: promtool checks the gateway's /metrics page (Debian's prometheus)
  prometheus
  # tests: the instruction-count gate (callgrind, and callgrind.h for
  # bench/instruction_gate's counted regions)
  valgrind
  # benchmarks only: protobuf is the peer format in bench/codec; gRPC and
  # iperf3 are the peers of bench/transport
  libprotobuf-dev protobuf-compiler
  libgrpc++-dev protobuf-compiler-grpc iperf3
  # charts from result files (scripts/plot.py)
  python3-matplotlib
  # the Python module fmwire (python/): pybind11 and CPython's headers for
  # Debian's python3; its tests run under Debian's pytest
  pybind11-dev python3-dev python3-pytest
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed'; then
    missing+=("$package")
  fi
done

# npm: Debian's package, unless a Node.js from elsewhere (NodeSource's
# nodejs provides npm and conflicts with Debian's) brings it already.
if ! command -v npm >/dev/null 2>&1; then
  missing+=(npm)
fi

if ((${#missing[@]} > 0)); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing packages: ${missing[*]}; run this script as root to install them" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# CUDA is optional: the build uses nvcc (/usr/local/cuda/bin or PATH) when its
# toolkit also has the CUDA runtime and cuBLAS; meson's summary says which.
if command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]]; then
  echo "setup: nvcc present; meson's summary says whether the CUDA backend is built"
else
  echo "setup: no nvcc; CUDA parts will not be built"
fi
echo "setup: all dependencies present"
