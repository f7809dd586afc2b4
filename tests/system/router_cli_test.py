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
        router = Router(binary, env, workers, "--policy", "round-robin")
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
        rest, errors = client.communicate(timeout=LIMIT_S)
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


SCENARIOS = {
    "routes_to_three_workers": routes_to_three_workers,
    "worker_killed_mid_stream": worker_killed_mid_stream,
    "silent_worker_detected": silent_worker_detected,
    "migration_continues_stream": migration_continues_stream,
    "etcd_discovery": etcd_discovery,
}



if __name__ == "__main__":
    sys.exit(run_scenario("router", SCENARIOS))
