#!/usr/bin/env python3
"""fmwire across simulated hosts: etcd, routers, workers, a gateway and a
client each in a network namespace of its own (scripts/netns_cluster.py),
joined by a bridge, finding each other by name (the namespaces' hosts
files) and through etcd, as on several nodes. Root only: skipped (77)
with the reason where namespaces cannot be made.

    cluster_cli_test.py FMWIRE_BINARY BACKEND SCENARIO

Every process runs in the cluster's namespaces and is killed, and every
namespace removed, on the way out, also when a scenario fails.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "scripts"))

from netns_cluster import (ROUTER_PORT, WORKER_PORT, GATEWAY_PORT, Cluster, ClusterUnavailable,  # noqa: E402
                           start_etcd, wait_listening)
from native_cli_test import LIMIT_S, SKIPPED, Failure, check, run_scenario  # noqa: E402

METRICS_PORT = 9100
# A synthetic model slow enough (5 ms a token) that a stream lasts while
# the test cuts a link or kills a process under it.
SLOW_MODEL = ["--model", "synthetic:tiny", "--step-us", "5000", "--load-report-interval-ms", "50"]


class FmwireCluster:
    """A Cluster with fmwire's processes on it, their stderr in files (quoted
    when a scenario fails)."""

    def __init__(self, binary, env, hosts):
        self.binary = binary
        self.env = env
        self.cluster = Cluster(hosts)
        self.logs = tempfile.mkdtemp(prefix="fmwire-cluster-")
        self.processes = {}
        self.etcd_folder = None

    def start(self, host, *arguments):
        log = open(os.path.join(self.logs, f"{host}.log"), "w")
        process = self.cluster.start(host, [self.binary, *arguments], stdout=log, stderr=subprocess.STDOUT,
                                     env=self.env)
        log.close()
        self.processes[host] = process
        return process

    def log(self, host):
        try:
            with open(os.path.join(self.logs, f"{host}.log")) as file:
                return file.read()
        except OSError:
            return ""

    def etcd(self):
        _, url, self.etcd_folder = start_etcd(self.cluster)
        return url

    def worker(self, host, etcd_url, *extra):
        self.start(host, "worker", "--listen", f"0.0.0.0:{WORKER_PORT}", "--etcd", etcd_url,
                   "--advertise", f"{host}:{WORKER_PORT}", "--etcd-ttl-s", "2", *extra)

    def router(self, host, etcd_url, *extra):
        self.start(host, "router", "--listen", f"0.0.0.0:{ROUTER_PORT}", "--etcd", etcd_url,
                   "--advertise", f"{host}:{ROUTER_PORT}", "--metrics-listen", f"0.0.0.0:{METRICS_PORT}", *extra)
        wait_listening(self.cluster, host, ROUTER_PORT)

    def gateway(self, *upstream):
        self.start("gateway", "gateway", "--listen", f"0.0.0.0:{GATEWAY_PORT}", *upstream)
        wait_listening(self.cluster, "gateway", GATEWAY_PORT)

    def router_metrics(self, router):
        result = self.cluster.run("client", ["curl", "-sS", "--max-time", "5", f"http://{router}:{METRICS_PORT}/metrics"],
                                  timeout=10)
        return result.stdout if result.returncode == 0 else ""

    def healthy_workers(self, router):
        page = self.router_metrics(router)
        return {name for name, value in re.findall(r'^fmwire_router_worker_healthy\{worker="([^"]+)"\} (\S+)$', page,
                                                   re.MULTILINE) if float(value) == 1}

    def running_at(self, router):
        """The workers with a sequence running, as the router sees them."""
        page = self.router_metrics(router)
        return {name for name, value in re.findall(
            r'^fmwire_router_worker_running_sequences\{worker="([^"]+)"\} (\S+)$', page, re.MULTILINE)
            if float(value) > 0}

    def wait(self, predicate, what, limit_s=LIMIT_S):
        started = time.monotonic()
        while time.monotonic() - started < limit_s:
            if predicate():
                return time.monotonic() - started
            time.sleep(0.05)
        raise Failure(f"timed out after {limit_s} s waiting for {what}")

    def stream(self, model, prompt, max_tokens):
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True})
        return self.cluster.start("client", ["curl", "-N", "-sS", "--max-time", str(LIMIT_S),
                                             f"http://gateway:{GATEWAY_PORT}/v1/completions",
                                             "-H", "Content-Type: application/json", "-d", body])

    def tell(self):
        """What each process wrote, for a failure."""
        return "; ".join(f"{host}: {self.log(host)[-600:]!r}" for host in self.processes)

    def close(self):
        self.cluster.remove()
        if self.etcd_folder:
            subprocess.run(["rm", "-rf", self.etcd_folder])
        subprocess.run(["rm", "-rf", self.logs])


def completion_pieces(text):
    """(the SSE ids in order, the chunks' texts, the finish_reason or None, error payloads)."""
    ids = [int(line[len("id: "):]) for line in text.splitlines() if line.startswith("id: ")]
    pieces, finish, errors = [], None, []
    for line in text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        payload = json.loads(line[len("data: "):])
        if "error" in payload:
            errors.append(payload["error"])
            continue
        for choice in payload.get("choices", []):
            pieces.append(choice.get("text", ""))
            finish = choice.get("finish_reason") or finish
    return ids, pieces, finish, errors


def with_cluster(hosts):
    """Runs the scenario on a FmwireCluster of `hosts`; SKIPPED where none can be made."""
    def wrap(scenario):
        def run(binary, env):
            try:
                fleet = FmwireCluster(binary, env, hosts)
            except ClusterUnavailable as reason:
                print(f"skipped: no network namespaces here: {reason}")
                return SKIPPED
            try:
                return scenario(fleet)
            except Failure as failure:
                raise Failure(f"{failure}; {fleet.tell()}") from None
            finally:
                fleet.close()
        run.__doc__ = scenario.__doc__
        return run
    return wrap


@with_cluster(["etcd", "router1", "worker1", "worker2", "worker3", "gateway", "client"])
def streams_across_hosts(fleet):
    """Three workers and a router find each other through etcd by host name;
    a client on a host of its own streams a completion through the gateway
    on another; every worker serves some of twelve streams."""
    etcd = fleet.etcd()
    for worker in ("worker1", "worker2", "worker3"):
        fleet.worker(worker, etcd, "--model", "builtin")
    fleet.router("router1", etcd, "--policy", "round-robin")
    took = fleet.wait(lambda: len(fleet.healthy_workers("router1")) == 3, "the router to find 3 workers in etcd")
    print(f"the router had the 3 workers from etcd {took:.2f} s after it listened")
    check(fleet.healthy_workers("router1") == {f"worker{i}:{WORKER_PORT}" for i in (1, 2, 3)},
          f"workers by name: {fleet.healthy_workers('router1')}")
    fleet.gateway("--router", f"router1:{ROUTER_PORT}")
    clients = [fleet.stream("builtin", "Once upon a time", 16) for _ in range(12)]
    for client in clients:
        output, errors = client.communicate(timeout=LIMIT_S)
        check(client.returncode == 0, f"curl exit {client.returncode}: {errors}")
        ids, pieces, finish, problems = completion_pieces(output)
        check(not problems and finish == "length" and len(pieces) >= 16, f"stream {output[-400:]!r}")
    page = fleet.router_metrics("router1")
    opened = {name: float(value) for name, value in re.findall(
        r'^fmwire_router_worker_streams_opened_total\{worker="([^"]+)"\} (\S+)$', page, re.MULTILINE)}
    check(len(opened) == 3 and all(value >= 1 for value in opened.values()), f"streams per worker {opened}")


@with_cluster(["etcd", "router1", "worker1", "worker2", "gateway", "client"])
def worker_link_cut_and_restored(fleet):
    """The link of the worker serving a stream goes down (its process runs
    on): the router finds the worker silent and carries the stream on at
    the other worker (--migrate), every token index once; when the link
    comes back, the worker is healthy at the router again and serves."""
    etcd = fleet.etcd()
    for worker in ("worker1", "worker2"):
        fleet.worker(worker, etcd, *SLOW_MODEL)
    fleet.router("router1", etcd, "--migrate")
    fleet.wait(lambda: len(fleet.healthy_workers("router1")) == 2, "the router to find both workers")
    fleet.gateway("--router", f"router1:{ROUTER_PORT}", "--model", "synthetic:tiny")
    client = fleet.stream("synthetic:tiny", "a long story", 600)  # 3 s at 5 ms a token
    fleet.wait(lambda: fleet.running_at("router1"), "the stream to run at a worker")
    serving = next(iter(fleet.running_at("router1"))).split(":")[0]
    fleet.cluster.cut(serving)
    cut = time.monotonic()
    output, errors = client.communicate(timeout=LIMIT_S + 5)
    ended = time.monotonic() - cut
    check(client.returncode == 0, f"curl exit {client.returncode}: {errors}")
    ids, pieces, finish, problems = completion_pieces(output)
    print(f"cut {serving}'s link; the stream finished {ended:.2f} s later, {len(pieces)} pieces, ids "
          f"{ids[:1]}..{ids[-1:]}")
    check(not problems, f"errors in the stream: {problems}")
    check(finish == "length", f"finish_reason {finish!r}: {output[-400:]!r}")
    check(ids == list(range(ids[0], ids[0] + len(ids))), f"ids not contiguous: {ids}")
    check(serving + f":{WORKER_PORT}" not in fleet.healthy_workers("router1"), "the cut worker still healthy")
    fleet.cluster.restore(serving)
    restored = time.monotonic()
    back = fleet.wait(lambda: serving + f":{WORKER_PORT}" in fleet.healthy_workers("router1"),
                      f"{serving} healthy again after its link came back")
    print(f"{serving} healthy at the router again {back:.2f} s after its link came back")
    del restored
    after = fleet.stream("synthetic:tiny", "again", 8)
    output, errors = after.communicate(timeout=LIMIT_S)
    check(after.returncode == 0 and completion_pieces(output)[2] == "length", f"after the restore: {output[-400:]!r}")


def carrying_router(fleet, routers):
    """The router with a client stream open now, or None."""
    for router in routers:
        found = re.search(r"^fmwire_router_open_streams (\S+)$", fleet.router_metrics(router), re.MULTILINE)
        if found and float(found.group(1)) > 0:
            return router
    return None


def served_since(fleet, since, limit_s=LIMIT_S):
    """Seconds from `since` until a short completion through the gateway is
    served whole (tried again at once after each failure)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        client = fleet.stream("synthetic:tiny", "quick", 2)
        output, _ = client.communicate(timeout=LIMIT_S)
        if client.returncode == 0 and completion_pieces(output)[2] == "length":
            return time.monotonic() - since
        time.sleep(0.01)
    raise Failure(f"no completion served within {limit_s} s")


def routers_behind_gateway(fleet, *gateway_extra):
    """etcd, 2 workers, 2 routers registered in etcd by name, and a gateway
    with one HTTP thread (one upstream connection) finding them there."""
    etcd = fleet.etcd()
    for worker in ("worker1", "worker2"):
        fleet.worker(worker, etcd, *SLOW_MODEL)
    for router in ("router1", "router2"):
        fleet.router(router, etcd, "--etcd-ttl-s", "2")
        fleet.wait(lambda: len(fleet.healthy_workers(router)) == 2, f"{router} to find both workers")
    fleet.gateway("--etcd", etcd, "--http-threads", "1", "--model", "synthetic:tiny", *gateway_extra)
    served_since(fleet, time.monotonic())


@with_cluster(["etcd", "router1", "router2", "worker1", "worker2", "gateway", "client"])
def router_killed_mid_stream(fleet):
    """The gateway finds two routers in etcd by name; the one carrying a
    stream is SIGKILLed: that stream ends with a retryable worker_lost
    error naming it, and new streams reach the other router within 1 s."""
    routers_behind_gateway(fleet)
    client = fleet.stream("synthetic:tiny", "a long story", 1000)
    fleet.wait(lambda: carrying_router(fleet, ("router1", "router2")), "the stream at a router")
    victim = carrying_router(fleet, ("router1", "router2"))
    killed = time.monotonic()
    fleet.processes[victim].kill()
    new_stream_s = served_since(fleet, killed)
    output, errors = client.communicate(timeout=LIMIT_S)
    ids, pieces, finish, problems = completion_pieces(output)
    print(f"SIGKILL of {victim}: a new stream served {new_stream_s * 1000:.0f} ms after; the lost stream "
          f"ended after {len(pieces)} pieces with {problems}")
    check(finish is None and problems and problems[-1].get("code") == "worker_lost" and victim in
          problems[-1].get("message", ""), f"the lost stream's end: {output[-500:]!r}")
    check(new_stream_s < 1.0, f"the first new stream took {new_stream_s:.2f} s")


@with_cluster(["etcd", "router1", "router2", "worker1", "worker2", "gateway", "client"])
def router_link_cut_and_restored(fleet):
    """The link of the router carrying a stream goes down (the router runs
    on, unreachable): the gateway finds it silent (keepalive: given up after
    1 s here, --dead-after-ms), the stream ends with a retryable error, new
    streams go to the other router; with the link back the router serves
    again."""
    routers_behind_gateway(fleet, "--keepalive-ms", "300", "--dead-after-ms", "1000")
    client = fleet.stream("synthetic:tiny", "a long story", 1000)
    fleet.wait(lambda: carrying_router(fleet, ("router1", "router2")), "the stream at a router")
    victim = carrying_router(fleet, ("router1", "router2"))
    survivor = "router2" if victim == "router1" else "router1"
    fleet.cluster.cut(victim)
    cut = time.monotonic()
    output, _ = client.communicate(timeout=LIMIT_S)
    ended_s = time.monotonic() - cut
    new_stream_s = served_since(fleet, cut)
    problems = completion_pieces(output)[3]
    print(f"cut {victim}'s link: its stream ended {ended_s:.2f} s later with {problems}; a new stream served "
          f"{new_stream_s:.2f} s after the cut")
    check(problems and problems[-1].get("code") == "worker_lost", f"the cut stream's end: {output[-500:]!r}")
    # Silent for 1 s, then given up; the default (3 s) would take longer.
    check(ended_s < 2.5 and new_stream_s < 2.5, f"ended after {ended_s:.2f} s, new stream after {new_stream_s:.2f} s")
    fleet.cluster.restore(victim)
    # The survivor gone, the restored router must serve (the gateway finds
    # it in etcd again once it re-registers, or still has it listed).
    fleet.processes[survivor].kill()
    restored_s = served_since(fleet, time.monotonic())
    print(f"{victim} serving again {restored_s:.2f} s after its link came back and {survivor} was killed")


SCENARIOS = {
    "router_killed_mid_stream": router_killed_mid_stream,
    "router_link_cut_and_restored": router_link_cut_and_restored,
    "streams_across_hosts": streams_across_hosts,
    "worker_link_cut_and_restored": worker_link_cut_and_restored,
}

if __name__ == "__main__":
    sys.exit(run_scenario("cluster", SCENARIOS))
