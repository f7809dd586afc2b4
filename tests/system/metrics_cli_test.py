#!/usr/bin/env python3
"""Multi-process tests of /metrics on `fmwire worker` and `fmwire router`
(--metrics-listen), on 127.0.0.1: pages that pass `promtool check
metrics`, numbers that move as a stream goes through, KV transfer counters
on both workers of a split request, bad addresses refused, and the Grafana
dashboard in deploy/grafana, every query of which must name metrics that a
real worker, router and gateway export.

    metrics_cli_test.py FMWIRE_BINARY BACKEND SCENARIO

Same rules as native_cli_test.py: free ports, bounded waits, every process
killed on the way out.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from gateway_cli_test import HttpServer, http, metric
from native_cli_test import LIMIT_S, Failure, Server, check, generate, run_scenario
from router_cli_test import frames_of, stop_all, until

HERE = os.path.dirname(os.path.abspath(__file__))
DASHBOARD = os.path.join(HERE, "..", "..", "deploy", "grafana", "fmwire.json")
METRICS_LINE = re.compile(r"^metrics on (http://127\.0\.0\.1:\d+/metrics)$")


class Served(Server):
    """A worker or router started with --metrics-listen 127.0.0.1:0: its
    second line says where its /metrics is."""

    def __init__(self, binary, env, command, *extra):
        super().__init__(binary, env, command, "--metrics-listen", "127.0.0.1:0", *extra)
        line = self.process.stdout.readline().strip()
        found = METRICS_LINE.match(line)
        if not found:
            self.kill()
            raise Failure(f"{command} printed {line!r} after its address, not the metrics line")
        self.metrics_url = found.group(1)

    def page(self):
        status, text = http(self.metrics_url)
        check(status == 200, f"{self.metrics_url}: {status} {text[:200]!r}")
        return text

    def value(self, series):
        found = metric(self.page(), series)
        check(found is not None, f"no {series} at {self.metrics_url}")
        return found


def worker(binary, env, *extra):
    return Served(binary, env, "worker", "--model", "builtin", *extra)


def router(binary, env, workers, *extra):
    return Served(binary, env, "router", "--workers", ",".join(w.endpoint for w in workers), *extra)


def promtool(page, where):
    check(shutil.which("promtool"), "promtool is needed (Debian package prometheus): bash scripts/setup.sh installs it")
    result = subprocess.run(["promtool", "check", "metrics"], input=page, capture_output=True, text=True,
                            timeout=LIMIT_S)
    check(result.returncode == 0, f"promtool check metrics on {where}: {result.stdout}{result.stderr}\n{page}")


def streams_move_the_counters(binary, env):
    """A stream through a router: the worker's token, stream and step
    counters and the router's relayed frames and decisions grow, both pages
    pass promtool, and /health and an unknown path answer as they should."""
    serving = worker(binary, env)
    front = None
    try:
        front = router(binary, env, [serving])
        until(lambda: metric(front.page(), f'fmwire_router_worker_healthy{{worker="{serving.endpoint}"}}') == 1,
              what="the router to see its worker healthy")
        before = {"tokens": serving.value("fmwire_worker_generated_tokens_total"),
                  "sent": serving.value("fmwire_worker_sent_tokens_total"),
                  "steps": serving.value("fmwire_worker_step_seconds_count"),
                  "frames": front.value("fmwire_router_frames_relayed_total"),
                  "whole": front.value('fmwire_router_routing_decisions_total{policy="least-loaded",decision="whole"}')}
        result = generate(binary, env, front.endpoint, "--max-tokens", "16", "--json", "Hello")
        check(result.returncode == 0, f"generate: exit {result.returncode}: {result.stderr}")
        frames = frames_of(result.stdout)
        tokens_frames = sum(1 for frame in frames if frame["type"] == "tokens")
        worker_page, router_page = serving.page(), front.page()
        promtool(worker_page, "the worker")
        promtool(router_page, "the router")
        check(metric(worker_page, "fmwire_worker_generated_tokens_total") >= before["tokens"] + 16,
              f"tokens generated did not grow by 16 from {before['tokens']}:\n{worker_page}")
        check(metric(worker_page, "fmwire_worker_sent_tokens_total") == before["sent"] + 16,
              f"tokens sent did not grow by 16:\n{worker_page}")
        check(metric(worker_page, "fmwire_worker_step_seconds_count") >= before["steps"] + 16,
              f"fewer than 16 engine steps timed:\n{worker_page}")
        check(metric(worker_page, 'fmwire_worker_streams_total{event="finished"}') == 1, f"streams:\n{worker_page}")
        check(metric(worker_page, "fmwire_worker_kv_blocks_capacity") > 0, f"no KV blocks:\n{worker_page}")
        check(metric(router_page, "fmwire_router_frames_relayed_total") >= before["frames"] + tokens_frames,
              f"frames relayed did not grow by the {tokens_frames} Tokens frames:\n{router_page}")
        check(metric(router_page, 'fmwire_router_routing_decisions_total{policy="least-loaded",decision="whole"}')
              == before["whole"] + 1, f"decisions:\n{router_page}")
        check(metric(router_page, f'fmwire_router_worker_streams_opened_total{{worker="{serving.endpoint}"}}') == 1,
              f"per-worker streams:\n{router_page}")
        check(http(serving.metrics_url.replace("/metrics", "/health")) == (200, "ok\n"), "the worker's /health")
        check(http(front.metrics_url.replace("/metrics", "/nowhere"))[0] == 404, "an unknown path is not 404")
        # The services carry on after the scrapes, and stop cleanly; with
        # its worker gone the router refuses, and counts it by code.
        check(serving.stop() == 0, "the worker did not stop cleanly")
        # 0: gone on every loop (with several, the gauge is the share of
        # loops that see it healthy), so the request is refused wherever it lands.
        until(lambda: metric(front.page(), f'fmwire_router_worker_healthy{{worker="{serving.endpoint}"}}') == 0,
              what="the router to see its worker gone")
        refused = generate(binary, env, front.endpoint, "--max-tokens", "4", "Hello")
        check(refused.returncode == 1 and "no_worker" in refused.stderr, f"no worker: {refused.stderr!r}")
        router_page = front.page()
        check(metric(router_page, 'fmwire_router_refusals_total{code="no_worker"}') == 1, f"refusals:\n{router_page}")
        check(metric(router_page, 'fmwire_router_routing_decisions_total{policy="least-loaded",decision="refused"}') == 1,
              f"refused decisions:\n{router_page}")
        check(front.stop() == 0, "the router did not stop cleanly")
    finally:
        stop_all(front, serving)


def split_shows_kv_transfers(binary, env):
    """A request split between a prefill and a decode worker: the prefill
    worker's page counts one transfer sent, the decode worker's one
    received, the same bytes on both, chunks on both; the router counts a
    split decision."""
    prefill = worker(binary, env, "--role", "prefill", "--load-report-interval-ms", "20")
    decode = worker(binary, env, "--role", "decode", "--load-report-interval-ms", "20")
    front = None
    try:
        front = router(binary, env, [prefill, decode])
        until(lambda: metric(front.page(), f'fmwire_router_worker_info{{worker="{decode.endpoint}",role="decode"}}')
              == 1 and metric(front.page(), f'fmwire_router_worker_info{{worker="{prefill.endpoint}",role="prefill"}}')
              == 1, what="the router to learn both roles")
        result = generate(binary, env, front.endpoint, "--max-tokens", "12", "--json", "x" * 200)
        check(result.returncode == 0, f"generate: exit {result.returncode}: {result.stderr}")
        sent_page, received_page, router_page = prefill.page(), decode.page(), front.page()
        for page, where in ((sent_page, "the prefill worker"), (received_page, "the decode worker"),
                            (router_page, "the router")):
            promtool(page, where)
        check(metric(sent_page, 'fmwire_worker_info{name="%s",role="prefill"}' % prefill.endpoint) == 1,
              f"prefill info:\n{sent_page}")
        check(metric(sent_page, 'fmwire_worker_kv_transfers_total{outcome="sent"}') == 1, f"prefill:\n{sent_page}")
        check(metric(received_page, 'fmwire_worker_kv_transfers_total{outcome="received"}') == 1,
              f"decode:\n{received_page}")
        for page in (sent_page, received_page):
            check(metric(page, 'fmwire_worker_kv_transfers_total{outcome="failed"}') == 0, f"a failure:\n{page}")
            check(metric(page, "fmwire_worker_kv_integrity_failures_total") == 0, f"integrity:\n{page}")
        sent_bytes = metric(sent_page, 'fmwire_worker_kv_transfer_bytes_total{direction="sent"}')
        check(sent_bytes > 0, f"no bytes sent:\n{sent_page}")
        check(metric(received_page, 'fmwire_worker_kv_transfer_bytes_total{direction="received"}') == sent_bytes,
              f"bytes received are not the {sent_bytes} sent:\n{received_page}")
        check(metric(sent_page, 'fmwire_worker_kv_chunks_total{direction="sent"}') >= 1, f"chunks:\n{sent_page}")
        check(metric(received_page, 'fmwire_worker_kv_chunks_total{direction="received"}') >= 1,
              f"chunks:\n{received_page}")
        check(metric(received_page, "fmwire_worker_generated_tokens_total") >= 11, f"decode tokens:\n{received_page}")
        check(metric(router_page, 'fmwire_router_routing_decisions_total{policy="least-loaded",decision="split"}') == 1,
              f"split decision:\n{router_page}")
        check(metric(router_page, "fmwire_router_split_requests_total") == 1, f"split requests:\n{router_page}")
    finally:
        stop_all(front, prefill, decode)


def bad_metrics_address(binary, env):
    """--metrics-listen with an address that is not HOST:PORT, a port out
    of range, or a port already taken: exit 2 with a line naming the flag."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        for command in (["worker", "--listen", "127.0.0.1:0"], ["router", "--listen", "127.0.0.1:0", "--workers",
                                                                  "127.0.0.1:1"]):
            for bad in ("nonsense", "127.0.0.1:99999", f"127.0.0.1:{port}"):
                result = subprocess.run([binary, *command, "--metrics-listen", bad], capture_output=True, text=True,
                                        env=env, timeout=LIMIT_S)
                check(result.returncode == 2, f"{command[0]} --metrics-listen {bad}: exit {result.returncode}")
                check("--metrics-listen" in result.stderr, f"{command[0]} {bad}: stderr {result.stderr!r}")
                check("listening on" not in result.stdout, f"{command[0]} {bad} served: {result.stdout!r}")
    finally:
        taken.close()


def metric_names(expression):
    """The fmwire metric names a PromQL expression reads."""
    return set(re.findall(r"\bfmwire_[a-zA-Z0-9_:]*", expression))


def exported_names(page):
    """Every series name on a page, and every family its TYPE lines
    declare (a histogram's with _bucket, _sum and _count)."""
    names = set()
    for line in page.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind in ("histogram", "summary"):
                names |= {name + "_bucket", name + "_sum", name + "_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def dashboard_queries_exported(binary, env):
    """Every query of deploy/grafana/fmwire.json names only metrics that a
    worker, a router and a gateway in front of it export, each query at
    least one, and every query parses as PromQL (`promtool check rules`)."""
    with open(DASHBOARD) as file:
        dashboard = json.load(file)
    queries = []
    pending = list(dashboard["panels"])
    while pending:
        panel = pending.pop()
        pending += panel.get("panels", [])
        queries += [(panel["title"], target["expr"]) for target in panel.get("targets", [])]
    check(len(queries) >= 20, f"only {len(queries)} queries in {DASHBOARD}")

    serving = worker(binary, env)
    front = gateway = None
    try:
        front = router(binary, env, [serving])
        gateway = HttpServer(binary, env, "gateway", "--listen", "127.0.0.1:0", "--router", front.endpoint)
        status, _ = http(gateway.url + "/v1/completions", {"model": "builtin", "prompt": "Hi", "max_tokens": 4})
        check(status == 200, f"a completion through the gateway: {status}")
        until(lambda: metric(http(gateway.url + "/metrics")[1],
                             f'fmwire_gateway_worker_running_sequences{{worker="{serving.endpoint}"}}') is not None,
              what="the gateway to see the worker's load")
        exported = set()
        for page in (serving.page(), front.page(), http(gateway.url + "/metrics")[1]):
            exported |= exported_names(page)
        for title, expression in queries:
            names = metric_names(expression)
            check(names, f"panel {title!r}: {expression!r} names no fmwire metric")
            missing = names - exported
            check(not missing, f"panel {title!r}: {sorted(missing)} exported by no process; query {expression!r}")
    finally:
        stop_all(gateway, front, serving)

    # PromQL syntax: each query as a recording rule, Grafana's interval made concrete.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expression.replace("$__rate_interval", "1m")}
        for i, (_, expression) in enumerate(queries)]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(rules, file)  # YAML is a superset of JSON
    try:
        result = subprocess.run(["promtool", "check", "rules", file.name], capture_output=True, text=True,
                                timeout=LIMIT_S)
        check(result.returncode == 0, f"promtool check rules: {result.stdout}{result.stderr}")
    finally:
        os.unlink(file.name)


SCENARIOS = {
    "streams_move_the_counters": streams_move_the_counters,
    "split_shows_kv_transfers": split_shows_kv_transfers,
    "bad_metrics_address": bad_metrics_address,
    "dashboard_queries_exported": dashboard_queries_exported,
}



if __name__ == "__main__":
    sys.exit(run_scenario("metrics", SCENARIOS))
