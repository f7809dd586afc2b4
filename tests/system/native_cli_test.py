#!/usr/bin/env python3
"""Multi-process tests of the native protocol: `fmwire echo-server` and
`fmwire generate` as separate processes on 127.0.0.1, as a user runs them.

    native_cli_test.py FMWIRE_BINARY BACKEND SCENARIO

BACKEND (uring or asio) is forced on both processes through
FMWIRE_IO_BACKEND. Every server listens on port 0 (a free port, read back
from its first line), every wait is bounded, and every process is killed on
the way out, so a failing test neither hangs nor leaves processes behind.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

LIMIT_S = 20
# How many times longer the same work takes in this build: meson passes it
# under a sanitizer (tests/system/meson.build); 1 in a release build.
TIME_SCALE = float(os.environ.get("FMWIRE_TEST_TIME_SCALE", "1"))


class Failure(Exception):
    pass


def check(condition, message):
    if not condition:
        raise Failure(message)


class Server:
    """A server subcommand of fmwire (echo-server, worker) on a free port."""

    def __init__(self, binary, env, command, *extra):
        self.process = subprocess.Popen(
            [binary, command, "--listen", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.process.stdout.readline()
        if not line.startswith("listening on 127.0.0.1:"):
            self.kill()
            raise Failure(f"{command} printed {line!r}; stderr {self.process.stderr.read()!r}")
        self.endpoint = line.split()[-1]

    def stop(self, sig=signal.SIGTERM):
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=LIMIT_S)
        finally:
            self.kill()

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class EchoServer(Server):
    def __init__(self, binary, env, *extra):
        super().__init__(binary, env, "echo-server", *extra)


def generate(binary, env, endpoint, *arguments, timeout=LIMIT_S):
    return subprocess.run([binary, "generate", "--endpoint", endpoint, *arguments],
                          capture_output=True, text=True, env=env, timeout=timeout)


def start_generate(binary, env, endpoint, *arguments):
    return subprocess.Popen([binary, "generate", "--endpoint", endpoint, *arguments],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def read_until(stream, predicate, limit_s=LIMIT_S):
    """Reads lines until predicate(text so far) holds; the text, or Failure."""
    deadline = time.monotonic() + limit_s
    text = ""
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        text += line
        if predicate(text):
            return text
    raise Failure(f"never saw what was expected; got {text[-400:]!r}")


def streams_text(binary, env):
    server = EchoServer(binary, env)
    try:
        result = generate(binary, env, server.endpoint, "--max-tokens", "7", "one two three")
        check(result.returncode == 0, f"exit {result.returncode}: {result.stderr}")
        check(result.stdout == " one two three one two three one\n", f"stdout {result.stdout!r}")
    finally:
        check(server.stop() == 0, "echo-server did not stop cleanly")


def json_frames(binary, env):
    server = EchoServer(binary, env, "--tokens-per-frame", "2")
    try:
        result = generate(binary, env, server.endpoint, "--max-tokens", "5", "--json", "a b c")
        check(result.returncode == 0, f"exit {result.returncode}: {result.stderr}")
        frames = [json.loads(line) for line in result.stdout.splitlines()]
        check([frame["type"] for frame in frames] == ["tokens", "tokens", "tokens", "finish"],
              f"frames {frames}")
        indexes = [frame["first_index"] for frame in frames[:3]]
        check(indexes == [0, 2, 4], f"first indexes {indexes}")
        check(frames[0]["text"] == [" a", " b"], f"first frame {frames[0]}")
        check(frames[3]["reason"] == "max_tokens", f"finish {frames[3]}")
        check(frames[3]["usage"]["completion_tokens"] == 5, f"finish {frames[3]}")
    finally:
        server.stop()


def error_frame(binary, env):
    server = EchoServer(binary, env)
    try:
        result = generate(binary, env, server.endpoint, "--max-tokens", "0", "--json", "hello")
        check(result.returncode == 1, f"exit {result.returncode}")
        check("bad_request" in result.stderr and "maxTokens" in result.stderr, f"stderr {result.stderr!r}")
        frame = json.loads(result.stdout.splitlines()[-1])
        check(frame["type"] == "error" and frame["code"] == "bad_request", f"frame {frame}")
        # The server carries on.
        again = generate(binary, env, server.endpoint, "--max-tokens", "2", "still here")
        check(again.returncode == 0 and again.stdout == " still here\n", f"after the error: {again.stdout!r}")
    finally:
        server.stop()


def connection_refused(binary, env):
    # A port that was free a moment ago: bound, then closed.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    result = generate(binary, env, f"127.0.0.1:{port}", "hello")
    check(result.returncode == 1, f"exit {result.returncode}")
    check("cannot connect" in result.stderr and "refused" in result.stderr.lower(), f"stderr {result.stderr!r}")


def bad_endpoint(binary, env):
    # IPv6 without brackets: "::1:80" could be [::1]:80 or [::1:80]:PORT.
    result = generate(binary, env, "::1:80", "hello")
    check(result.returncode == 2, f"exit {result.returncode}")
    check("brackets" in result.stderr and "[::1]:7000" in result.stderr, f"stderr {result.stderr!r}")


def server_killed_mid_stream(binary, env):
    server = EchoServer(binary, env, "--token-interval-ms", "2")
    client = start_generate(binary, env, server.endpoint, "--max-tokens", "100000", "--json", "slow stream")
    try:
        read_until(client.stdout, lambda text: text.count("\n") >= 5)
        server.kill()  # SIGKILL: no GoAway, no Error frame
        rest, errors = client.communicate(timeout=LIMIT_S)
        check(client.returncode == 1, f"exit {client.returncode}")
        check("worker_lost" in errors and "retryable" in errors, f"stderr {errors!r}")
        check(json.loads(rest.splitlines()[-1])["type"] == "error", f"last line {rest.splitlines()[-1]!r}")
    finally:
        server.kill()
        if client.poll() is None:
            client.kill()
            client.wait()


def sigint_cancels(binary, env):
    server = EchoServer(binary, env, "--token-interval-ms", "2")
    client = start_generate(binary, env, server.endpoint, "--max-tokens", "100000", "--json", "cancel me")
    try:
        read_until(client.stdout, lambda text: text.count("\n") >= 3)
        client.send_signal(signal.SIGINT)
        _, errors = client.communicate(timeout=LIMIT_S)
        check(client.returncode == 130, f"exit {client.returncode}: {errors!r}")
        check("cancelled" in errors, f"stderr {errors!r}")
        # The server stopped that stream and serves the next request.
        again = generate(binary, env, server.endpoint, "--max-tokens", "1", "next")
        check(again.returncode == 0, f"after the cancel: {again.stderr!r}")
        check(server.stop() == 0, "echo-server did not drain cleanly")
        _, server_errors = server.process.communicate()
        check("1 streams cancelled" in server_errors, f"the server did not see the cancel: {server_errors!r}")
    finally:
        server.kill()
        if client.poll() is None:
            client.kill()
            client.wait()


def drain_finishes_open_stream(binary, env):
    server = EchoServer(binary, env, "--token-interval-ms", "5")
    client = start_generate(binary, env, server.endpoint, "--max-tokens", "60", "--json", "drain me")
    try:
        read_until(client.stdout, lambda text: text.count("\n") >= 2)
        server.process.send_signal(signal.SIGTERM)
        rest, errors = client.communicate(timeout=LIMIT_S)
        check(client.returncode == 0, f"the open stream did not finish: exit {client.returncode}, {errors!r}")
        check(json.loads(rest.splitlines()[-1])["usage"]["completion_tokens"] == 60, f"last {rest.splitlines()[-1]!r}")
        check(server.process.wait(timeout=LIMIT_S) == 0, "echo-server did not exit 0 after draining")
        _, server_errors = server.process.communicate()
        check("draining connections=1" in server_errors, f"server stderr {server_errors!r}")
    finally:
        server.kill()
        if client.poll() is None:
            client.kill()
            client.wait()


def loops_share_the_port(binary, env):
    server = EchoServer(binary, env, "--threads", "2")
    clients = []
    try:
        # Separate processes, so separate connections the kernel spreads by hash.
        clients = [start_generate(binary, env, server.endpoint, "--max-tokens", "50", f"client {i}")
                   for i in range(16)]
        # One deadline for all, as in router_cli_test's threads scenario: the
        # 16 start at once, and under the sanitizers a process costs about a
        # second of CPU to start, which the first client's wait would
        # otherwise pay for all of them (a local CI run's ASan stage timed one out
        # at 20 s).
        deadline = time.monotonic() + 3 * LIMIT_S
        for client in clients:
            out, errors = client.communicate(timeout=max(1.0, deadline - time.monotonic()))
            check(client.returncode == 0, f"a client failed: {errors!r}")
            check(out.count(" client") == 25, f"short stream: {out!r}")
        check(server.stop() == 0, "echo-server did not drain cleanly")
        _, server_errors = server.process.communicate()
        per_loop = [int(n) for n in server_errors.split("tokens per loop: ")[1].split()]
        check(len(per_loop) == 2 and sum(per_loop) == 16 * 50, f"tokens per loop {per_loop}")
        check(min(per_loop) > 0, f"one loop served every connection: {per_loop}")
    finally:
        server.kill()
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait()


def falls_back_without_io_uring(binary, env):
    """Under a seccomp filter that refuses io_uring (as container runtimes
    do), the automatic choice is Asio with one log line, and forcing
    io_uring fails with a clear message instead of a crash."""
    launcher = os.environ["FMWIRE_WITHOUT_IO_URING"]
    automatic = {k: v for k, v in env.items() if k != "FMWIRE_IO_BACKEND"}
    server = subprocess.Popen([launcher, binary, "echo-server", "--listen", "127.0.0.1:0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=automatic)
    try:
        line = server.stdout.readline()
        check(line.startswith("listening on 127.0.0.1:"), f"echo-server printed {line!r}")
        endpoint = line.split()[-1]
        result = subprocess.run([launcher, binary, "generate", "--endpoint", endpoint, "--max-tokens", "3", "a b c"],
                                capture_output=True, text=True, env=automatic, timeout=LIMIT_S)
        check(result.returncode == 0 and result.stdout == " a b c\n", f"generate: {result.stdout!r} {result.stderr!r}")
        server.send_signal(signal.SIGTERM)
        _, errors = server.communicate(timeout=LIMIT_S)
        check(server.returncode == 0, f"echo-server exit {server.returncode}")
        check(errors.count("I/O backend") == 1, f"one backend line expected: {errors!r}")
        check("Boost.Asio, because io_uring cannot be set up here" in errors, f"stderr {errors!r}")
        forced = subprocess.run([launcher, binary, "echo-server", "--listen", "127.0.0.1:0", "--backend", "uring"],
                                capture_output=True, text=True, env=automatic, timeout=LIMIT_S)
        check(forced.returncode == 1, f"forced io_uring: exit {forced.returncode}")
        check("io_uring_queue_init" in forced.stderr and "not permitted" in forced.stderr,
              f"forced io_uring: {forced.stderr!r}")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


SCENARIOS = {
    "falls_back_without_io_uring": falls_back_without_io_uring,
    "loops_share_the_port": loops_share_the_port,
    "streams_text": streams_text,
    "json_frames": json_frames,
    "error_frame": error_frame,
    "connection_refused": connection_refused,
    "bad_endpoint": bad_endpoint,
    "server_killed_mid_stream": server_killed_mid_stream,
    "sigint_cancels": sigint_cancels,
    "drain_finishes_open_stream": drain_finishes_open_stream,
}



SKIPPED = 77  # meson's exit status for a test that cannot run here


def run_scenario(label, scenarios):
    """The main of every *_cli_test.py (SCRIPT FMWIRE_BINARY BACKEND
    SCENARIO): runs one scenario over that I/O backend. 0 when it passed, 1
    with the reason when it failed, SKIPPED when it returned SKIPPED (having
    said why)."""
    binary, backend, scenario = sys.argv[1:4]
    env = dict(os.environ, FMWIRE_IO_BACKEND=backend)
    name = f"{label} {scenario}" if label else scenario
    try:
        if scenarios[scenario](binary, env) == SKIPPED:
            return SKIPPED
    except (Failure, subprocess.TimeoutExpired) as failure:
        print(f"FAILED {name} [{backend}]: {failure!r}")
        return 1
    print(f"ok {name} [{backend}]")
    return 0


if __name__ == "__main__":
    sys.exit(run_scenario("", SCENARIOS))
