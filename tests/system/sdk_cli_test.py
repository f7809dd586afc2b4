#!/usr/bin/env python3
"""The C++ SDK as an application developer gets it (issue 18).

    sdk_cli_test.py example FMWIRE_BINARY PROGRAM
        runs an example of examples/ against `fmwire worker` (builtin model)
    sdk_cli_test.py openai FMWIRE_BINARY SCRIPT
        runs examples/openai_sdk.mjs (OpenAI's Node SDK) against `fmwire up`
    sdk_cli_test.py install BUILD_DIR SOURCE_DIR SANITIZE
        `meson install --no-rebuild --destdir` into a temporary folder, then
        builds examples/ out of tree against it with pkg-config (g++) and with
        CMake (find_package), and runs them against the installed `fmwire
        worker`. SANITIZE is the build's b_sanitize: an instrumented
        libfmwire needs its sanitizers' runtimes first in the program, so
        the examples are built with the same -fsanitize (never skipped).

Free ports only; every process started is killed on the way out, and the
temporary folder removed.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from native_cli_test import LIMIT_S, Failure, Server, check
from gateway_cli_test import install_openai_package, up

SKIPPED = 77
# Examples that need a worker's address, and those that bring their own.
WORKER_EXAMPLES = ["stream_tokens", "pull_tokens", "cancel", "watch_load"]
STANDALONE_EXAMPLES = ["custom_engine", "kv_transfer"]
BUILD_LIMIT_S = 300  # compiling against Cap'n Proto's headers, under the sanitizers too


def run_example(program, *arguments, env=None):
    result = subprocess.run([program, *arguments], capture_output=True, text=True, timeout=3 * LIMIT_S, env=env)
    check(result.returncode == 0,
          f"{os.path.basename(program)} exit {result.returncode}:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return result.stdout


def example(binary, program):
    worker = Server(binary, dict(os.environ), "worker", "--model", "builtin")
    try:
        output = run_example(program, worker.endpoint)
        check(output.strip(), f"{program} printed nothing")
        print(output, end="")
        check(worker.stop() == 0, "the worker did not stop cleanly")
    finally:
        worker.kill()


def openai(binary, script):
    install_openai_package()
    server = up(binary, dict(os.environ), "--no-demo")
    try:
        result = subprocess.run(["node", script, server.url + "/v1"], capture_output=True, text=True,
                                timeout=3 * LIMIT_S)
        check(result.returncode == 0, f"node {script}: exit {result.returncode}:\n{result.stdout}{result.stderr}")
        check("[stop]" in result.stdout or "[length]" in result.stdout, f"no finish reason: {result.stdout!r}")
        code, _, errors = server.stop()
        check(code == 0, f"fmwire up exit {code}: {errors[-1000:]!r}")
    finally:
        server.kill()


def run(arguments, what, env=None, cwd=None, timeout=BUILD_LIMIT_S):
    result = subprocess.run(arguments, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    check(result.returncode == 0, f"{what}: exit {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result.stdout


def one(pattern, what):
    found = glob.glob(pattern, recursive=True)
    check(len(found) == 1, f"{what}: {found} for {pattern}")
    return found[0]


def check_installed_tree(root, build_dir):
    """What `meson install` put under `root` (the destdir): the library with
    its soname, the public headers and none of the internal ones, the
    pkg-config and CMake files, the binary and the CUDA module."""
    library = one(f"{root}/**/libfmwire.so.*.*.*", "the versioned library")
    libdir = os.path.dirname(library)
    check(os.path.islink(os.path.join(libdir, "libfmwire.so")), "no libfmwire.so link for -lfmwire")
    dynamic = run(["readelf", "-d", library], "readelf -d")
    check(re.search(r"\(SONAME\)\s+Library soname: \[libfmwire\.so\.0\]", dynamic), f"soname: {dynamic}")
    # Only fmwire's own names leave the library: no spdlog, fmt or Boost.
    symbols = run(["nm", "-DC", "--defined-only", library], "nm -DC")
    foreign = [line for line in symbols.splitlines()
               if not re.search(r" (fmwire::|typeinfo (name )?for fmwire::|vtable for fmwire::|VTT for fmwire::|"
                                r"(non-)?virtual thunk to fmwire::|guard variable for fmwire::|capnp::schemas::|"
                                r"FMWIRE_|LIBFMWIRE|Base)", line)]
    check(not foreign, f"{len(foreign)} symbols exported that are not fmwire's, e.g. {foreign[:5]}")

    include = one(f"{root}/**/include/fmwire", "the headers' folder")
    for header in ("transport/client.h", "transport/token_stream.h", "engine/engine.h", "engine/engine_without_kv.h",
                   "engine/model_loader.h", "worker/engine_server.h", "protocol/fmwire.capnp.h"):
        check(os.path.isfile(os.path.join(include, header)), f"{header} not installed")
    for internal in ("router", "gateway", "discovery", "perf", "cli", "log", "metrics"):
        check(not os.path.exists(os.path.join(include, internal)), f"internal headers installed: {internal}/")
    # The layers behind the Client's and the EngineServer's pimpls.
    for internal in ("transport/connection.h", "transport/server.h", "transport/event_loop.h",
                     "transport/io_backend.h", "codec/frame_decoder.h", "codec/frame_encoder.h",
                     "engine/batching_engine.h", "worker/worker_service.h", "worker/kv_transfers.h",
                     "protocol/load_report.h"):
        check(not os.path.exists(os.path.join(include, internal)), f"internal header installed: {internal}")
    for header in glob.glob(f"{include}/**/*.h", recursive=True):
        if header.endswith(".capnp.h"):
            continue  # generated: it says so in its first line
        with open(header) as text:
            check(text.readline().startswith("// "), f"{header} does not open with what it is for")

    pc_file = one(f"{root}/**/pkgconfig/fmwire.pc", "fmwire.pc")
    config = one(f"{root}/**/cmake/fmwire/fmwireConfig.cmake", "fmwireConfig.cmake")
    one(f"{root}/**/cmake/fmwire/fmwireConfigVersion.cmake", "fmwireConfigVersion.cmake")
    binary = one(f"{root}/**/bin/fmwire", "the fmwire binary")

    # The CUDA module, where the build has one: in <libdir>/fmwire, and the
    # installed binary finds it there (not in the build folder).
    version = run([binary, "version"], "fmwire version")
    built_module = os.path.join(build_dir, "engine/cuda/libfmwire_engine_cuda.so")
    if os.path.exists(built_module):
        module = os.path.join(libdir, "fmwire", "libfmwire_engine_cuda.so")
        check(os.path.isfile(module), f"the CUDA module is not in {libdir}/fmwire")
        check(f"CUDA module: {os.path.realpath(module)}" in version or f"CUDA module: {module}" in version,
              f"the installed binary does not find its CUDA module: {version!r}")
    else:
        check("CUDA module: not built" in version, f"fmwire version: {version!r}")
    return libdir, include, os.path.dirname(pc_file), os.path.dirname(config), binary


def install(build_dir, source_dir, sanitize):
    examples = os.path.join(source_dir, "examples")
    sanitizers = [] if sanitize in ("", "none") else [f"-fsanitize={sanitize}"]
    root = tempfile.mkdtemp(prefix="fmwire-install-")
    worker = None
    try:
        run(["meson", "install", "-C", build_dir, "--no-rebuild", "--quiet", "--destdir", root], "meson install")
        libdir, include, pc_dir, cmake_dir, binary = check_installed_tree(root, build_dir)
        print(f"installed into {root}: library, headers, pkg-config, CMake and binary checked")
        env = dict(os.environ, PKG_CONFIG_PATH=pc_dir)
        env.pop("PKG_CONFIG_LIBDIR", None)
        flags = run(["pkg-config", "--cflags", "--libs", "fmwire"], "pkg-config", env=env).split()
        include_flags = [os.path.realpath(flag[2:]) for flag in flags if flag.startswith("-I")]
        check(os.path.realpath(include) in include_flags, f"pkg-config's -I is not the installed tree: {flags}")

        # Out of tree with pkg-config: every installed header on its own
        # include path (none missing), then each example.
        work = os.path.join(root, "work")
        os.makedirs(os.path.join(work, "cmake"))
        every_header = os.path.join(work, "every_header.cpp")
        with open(every_header, "w") as source:
            for header in sorted(glob.glob(f"{include}/**/*.h", recursive=True)):
                source.write(f'#include "{os.path.relpath(header, include)}"\n')
        run(["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", every_header] + flags,
            "every installed header, alone", env=env)
        built = {}
        for name in WORKER_EXAMPLES + STANDALONE_EXAMPLES:
            output = os.path.join(work, name)
            run(["g++", "-std=c++20", "-Wall", "-Wextra", "-Werror", *sanitizers, os.path.join(examples, name + ".cpp"),
                 "-o", output, *flags, f"-Wl,-rpath,{libdir}"], f"g++ {name}.cpp $(pkg-config ...)", env=env)
            built[name] = output
        linked = run(["ldd", built["stream_tokens"]], "ldd")
        check(f"{libdir}/libfmwire.so.0" in linked, f"not linked to the installed library: {linked}")
        print(f"built with g++ {' '.join(sanitizers)} $(pkg-config --cflags --libs fmwire): {', '.join(built)}")

        # Out of tree with CMake: examples/CMakeLists.txt, find_package(fmwire).
        cmake_build = os.path.join(work, "cmake")
        run(["cmake", "-S", examples, "-B", cmake_build, f"-Dfmwire_DIR={cmake_dir}",
             f"-DCMAKE_CXX_FLAGS={' '.join(sanitizers)}"], "cmake configure", env=env)
        run(["cmake", "--build", cmake_build, "--parallel", "2"], "cmake --build", env=env)
        print(f"built with CMake (find_package(fmwire)): {', '.join(built)}")

        # Run both builds against the installed binary's worker.
        worker = Server(binary, dict(os.environ), "worker", "--model", "builtin")
        for name in WORKER_EXAMPLES:
            for program in (built[name], os.path.join(cmake_build, name)):
                run_example(program, worker.endpoint)
        for name in STANDALONE_EXAMPLES:
            for program in (built[name], os.path.join(cmake_build, name)):
                run_example(program)
        print(f"ran both builds of {', '.join(built)}; the worker was the installed {binary}")
        check(worker.stop() == 0, "the installed worker did not stop cleanly")
    finally:
        if worker:
            worker.kill()
        shutil.rmtree(root, ignore_errors=True)


def main():
    kind = sys.argv[1]
    try:
        if kind == "example":
            example(sys.argv[2], sys.argv[3])
        elif kind == "openai":
            openai(sys.argv[2], sys.argv[3])
        elif kind == "install":
            install(sys.argv[2], sys.argv[3], sys.argv[4])
        else:
            print(f"unknown kind {kind!r}")
            return 2
    except (Failure, subprocess.TimeoutExpired) as failure:
        print(f"FAILED sdk {kind}: {failure!r}")
        return 1
    print(f"ok sdk {kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
