#!/usr/bin/env python3
"""Multi-process tests of router failover (issue 14): `fmwire gateway`
and `fmwire generate` given several routers (a list, or etcd), one of them
SIGKILLed with a stream running through it. The stream on the lost router
ends with a retryable error; new streams go to the survivor within 1 s.

    router_failover_cli_test.py FMWIRE_BINARY BACKEND SCENARIO

Same rules as native_cli_test.py: free ports, bounded waits, every process
killed on the way out. The measured times are printed, for the record.
"""
import http.client as http_client
import json
import os
import shutil
import sys
import threading
import time

from gateway_cli_test import HttpServer, http
from native_cli_test import LIMIT_S, SKIPPED, Failure, check, generate, run_scenario
from router_cli_test import Etcd, Router, Worker, stop_all, until

# 20 ms a token: a 2,000-token stream runs for 40 s, far past the kill.
SLOW_WORKER = ["--model", "synthetic:tiny", "--step-us", "20000"]
# The targets: the lost stream ends, and a new stream is served by
# the survivor, within these of the kill.
STREAM_END_BOUND_S = 2.0
NEW_STREAM_BOUND_S = 1.0


def completion(max_tokens, stream):
    return {"model": "builtin", "prompt": "fail over", "max_tokens": max_tokens, "stream": stream}


class SseStream:
    """A streaming completion read event by event on a thread of its own,
    so that the test can time its end while it does other things."""

    def __init__(self, url, max_tokens):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.connection = http_client.HTTPConnection(host, int(port), timeout=LIMIT_S)
        self.connection.request("POST", "/v1/completions", json.dumps(completion(max_tokens, True)),
                                {"Content-Type": "application/json"})
        self.response = self.connection.getresponse()
        check(self.response.status == 200, f"stream status {self.response.status}")
        self.events = []
        self.first_event = threading.Event()
        self.ended_at = None
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self):
        try:
            for raw in self.response:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("data: "):
                    self.events.append(line[len("data: "):])
                    self.first_event.set()
        except OSError as error:
            self.events.append(f"read failed: {error!r}")
        self.ended_at = time.monotonic()
        self.first_event.set()

    def wait_ended(self, limit_s):
        self.thread.join(timeout=limit_s)
        check(not self.thread.is_alive(), f"the stream did not end within {limit_s} s; events {self.events[-3:]!r}")

    def close(self):
        self.connection.close()


def served_within(url, limit_s):
    """Sends short streams until one is served whole: when (monotonic) it
    was, or Failure after limit_s."""
    started = time.monotonic()
    last = None
    while time.monotonic() - started < limit_s:
        status, body = http(url + "/v1/completions", completion(2, True))
        if status == 200 and body.rstrip().endswith("data: [DONE]"):
            return time.monotonic()
        last = (status, body[-300:])
        time.sleep(0.01)
    raise Failure(f"no stream served within {limit_s} s; the last answer {last!r}")


def check_lost_stream(stream, lost_router):
    """The stream's last event is the gateway's error event for a lost
    upstream (worker_lost, retryable by its code) naming the lost router."""
    check(len(stream.events) >= 2, f"events {stream.events!r}")
    last = json.loads(stream.events[-1])
    check("error" in last, f"the last event is not an error: {stream.events[-2:]!r}")
    check(last["error"]["code"] == "worker_lost", f"error {last!r}")
    check(lost_router in last["error"]["message"], f"the error does not name {lost_router}: {last!r}")
    check("[DONE]" not in stream.events, "a lost stream said [DONE]")


def gateway_fails_over(binary, env):
    workers = [Worker(binary, env, *SLOW_WORKER) for _ in range(2)]
    routers = []
    gateway = None
    stream = None
    try:
        routers = [Router(binary, env, workers) for _ in range(2)]
        # One HTTP thread: one upstream connection, to the first router.
        gateway = HttpServer(binary, env, "gateway", "--listen", "127.0.0.1:0", "--http-threads", "1",
                             "--router", ",".join(router.endpoint for router in routers))
        served_within(gateway.url, LIMIT_S)
        # For scale: what a short stream takes with nothing lost (20 ms a token).
        asked_at = time.monotonic()
        baseline_s = served_within(gateway.url, LIMIT_S) - asked_at
        stream = SseStream(gateway.url, 2000)
        check(stream.first_event.wait(LIMIT_S) and stream.ended_at is None, f"no token: {stream.events!r}")
        killed_at = time.monotonic()  # before the signal: kill() also waits for the process to go
        routers[0].kill()  # SIGKILL: the gateway sees its connection close
        new_stream_s = served_within(gateway.url, LIMIT_S) - killed_at
        stream.wait_ended(LIMIT_S)
        stream_end_s = stream.ended_at - killed_at
        print(f"kill -> lost stream ended: {stream_end_s * 1000:.1f} ms; "
              f"kill -> first new stream served: {new_stream_s * 1000:.1f} ms "
              f"(the same stream before the kill: {baseline_s * 1000:.1f} ms)")
        check_lost_stream(stream, routers[0].endpoint)
        check(stream_end_s < STREAM_END_BOUND_S, f"the lost stream took {stream_end_s:.3f} s to end")
        check(new_stream_s < NEW_STREAM_BOUND_S, f"the first new stream took {new_stream_s:.3f} s")
        status, body = http(gateway.url + "/ready")
        check(status == 200, f"/ready {status} {body!r} with a router left")
        # The survivor gone too: /ready says so, and a request fails at once.
        routers[1].kill()
        until(lambda: http(gateway.url + "/ready")[0] == 503, LIMIT_S, "/ready to go 503")
        status, body = http(gateway.url + "/v1/completions", completion(2, False))
        check(status == 503 and "none of the 2 endpoints" in body, f"no router: {status} {body!r}")
        code, _, errors = gateway.stop()
        check(code == 0, f"fmwire gateway exit {code}: {errors[-1000:]!r}")
    finally:
        if stream is not None:
            stream.close()
        stop_all(gateway, *routers, *workers)


def generate_fails_over(binary, env):
    worker = Worker(binary, env, "--model", "synthetic:tiny", "--step-us", "0")
    routers = []
    try:
        routers = [Router(binary, env, [worker]) for _ in range(2)]
        endpoints = ",".join(router.endpoint for router in routers)
        routers[0].kill()
        # The first refuses: the second serves.
        result = generate(binary, env, endpoints, "--max-tokens", "2", "either")
        check(result.returncode == 0, f"exit {result.returncode}: {result.stderr!r}")
        routers[1].kill()
        result = generate(binary, env, endpoints, "--max-tokens", "2", "neither")
        check(result.returncode == 1 and "no_worker" in result.stderr and "retryable" in result.stderr
              and routers[0].endpoint in result.stderr and routers[1].endpoint in result.stderr,
              f"exit {result.returncode}: {result.stderr!r}")
        bad = generate(binary, env, routers[1].endpoint + ",nonsense", "x")
        check(bad.returncode == 2 and "'nonsense'" in bad.stderr, f"exit {bad.returncode}: {bad.stderr!r}")
    finally:
        stop_all(*routers, worker)


def gateway_finds_routers_in_etcd(binary, env):
    if shutil.which("etcd") is None and not os.path.exists("/usr/bin/etcd"):
        print("SKIP gateway_finds_routers_in_etcd: no etcd binary installed (scripts/setup.sh installs etcd-server)")
        return SKIPPED
    etcd = Etcd()
    workers = [Worker(binary, env, *SLOW_WORKER) for _ in range(2)]
    first = second = gateway = None
    try:
        def router():
            return Router(binary, env, workers, "--etcd", etcd.url, "--etcd-ttl-s", "2")

        first = router()
        gateway = HttpServer(binary, env, "gateway", "--listen", "127.0.0.1:0", "--etcd", etcd.url)
        served_within(gateway.url, LIMIT_S)
        first.kill()
        # Its lease runs out (2 s): etcd, and so the gateway, lists none.
        until(lambda: "the list is empty" in http(gateway.url + "/v1/completions", completion(2, False))[1],
              LIMIT_S, "the killed router to leave the gateway's list")
        started = time.monotonic()
        second = router()
        print(f"router started -> first stream served through it: "
              f"{(served_within(gateway.url, LIMIT_S) - started) * 1000:.1f} ms")
        code, _, errors = gateway.stop()
        check(code == 0, f"fmwire gateway exit {code}: {errors[-1000:]!r}")
        check("etcd lists 0 router(s)" in errors and "etcd lists 1 router(s)" in errors, f"stderr {errors[-1000:]!r}")
    finally:
        stop_all(gateway, first, second, *workers)
        etcd.stop()


SCENARIOS = {
    "gateway_fails_over": gateway_fails_over,
    "generate_fails_over": generate_fails_over,
    "gateway_finds_routers_in_etcd": gateway_finds_routers_in_etcd,
}


if __name__ == "__main__":
    sys.exit(run_scenario("router_failover", SCENARIOS))
