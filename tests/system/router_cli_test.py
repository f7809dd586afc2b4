#!/usr/bin/env python3
"""Multi-process tests of `fmwire router`: workers, a router and `fmwire
generate` as separate processes on 127.0.0.1 (and a real etcd for
discovery), as an operator runs them.

    router_cli_test.py FMWIRE_BINARY BACKEND SCENARIO

Same rules as native_cli_test.py: free ports, bounded waits, every process
killed on the way out.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from gateway_cli_test import http, metric
from native_cli_test import LIMIT_S, Failure, Server, check, generate, read_until, start_generate, run_scenario


class Worker(Server):
    def __init__(self, binary, env, *extra):
        super().__init__(binary, env, "worker", *extra)


class Router(Server):
    def __init__(self, binary, env, workers, *extra):
        super().__init__(binary, env, "router", "--workers", ",".join(w.endpoint for w in workers), *extra)


def frames_of(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def indexes_of(frames):
    return [frame["first_index"] + i for frame in frames if frame["type"] == "tokens"
            for i in range(len(frame["token_ids"]))]


def stop_all(*servers):
    for server in servers:
        if server is not None:
            server.kill()


def until(predicate, limit_s=LIMIT_S, what="a condition"):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise Failure(f"timed out waiting for {what}")


def routes_to_three_workers(binary, env):
    workers = [Worker(binary, env, "--model", "builtin") for _ in range(3)]
    router = None
    try:
        # One loop: each loop keeps its own round-robin turn.
        router = Router(binary, env, workers, "--policy", "round-robin", "--threads", "1")
        direct = generate(binary, env, workers[0].endpoint, "--max-tokens", "12", "--json", "same answer")
        check(direct.returncode == 0, f"direct: {direct.stderr}")
        for _ in range(3):
            routed = generate(binary, env, router.endpoint, "--max-tokens", "12", "--json", "same answer")
            check(routed.returncode == 0, f"routed: exit {routed.returncode}: {routed.stderr}")
            ours, theirs = frames_of(routed.stdout), frames_of(direct.stdout)
            ids = [t for f in ours if f["type"] == "tokens" for t in f["token_ids"]]
            expected = [t for f in theirs if f["type"] == "tokens" for t in f["token_ids"]]
            check(ids == expected, f"routed tokens {ids} != direct {expected}")
            hops = [hop["hop"] for hop in ours[-1]["timings"]]
            check(len(hops) == 2 and hops[0].startswith("worker ") and hops[1].startswith("router"), f"hops {hops}")
        check(router.stop() == 0, "the router did not stop cleanly")
        _, errors = router.process.communicate()
        check("3 streams finished" in errors, f"router stderr {errors!r}")
        # Round-robin: each worker served one routed stream (the first also the direct one).
        finished = []
        for worker in workers:
            check(worker.stop() == 0, "a worker did not stop cleanly")
            finished.append(worker.process.communicate()[1])
        counts = [int(text.split("stopped after ")[1].split()[0]) for text in finished]
        check(counts == [2, 1, 1], f"streams per worker {counts}")
    finally:
        stop_all(router, *workers)


def compact_tokens_switch_changes_no_token(binary, env):
    """worker -> router -> client with FMWIRE_COMPACT_TOKENS on and off in
    each process: the same tokens and text every way; one-token frames of 48
    bytes at most only where the client offered CompactTokens (a router
    relays a worker's compact frame to an older client as Tokens)."""
    def run(worker_on, router_on, client_on):
        def with_switch(on):
            return dict(env, FMWIRE_COMPACT_TOKENS="1" if on else "0")
        worker = router = None
        try:
            worker = Worker(binary, with_switch(worker_on), "--model", "builtin")
            router = Router(binary, with_switch(router_on), [worker])
            result = generate(binary, with_switch(client_on), router.endpoint, "--max-tokens", "24", "--json",
                              "same answer either way")
            check(result.returncode == 0, f"generate: exit {result.returncode}: {result.stderr}")
            frames = [f for f in frames_of(result.stdout) if f["type"] == "tokens"]
            check(len(frames) > 0, "no token frame")
            return frames
        finally:
            stop_all(router, worker)

    def content(frames):
        return ([f["first_index"] for f in frames], [t for f in frames for t in f["token_ids"]],
                "".join(piece for f in frames for piece in f["text"]))

    expected = run(True, True, True)
    for frame in expected:
        if len(frame["token_ids"]) == 1 and len("".join(frame["text"]).encode()) <= 10:
            check(frame["wire_bytes"] <= 48, f"a compact one-token frame of {frame['wire_bytes']} bytes")
    for switches in [(False, False, False), (True, True, False), (False, True, True), (True, False, True)]:
        frames = run(*switches)
        check(content(frames) == content(expected), f"switches {switches}: {content(frames)} != {content(expected)}")
        # A router relays a frame in the form it came in, Tokens to a client that takes no other.
        client_compact = all(switches)
        one_token = [f["wire_bytes"] for f in frames if len(f["token_ids"]) == 1]
        if client_compact:
            check(one_token == [f["wire_bytes"] for f in expected if len(f["token_ids"]) == 1],
                  f"switches {switches}: frame sizes {one_token}")
        else:
            check(all(size > 48 for size in one_token), f"switches {switches}: Tokens frames of {one_token} bytes")


def worker_killed_mid_stream(binary, env):
    worker = Worker(binary, env, "--model", "synthetic:tiny", "--step-us", "5000")
    router = None
    client = None
    try:
        router = Router(binary, env, [worker], "--keepalive-ms", "200", "--dead-after-ms", "600")
        client = start_generate(binary, env, router.endpoint, "--max-tokens", "2000", "--json", "kill it")
        read_until(client.stdout, lambda text: text.count("\n") >= 3)
        worker.kill()  # SIGKILL: the router sees the connection close
        started = time.monotonic()
        _, errors = client.communicate(timeout=LIMIT_S)
        check(client.returncode == 1, f"exit {client.returncode}: {errors!r}")
        check("worker_lost" in errors and "retryable" in errors, f"stderr {errors!r}")
        check(time.monotonic() - started < 5, "the error took longer than the keepalive bound")
        # No worker now: a new request is refused at once, retryable.
        refused = generate(binary, env, router.endpoint, "--max-tokens", "2", "anyone?")
        check(refused.returncode == 1 and "no_worker" in refused.stderr and "retryable" in refused.stderr,
              f"stderr {refused.stderr!r}")
    finally:
        stop_all(router, worker)
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()


def silent_worker_detected(binary, env):
    """A worker that stops answering (SIGSTOP: its socket stays open) is
    found out by keepalive, and its stream ends with worker_lost."""
    worker = Worker(binary, env, "--model", "synthetic:tiny", "--step-us", "5000")
    router = None
    client = None
    try:
        router = Router(binary, env, [worker], "--keepalive-ms", "200", "--dead-after-ms", "800")
        client = start_generate(binary, env, router.endpoint, "--max-tokens", "2000", "--json", "hang")
        read_until(client.stdout, lambda text: text.count("\n") >= 3)
        worker.process.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        _, errors = client.communicate(timeout=LIMIT_S)
        waited = time.monotonic() - started
        check(client.returncode == 1 and "worker_lost" in errors, f"exit {client.returncode}: {errors!r}")
        check(waited < 5, f"took {waited:.1f} s to notice a silent worker (dead after 0.8 s)")
    finally:
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGCONT)
        stop_all(router, worker)
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()


def migration_continues_stream(binary, env):
    """With --migrate, a worker killed mid-stream hands the request to
    another: the client sees every index once, in order, and the same tokens
    one worker would have given (synthetic tokens depend only on position
    and the previous token)."""
    workers = [Worker(binary, env, "--model", "synthetic:tiny", "--step-us", "4000") for _ in range(2)]
    router = None
    client = None
    try:
        direct = generate(binary, env, workers[1].endpoint, "--max-tokens", "150", "--json", "move me")
        check(direct.returncode == 0, f"direct: {direct.stderr}")
        expected = [t for f in frames_of(direct.stdout) if f["type"] == "tokens" for t in f["token_ids"]]
        router = Router(binary, env, workers, "--policy", "round-robin", "--migrate",
                        "--keepalive-ms", "200", "--dead-after-ms", "600", "--metrics-listen", "127.0.0.1:0")
        # Round-robin goes over the workers the router has reached: on a
        # loaded machine the second may answer first, and the request must go
        # to the first. The router's /metrics says when both are healthy.
        metrics_url = router.process.stdout.readline().split()[-1]
        until(lambda: all(metric(http(metrics_url)[1], f'fmwire_router_worker_healthy{{worker="{w.endpoint}"}}') == 1
                          for w in workers), what="the router reaching both workers")
        client = start_generate(binary, env, router.endpoint, "--max-tokens", "150", "--json", "move me")
        before = read_until(client.stdout, lambda text: text.count("\n") >= 20)
        workers[0].kill()  # round-robin: the first request went to the first worker
        # Not communicate(): it reads the pipe itself, past what read_until
        # left buffered in client.stdout (frames that came together under
        # load were lost so). 150 frames fit in the pipe: waiting first
        # cannot block the client.
        client.wait(timeout=LIMIT_S)
        rest, errors = client.stdout.read(), client.stderr.read()
        check(client.returncode == 0, f"the stream did not go on: exit {client.returncode}, {errors!r}")
        frames = frames_of(before + rest)
        check(indexes_of(frames) == list(range(150)), f"indexes {indexes_of(frames)}")
        ids = [t for f in frames if f["type"] == "tokens" for t in f["token_ids"]]
        check(ids == expected, "the migrated stream's tokens differ from one worker's")
        check(frames[-1]["type"] == "finish" and frames[-1]["usage"]["completion_tokens"] == 150,
              f"finish {frames[-1]}")
        check(router.stop() == 0, "the router did not stop cleanly")
        _, router_errors = router.process.communicate()
        check("1 migrated" in router_errors, f"router stderr {router_errors!r}")
    finally:
        stop_all(router, *workers)
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()


def free_port():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


class Etcd:
    """A real etcd on loopback, its data in a temporary folder."""

    def __init__(self):
        binary = shutil.which("etcd") or "/usr/bin/etcd"
        check(os.path.exists(binary), "etcd is not installed (scripts/setup.sh installs etcd-server)")
        self.folder = tempfile.mkdtemp(prefix="fmwire-etcd-")
        client, peer = free_port(), free_port()
        self.url = f"http://127.0.0.1:{client}"
        self.process = subprocess.Popen(
            [binary, "--name", "default", "--data-dir", self.folder,
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"default=http://127.0.0.1:{peer}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def healthy():
            try:
                with socket.create_connection(("127.0.0.1", client), timeout=0.5) as connection:
                    connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    return b"true" in connection.recv(4096)
            except OSError:
                return False

        until(healthy, 15, "etcd to start")

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def etcd_discovery(binary, env):
    etcd = Etcd()
    router = None
    workers = []
    try:
        router = Server(binary, env, "router", "--etcd", etcd.url, "--policy", "round-robin")
        refused = generate(binary, env, router.endpoint, "--max-tokens", "2", "nobody yet")
        check(refused.returncode == 1 and "no_worker" in refused.stderr, f"stderr {refused.stderr!r}")
        workers.append(Worker(binary, env, "--model", "synthetic:tiny", "--step-us", "0",
                              "--etcd", etcd.url, "--etcd-ttl-s", "2"))

        def served():
            return generate(binary, env, router.endpoint, "--max-tokens", "2", "hello").returncode == 0

        until(served, LIMIT_S, "the router to find the registered worker")
        # A killed worker's lease ends: the router drops it and refuses again.
        workers[0].kill()
        until(lambda: "no_worker" in generate(binary, env, router.endpoint, "--max-tokens", "2", "x").stderr,
              LIMIT_S, "the dead worker to leave")
        check(router.stop() == 0, "the router did not stop cleanly")
    finally:
        stop_all(router, *workers)
        etcd.stop()


def stream_tokens(client, max_tokens, label, limit_s=LIMIT_S):
    """Waits for a `fmwire generate --json` client; fails unless its stream
    came whole: indexes 0..max_tokens-1 once each, then a Finish that says so."""
    out, errors = client.communicate(timeout=limit_s)
    check(client.returncode == 0, f"{label}: exit {client.returncode}: {errors!r}")
    frames = frames_of(out)
    check(indexes_of(frames) == list(range(max_tokens)), f"{label}: indexes {indexes_of(frames)}")
    check(frames[-1]["type"] == "finish" and frames[-1]["usage"]["completion_tokens"] == max_tokens,
          f"{label}: finish {frames[-1]}")


def stop_clients(clients):
    for client in clients:
        if client.poll() is None:
            client.kill()
            client.wait()


def streams_per_loop(router_errors):
    return [int(n) for n in router_errors.split("streams started per loop: ")[1].split()]


def finished_at(worker):
    check(worker.stop() == 0, "a worker did not stop cleanly")
    return int(worker.process.communicate()[1].split("stopped after ")[1].split()[0])


def threads_spread_streams_over_loops(binary, env):
    """`--threads 2`: many concurrent clients, as separate processes (so
    separate connections the kernel spreads by hash), are served by both
    loops, every stream whole; /metrics sums the loops and stays valid."""
    clients_n, tokens = 24, 40
    workers = [Worker(binary, env, "--model", "synthetic:tiny", "--step-us", "1000") for _ in range(2)]
    router = None
    clients = []
    try:
        router = Router(binary, env, workers, "--threads", "2", "--metrics-listen", "127.0.0.1:0")
        metrics_url = router.process.stdout.readline().split()[-1]
        # Healthy 1: on every loop (the share of loops whose link is up).
        until(lambda: all(metric(http(metrics_url)[1], f'fmwire_router_worker_healthy{{worker="{w.endpoint}"}}') == 1
                          for w in workers), what="both loops reaching both workers")
        clients = [start_generate(binary, env, router.endpoint, "--max-tokens", str(tokens), "--json", f"client {i}")
                   for i in range(clients_n)]
        # One deadline for all: the clients start at once, and under the
        # sanitizers a process costs about a second of CPU to start (24
        # `fmwire version` took 18.8 s on 2 busy cores), which the first
        # client's wait would otherwise pay for all of them.
        deadline = time.monotonic() + 3 * LIMIT_S
        for i, client in enumerate(clients):
            stream_tokens(client, tokens, f"client {i}", max(1.0, deadline - time.monotonic()))
        from metrics_cli_test import promtool  # here: metrics_cli_test imports this module
        page = http(metrics_url)[1]
        promtool(page, "the router with two loops")
        check(metric(page, "fmwire_router_loop_threads") == 2, f"loop threads:\n{page}")
        per_loop = [metric(page, f'fmwire_router_loop_streams_started_total{{loop="{i}"}}') for i in range(2)]
        check(sum(per_loop) == clients_n and min(per_loop) > 0, f"streams per loop on /metrics {per_loop}")
        check(metric(page, 'fmwire_router_streams_total{event="finished"}') == clients_n, f"finished:\n{page}")
        opened = [metric(page, f'fmwire_router_worker_streams_opened_total{{worker="{w.endpoint}"}}') for w in workers]
        check(sum(opened) == clients_n, f"streams opened per worker {opened}")
        check(router.stop() == 0, "the router did not stop cleanly")
        _, router_errors = router.process.communicate()
        check(f"{clients_n} streams finished" in router_errors, f"router stderr {router_errors!r}")
        per_loop = streams_per_loop(router_errors)
        check(len(per_loop) == 2 and sum(per_loop) == clients_n and min(per_loop) > 0,
              f"streams per loop in the shutdown line {per_loop}")
        # Each loop routes by the workers' own load reports plus its own
        # streams: both workers get work, and between them every stream.
        served = [finished_at(worker) for worker in workers]
        check(sum(served) == clients_n and min(served) > 0, f"streams per worker {served}")
    finally:
        stop_all(router, *workers)
        stop_clients(clients)


def threads_drain_every_loop(binary, env):
    """SIGTERM drains every loop: streams open on both finish whole, the
    router exits 0 after saying what each loop drained."""
    clients_n, tokens = 12, 300
    worker = Worker(binary, env, "--model", "synthetic:tiny", "--step-us", "2000")
    router = None
    clients = []
    try:
        router = Router(binary, env, [worker], "--threads", "2")
        clients = [start_generate(binary, env, router.endpoint, "--max-tokens", str(tokens), "--json", f"client {i}")
                   for i in range(clients_n)]
        firsts = [read_until(client.stdout, lambda text: text.count("\n") >= 2) for client in clients]
        router.process.send_signal(signal.SIGTERM)
        for i, client in enumerate(clients):
            # Not communicate(): it reads the pipe itself, past what
            # read_until left buffered in client.stdout. 300 frames fit in
            # the pipe, so waiting first cannot block the client.
            client.wait(timeout=LIMIT_S)
            rest, errors = client.stdout.read(), client.stderr.read()
            check(client.returncode == 0, f"client {i}: exit {client.returncode}: {errors!r}")
            frames = frames_of(firsts[i] + rest)
            check(indexes_of(frames) == list(range(tokens)), f"client {i}: indexes {indexes_of(frames)}")
        check(router.process.wait(timeout=LIMIT_S) == 0, "the router did not drain cleanly")
        _, router_errors = router.process.communicate()
        for loop in range(2):
            check(f"draining loop={loop}" in router_errors, f"loop {loop} did not drain: {router_errors!r}")
        check(f"{clients_n} streams finished" in router_errors, f"router stderr {router_errors!r}")
        per_loop = streams_per_loop(router_errors)
        check(sum(per_loop) == clients_n and min(per_loop) > 0, f"streams per loop {per_loop}")
    finally:
        stop_all(router, worker)
        stop_clients(clients)


def threads_bad_values_refused(binary, env):
    """--threads takes a whole number from 1: anything else exits 2 saying so."""
    for value in ["0", "abc", "-1", "2x", "", "100000"]:
        refused = subprocess.run([binary, "router", "--listen", "127.0.0.1:0", "--workers", "127.0.0.1:1",
                                  "--threads", value], capture_output=True, text=True, env=env, timeout=LIMIT_S)
        check(refused.returncode == 2, f"--threads {value!r}: exit {refused.returncode}")
        check(f"--threads {value}: give a whole number of loop threads from 1" in refused.stderr,
              f"--threads {value!r}: stderr {refused.stderr!r}")
        check(refused.stdout == "", f"--threads {value!r} listened: {refused.stdout!r}")


SCENARIOS = {
    "routes_to_three_workers": routes_to_three_workers,
    "compact_tokens_switch_changes_no_token": compact_tokens_switch_changes_no_token,
    "worker_killed_mid_stream": worker_killed_mid_stream,
    "silent_worker_detected": silent_worker_detected,
    "migration_continues_stream": migration_continues_stream,
    "etcd_discovery": etcd_discovery,
    "threads_spread_streams_over_loops": threads_spread_streams_over_loops,
    "threads_drain_every_loop": threads_drain_every_loop,
    "threads_bad_values_refused": threads_bad_values_refused,
}



if __name__ == "__main__":
    sys.exit(run_scenario("router", SCENARIOS))
