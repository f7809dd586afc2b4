#!/usr/bin/env python3
"""10,000 KV transfers with random cancels and kills leave every block
counter at its baseline (issue 13), with the processes as an operator runs
them: two prefill and two decode workers (`fmwire worker --role`, the
synthetic tiny model, a small KV cache), `fmwire router` and `fmwire
gateway --router`, on 127.0.0.1.

Clients stream completions over plain sockets, IN_FLIGHT at a time, each
request split by the router into a prefill and a decode part with the KV
moving between them; about a third of the clients close their socket at a
random point of the stream. Every ~250 requests a worker, prefill and
decode in turn, picked among those of its role that report an open KV
transfer, is SIGKILLed and started again on the same port after 0-300 ms
(the router reconnects). The requests come in ROUNDS; after each round:

  - every request of it ended: a whole stream ([DONE] after a
    finish_reason) or an error (an HTTP error status or an SSE error
    event), never a hang nor a stream cut short without an error;
  - no process died but the killed workers;
  - within SETTLE_LIMIT_S, and for several load reports after, every
    worker's counters are at their baseline: no KV block in use, none
    reserved for an incoming transfer, no KV transfer open (the gateway's
    /metrics, which passes on each worker's load reports), and no stream
    open at the gateway.

At the end the router's counts say that each request ended there and that
most were split and not served whole after a failed part.

    kv_stress_cli_test.py FMWIRE_BINARY BACKEND

FMWIRE_STRESS_SEED=N repeats a run's random choices (requests, cancels and
victims; not the timing). Same rules as native_cli_test.py: bounded waits,
every process killed on the way out.
"""
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

from gateway_cli_test import HttpServer, http, metric
from native_cli_test import LIMIT_S, Failure, check
from router_cli_test import free_port

ROUNDS = 5
REQUESTS_PER_ROUND = 2000
KILLS_PER_ROUND = 8
IN_FLIGHT = 64
CANCEL_SHARE = 1 / 3
# Load reports every 20 ms, so the gauges trail the workers by little.
REPORT_MS = 20
# The tiny synthetic model: 256 bytes of KV a token, so a prompt of 20-600
# tokens moves 5-150 KiB; prefill slowed to 20 us a token so that a
# transfer (Offer to Committed spans the prefill) stays open long enough
# for a kill to land in one. 512 blocks of 16 tokens: 64 requests in
# flight fill them, so decode workers also refuse transfers (no_capacity)
# and preempt.
WORKER = ["--model", "synthetic:tiny", "--kv-blocks", "512", "--step-us", "1000",
          "--prefill-ns-per-token", "20000", "--load-report-interval-ms", str(REPORT_MS)]
COUNTERS = ("kv_blocks_in_use", "kv_reserved_blocks", "kv_transfers_active")
REQUEST_TIMEOUT_S = LIMIT_S
SETTLE_LIMIT_S = 5


class PinnedWorker:
    """`fmwire worker` on a port of its own that it keeps across restarts."""

    def __init__(self, binary, env, role, folder):
        self.binary, self.env, self.role = binary, env, role
        self.endpoint = f"127.0.0.1:{free_port()}"
        # Standard error of every run, in a file: a pipe nobody reads would
        # stall a worker that logs a lot.
        self.log = open(os.path.join(folder, f"{role}-{self.endpoint.replace(':', '-')}.log"), "w+")
        self.process = None
        self.start()

    def start(self):
        """Starts it on its port; a port still held a moment after a kill
        is tried again."""
        deadline = time.monotonic() + LIMIT_S
        while True:
            self.log.write(f"--- started at {time.monotonic():.3f}\n")
            self.log.flush()
            process = subprocess.Popen(
                [self.binary, "worker", "--listen", self.endpoint, "--role", self.role, *WORKER],
                stdout=subprocess.PIPE, stderr=self.log, text=True, env=self.env)
            line = process.stdout.readline()
            if line.startswith("listening on "):
                self.process = process
                return
            process.kill()
            process.communicate()
            if "cannot listen" not in self.tail() or time.monotonic() > deadline:
                raise Failure(f"worker {self.endpoint} printed {line!r}; stderr {self.tail()!r}")
            time.sleep(0.05)

    def kill(self):
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()

    def tail(self):
        self.log.seek(0)
        return self.log.read()[-1000:]

    def check_alive(self):
        code = self.process.poll()
        if code is not None:
            raise Failure(f"{self.role} worker {self.endpoint} exited {code} unkilled: {self.tail()!r}")


class Gauges:
    """Each worker's KV counters, and the streams open, from the gateway's
    /metrics; None for a worker not on the page (not reported yet)."""

    def __init__(self, url, workers):
        self.url, self.workers = url, workers

    def read(self):
        _, page = http(self.url + "/metrics")
        gauges = {worker.endpoint: {name: metric(page, f'fmwire_gateway_worker_{name}{{worker="{worker.endpoint}"}}')
                                    for name in COUNTERS}
                  for worker in self.workers}
        gauges["gateway"] = {"streams_open": metric(page, "fmwire_gateway_streams_open")}
        return gauges

    def wait(self, predicate, what, limit_s):
        """Seconds until predicate(gauges) holds."""
        started = time.monotonic()
        gauges = {}
        while time.monotonic() - started < limit_s:
            gauges = self.read()
            if predicate(gauges):
                return time.monotonic() - started
            time.sleep(0.02)
        raise Failure(f"timed out after {limit_s} s waiting for {what}; gauges {gauges}")


def at_baseline(gauges):
    return all(value == 0 for counters in gauges.values() for value in counters.values())


class Outcomes:
    """How each request ended, counted, with the first example of each."""

    def __init__(self):
        self.started = 0
        self.counts = {"completed": 0, "cancelled": 0, "errored": 0, "truncated": 0, "hung": 0}
        self.examples = {}

    def count(self, outcome, detail=""):
        self.counts[outcome] += 1
        self.examples.setdefault(outcome, detail)


async def read_response_head(reader):
    """The status of an HTTP response, its headers read past."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed before the status line")
    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
        pass
    return int(status_line.split()[1])


async def read_chunks(reader):
    """The body of a chunked response, piece by piece."""
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            return
        piece = await reader.readexactly(size + 2)
        yield piece[:-2]


async def one_request(port, rng, outcomes):
    """A streaming completion; with probability CANCEL_SHARE the socket is
    closed after a random number of events (0: as soon as it is sent)."""
    max_tokens = rng.randint(4, 24)
    prompt = "".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(20, 600)))
    cancel_after = rng.randint(0, max_tokens // 2) if rng.random() < CANCEL_SHARE else None
    body = json.dumps({"model": "synthetic:tiny", "stream": True, "max_tokens": max_tokens,
                       "prompt": prompt}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        if cancel_after == 0:
            return outcomes.count("cancelled")
        status = await read_response_head(reader)
        if status != 200:
            return outcomes.count("errored", f"HTTP {status}: {(await reader.read(600)).decode(errors='replace')}")
        events, finished, pending = 0, False, b""
        async for piece in read_chunks(reader):
            pending += piece
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                data = [line[len(b"data: "):] for line in event.split(b"\n") if line.startswith(b"data: ")]
                if not data:
                    continue
                if data[0] == b"[DONE]":
                    if finished:
                        return outcomes.count("completed")
                    return outcomes.count("truncated", "[DONE] without a finish_reason before it")
                chunk = json.loads(data[0])
                if "error" in chunk:
                    return outcomes.count("errored", data[0].decode()[:300])
                finished = finished or any(choice.get("finish_reason") for choice in chunk["choices"])
                events += 1
                if cancel_after is not None and events >= cancel_after:
                    return outcomes.count("cancelled")
        return outcomes.count("truncated", f"the body ended after {events} events without [DONE] or an error")
    except (ConnectionError, asyncio.IncompleteReadError, ValueError) as error:
        return outcomes.count("truncated", f"{type(error).__name__}: {error}")
    finally:
        writer.transport.abort()  # as abrupt as a client that goes away


async def drive(port, outcomes, requests, rng):
    """`requests` more requests, IN_FLIGHT at a time, each given
    REQUEST_TIMEOUT_S to end."""
    last = outcomes.started + requests

    async def client():
        while outcomes.started < last:
            outcomes.started += 1
            number = outcomes.started
            try:
                await asyncio.wait_for(one_request(port, rng, outcomes), REQUEST_TIMEOUT_S)
            except asyncio.TimeoutError:
                outcomes.count("hung", f"request {number} still open after {REQUEST_TIMEOUT_S} s")

    await asyncio.gather(*(client() for _ in range(IN_FLIGHT)))


class Killer(threading.Thread):
    """During one round: SIGKILLs a worker each time another
    REQUESTS_PER_ROUND / (KILLS_PER_ROUND + 1) requests have started,
    prefill and decode in turn, picked among the workers of that role that
    report an open transfer; starts it again on its port 0-300 ms later."""

    def __init__(self, workers, gauges, outcomes, rng):
        super().__init__(daemon=True)
        self.workers, self.gauges, self.outcomes, self.rng = workers, gauges, outcomes, rng
        self.first = outcomes.started
        self.kills, self.mid_transfer, self.failure = [], 0, None
        self.stop = threading.Event()

    def run(self):
        try:
            for kill in range(KILLS_PER_ROUND):
                while self.outcomes.started - self.first < (kill + 1) * REQUESTS_PER_ROUND // (KILLS_PER_ROUND + 1):
                    if self.stop.wait(0.01):
                        return
                role = ("prefill", "decode")[kill % 2]
                victim = self.pick(role)
                victim.check_alive()
                victim.kill()
                self.kills.append(role)
                time.sleep(self.rng.uniform(0, 0.3))
                victim.start()
        except Exception as error:  # the main thread reports it
            self.failure = error

    def pick(self, role):
        """A worker of `role` that reports an open transfer within 0.5 s,
        else any of that role."""
        candidates = [worker for worker in self.workers if worker.role == role]
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            gauges = self.gauges.read()
            busy = [worker for worker in candidates if (gauges[worker.endpoint]["kv_transfers_active"] or 0) > 0]
            if busy:
                self.mid_transfer += 1
                return self.rng.choice(busy)
            time.sleep(0.005)
        return self.rng.choice(candidates)


def router_counts(stderr):
    """The numbers of the router's last line ("stopped after N streams
    finished, N failed, ... N split (N served whole after a part failed)")."""
    line = [text for text in stderr.splitlines() if "stopped after" in text][-1]
    return {name: int(re.search(r"(\d+) " + re.escape(name), line).group(1))
            for name in ("streams finished", "failed", "cancelled", "refused", "split", "served whole")}


def check_round(outcomes, router, gateway, workers, gauges):
    """The checks after each round; the seconds the counters took to settle."""
    counts = outcomes.counts
    check(sum(counts.values()) == outcomes.started, f"{sum(counts.values())} outcomes for {outcomes.started} requests")
    check(counts["hung"] == 0, f"{counts['hung']} requests hung: {outcomes.examples.get('hung')}")
    check(counts["truncated"] == 0,
          f"{counts['truncated']} streams ended without [DONE] or an error: {outcomes.examples.get('truncated')}")
    check(router.poll() is None, f"the router exited {router.poll()}")
    check(gateway.process.poll() is None, f"the gateway exited {gateway.process.poll()}")
    for worker in workers:
        worker.check_alive()
    settle_s = gauges.wait(at_baseline, "every worker's KV counters at baseline", SETTLE_LIMIT_S)
    # And there they stay, report after report.
    time.sleep(10 * REPORT_MS / 1000)
    gauges.wait(at_baseline, "every worker's KV counters to stay at baseline", 0.1)
    return settle_s


def stress(binary, env):
    seed = int(os.environ.get("FMWIRE_STRESS_SEED", random.randrange(1 << 30)))
    print(f"seed {seed} (FMWIRE_STRESS_SEED={seed} repeats its random choices)")
    requests_rng, victims_rng = random.Random(seed), random.Random(seed + 1)
    workers = []
    router = gateway = None
    folder = tempfile.TemporaryDirectory(prefix="fmwire-kv-stress-")
    router_log = open(os.path.join(folder.name, "router.log"), "w+")
    try:
        workers = [PinnedWorker(binary, env, role, folder.name) for role in ("prefill", "prefill", "decode", "decode")]
        router = subprocess.Popen(
            [binary, "router", "--listen", "127.0.0.1:0", "--workers", ",".join(w.endpoint for w in workers),
             "--keepalive-ms", "200", "--dead-after-ms", "600"],
            stdout=subprocess.PIPE, stderr=router_log, text=True, env=env)
        line = router.stdout.readline()
        check(line.startswith("listening on 127.0.0.1:"), f"router printed {line!r}")
        gateway = HttpServer(binary, env, "gateway", "--listen", "127.0.0.1:0", "--model", "synthetic:tiny",
                             "--router", line.split()[-1])
        gateway.watchdog.cancel()  # it would end the gateway mid-run; the finally below does
        port = int(gateway.url.rsplit(":", 1)[1])
        gauges = Gauges(gateway.url, workers)
        gauges.wait(at_baseline, "every worker's first load report", LIMIT_S)

        outcomes = Outcomes()
        kills, mid_transfer, settled = [], 0, []
        started = time.monotonic()
        for _ in range(ROUNDS):
            killer = Killer(workers, gauges, outcomes, victims_rng)
            killer.start()
            try:
                asyncio.run(drive(port, outcomes, REQUESTS_PER_ROUND, requests_rng))
            finally:
                killer.stop.set()
                killer.join(timeout=LIMIT_S)
            if killer.failure is not None:
                raise Failure(f"killing and restarting workers: {killer.failure!r}")
            kills += killer.kills
            mid_transfer += killer.mid_transfer
            settled.append(check_round(outcomes, router, gateway, workers, gauges))
        took_s = time.monotonic() - started

        router.send_signal(signal.SIGTERM)
        router.communicate(timeout=LIMIT_S)
        router_log.seek(0)
        router_errors = router_log.read()
        check(router.returncode == 0, f"the router exited {router.returncode}: {router_errors[-1000:]!r}")
        routed = router_counts(router_errors)
        code, _, errors = gateway.stop(signal.SIGTERM)
        check(code == 0, f"the gateway exited {code}: {errors[-1000:]!r}")
        for worker in workers:  # nothing open: each drains at once
            worker.process.send_signal(signal.SIGTERM)
            code = worker.process.wait(timeout=LIMIT_S)
            check(code == 0, f"{worker.role} worker {worker.endpoint} exited {code}: {worker.tail()!r}")

        counts = outcomes.counts
        requests = ROUNDS * REQUESTS_PER_ROUND
        transfers = routed["split"] - routed["served whole"]
        print(f"{requests} requests in {took_s:.1f} s: {counts['completed']} completed, {counts['cancelled']} "
              f"cancelled, {counts['errored']} errored, {counts['truncated']} cut short, {counts['hung']} hung; "
              f"{len(kills)} kills ({kills.count('prefill')} prefill, {kills.count('decode')} decode, {mid_transfer} "
              f"with a transfer open at the victim); {routed['split']} split by the router, {routed['served whole']} "
              f"of them served whole after a part failed; every worker's KV counters at baseline "
              f"{max(settled) * 1000:.0f} ms (at most) after each round's last request")
        if counts["errored"]:
            print(f"the first error: {outcomes.examples['errored']}")
        check(len(kills) == ROUNDS * KILLS_PER_ROUND, f"{len(kills)} kills of {ROUNDS * KILLS_PER_ROUND}")
        ended = routed["streams finished"] + routed["failed"] + routed["cancelled"] + routed["refused"]
        check(ended == requests, f"{ended} streams ended at the router for {requests} requests: {routed}")
        check(counts["completed"] >= requests // 2, f"only {counts['completed']} requests completed")
        # A kill ends at most the streams open then.
        check(counts["errored"] <= len(kills) * IN_FLIGHT, f"{counts['errored']} errors for {len(kills)} kills")
        check(transfers >= requests // 2, f"only {transfers} of {requests} requests split and not served whole")
    finally:
        if gateway is not None:
            gateway.kill()
        if router is not None and router.poll() is None:
            router.kill()
            router.wait()
        for worker in workers:
            worker.kill()
            worker.log.close()
        router_log.close()
        folder.cleanup()


def main():
    binary, backend = sys.argv[1:3]
    env = dict(os.environ, FMWIRE_IO_BACKEND=backend)
    try:
        stress(binary, env)
    except (Failure, subprocess.TimeoutExpired) as failure:
        print(f"FAILED kv_stress [{backend}]: {failure!r}")
        return 1
    print(f"ok kv_stress [{backend}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
