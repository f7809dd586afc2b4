#!/usr/bin/env python3
"""Chaos soak: clients stream through fmwire while its processes die and
its links fail, and every request is checked (issue 17).

    scripts/soak.py --fmwire build-release/cli/fmwire [--minutes 10] [--clients 6]

Topology: etcd, two routers (etcd discovery, --migrate), four workers (two
--role prefill, two --role decode: every request is split, the KV moving
worker to worker), a gateway given both routers, and clients: several
streaming through the gateway's OpenAI API (/v1/completions and
/v1/chat/completions, SSE) and one through the routers with `fmwire
generate`. As root each is a host of its own (scripts/netns_cluster.py:
network namespaces on a bridge); otherwise all on 127.0.0.1, where the
link faults are skipped with a line saying so.

Before the soak a colocated run (one worker, no fault) computes each
request's expected output. Requests are greedy (temperature 0) and seeded.

A warm-up (20 s, twice the clients, then on until the survivors' RSS
holds still, at most 60 s) precedes the baseline. Then faults, one per
15 s slot, in this order, repeated while time remains (each at least once):
  kill-worker    SIGKILL decode1, restarted 2 s later
  kill-router    SIGKILL a router (router1, router2 in turns), restarted 2 s later
  stop-worker    SIGSTOP prefill1 for 5 s, then SIGCONT
  cut-link       decode2's link down for 5 s, then up (netns only)
  netem          5% loss and 20 ms delay on prefill2's link for 8 s (netns with
                 the kernel's netem; without netem, loss is skipped with a line
                 and the link is held to 4 Mbit/s by tbf instead, a queue's delay)
  etcd-restart   etcd SIGTERMed and started again on its data 2 s later (skipped
                 when no etcd binary is installed; then workers are found by list)
  corrupt-chunk  prefill2 restarted with FMWIRE_FAULT_CORRUPT_KV_CHUNK=1 for 8 s
                 (every KV transfer it sends has its first chunk corrupted
                 after the digest), then restarted clean

The checker: every request ends either with exactly the expected output or
with a typed retryable error (HTTP 429/503 with an OpenAI error body, or
an SSE error event, whose code is worker_lost, no_worker, overloaded or
limit_exceeded; natively an error frame marked retryable or with one of
those codes), within REQUEST_BOUND_S (28 s: the longest outage, 5 s, plus
the dead-after time, 3 s, plus a KV session's timeout, 10 s, plus 10 s for
a shared machine); the SSE event ids
and the native frames' token indexes run 0..n-1 without a gap or a repeat,
and a stream cut by an error carries a prefix of the expected output.
After the run (clients stopped, the cluster left idle) the processes that
were never restarted are measured against their baseline (taken after the
warm-up, idle): KV blocks in use, reserved and held and open streams
(worker /metrics), open file descriptors (/proc/PID/fd), RSS (VmRSS; a
worker's without its KV cache's mapping, which is paged in as blocks are
first used and whose blocks are the counters above), each within 10%. The last line:

    soak: N requests, N exact, N retryable errors, 0 wrong, 0 hung, 0 leaked

Exit code 0 when wrong, hung and leaked are all 0; 1 otherwise (each one
printed above); 2 when the soak could not start. Teardown (every process
killed, every namespace removed) on every exit path.
"""
import argparse
import collections
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import netns_cluster  # noqa: E402

MODEL = "builtin"
KV_MEMORY_MIB = 256       # each worker's KV cache
DEAD_AFTER_MS = 3000      # routers and the gateway: a silent peer is lost after this
KV_TIMEOUT_MS = 10000     # workers: a KV session without progress ends after this
LONGEST_OUTAGE_S = 5      # SIGSTOP and link cut
# A request ends within: the longest outage, noticed after dead-after, then
# a KV session's timeout (a transfer stalled by the outage), plus 10 s for a
# shared 2-core machine (a request takes well under 1 s unloaded).
REQUEST_BOUND_S = LONGEST_OUTAGE_S + DEAD_AFTER_MS / 1000 + KV_TIMEOUT_MS / 1000 + 10
CLIENT_LIMIT_S = REQUEST_BOUND_S + 15   # curl's --max-time: past the bound, so a hang is seen as one
SLOT_S = 15
# The warm-up runs twice the clients (the load a survivor carries while its
# twin is down), so that the baseline is taken with every buffer and the
# allocator's heap at the high-water mark the faults will bring about.
WARMUP_S = 20
WARMUP_MAX_S = 60
COOLDOWN_S = 5
IDLE_LIMIT_S = 30
RETRYABLE_CODES = {"worker_lost", "no_worker", "overloaded", "limit_exceeded"}
FAULTS = ["kill-worker", "kill-router", "stop-worker", "cut-link", "netem", "etcd-restart", "corrupt-chunk"]

PROMPTS = [
    "Hi",
    "Once upon a time there was a wire",
    "The soak test asks every token to arrive exactly once, in order.",
    "x" * 40,
    "q" * 150,
    "A long prompt that spans many KV blocks: " + "the quick brown fox jumps over the lazy dog " * 5,
]
MAX_TOKENS = [16, 128, 400, 700]   # the built-in model's context is 1,024 tokens


def request_kinds():
    """Every (api, prompt, max_tokens) the clients send."""
    kinds = []
    for index, prompt in enumerate(PROMPTS):
        for max_tokens in MAX_TOKENS:
            api = "chat" if (index + max_tokens) % 3 == 0 else "completions"
            kinds.append((api, prompt, max_tokens))
    return kinds


def body_of(api, prompt, max_tokens, seed):
    body = {"model": MODEL, "max_tokens": max_tokens, "stream": True, "temperature": 0, "seed": seed}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def free_port():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


# ---------------------------------------------------------------- where processes run

class Loopback:
    """The Cluster interface (start, run, command, remove) on 127.0.0.1,
    for when namespaces cannot be made; each host's ports picked free once,
    so a restarted process comes back where it was."""

    def __init__(self, hosts):
        self.hosts = list(hosts)
        self.addresses = {host: "127.0.0.1" for host in hosts}
        self.processes = []
        self.has_netem = False
        self.removed = False

    def command(self, host, argv):
        return list(argv)

    def start(self, host, argv, **popen):
        process = subprocess.Popen(argv, **popen)
        self.processes.append(process)
        return process

    def run(self, host, argv, timeout, **run):
        run.setdefault("capture_output", True)
        run.setdefault("text", True)
        return subprocess.run(argv, timeout=timeout, **run)

    def remove(self):
        if self.removed:
            return
        self.removed = True
        netns_cluster.kill_all(self.processes)


class Role:
    """One fmwire (or etcd) process of the topology, restartable in place."""

    def __init__(self, soak, host, argv_of, port, env=None):
        self.soak = soak
        self.host = host
        self.argv_of = argv_of      # env -> argv
        self.port = port
        self.env = env or {}
        self.process = None
        self.restarts = 0
        self.incarnation = 0

    def start(self, extra_env=None):
        self.incarnation += 1
        log = open(os.path.join(self.soak.logs, f"{self.host}.{self.incarnation}.log"), "w")
        env = dict(os.environ, **self.env, **(extra_env or {}))
        self.process = self.soak.place.start(self.host, self.argv_of(), stdout=log, stderr=subprocess.STDOUT,
                                             env=env)
        log.close()
        self.soak.wait_listening(self.host, self.port)

    def signal(self, number):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(number)

    def kill(self):
        self.signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, limit_s=15):
        """SIGTERM (a drain), SIGKILL if it takes longer than limit_s."""
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            self.soak.note(f"{self.host} did not stop within {limit_s} s of SIGTERM: killed")
            self.kill()

    def restarted(self, extra_env=None):
        self.restarts += 1
        self.start(extra_env)


# ---------------------------------------------------------------- the soak

class Soak:
    def __init__(self, arguments):
        self.arguments = arguments
        self.binary = os.path.abspath(arguments.fmwire)
        self.logs = tempfile.mkdtemp(prefix="fmwire-soak-")
        self.lock = threading.Lock()
        self.results = []            # (outcome, detail, client, kind)
        self.errors_by_kind = collections.Counter()
        self.faults_applied = collections.Counter()
        self.faults_skipped = {}
        self.stop_clients = threading.Event()
        self.pause_clients = threading.Event()
        self.in_flight = 0
        self.expected = {}           # (api, prompt, max_tokens) -> text
        self.expected_ids = {}       # (prompt, max_tokens) -> token ids (native)
        self.has_etcd = shutil.which("etcd") is not None
        self.place = None
        self.roles = {}

    def note(self, line):
        print(f"soak: {line}", flush=True)

    # -------------------------------------------------------------- expected outputs

    def colocated(self):
        """One worker and a gateway on loopback, nothing failing: the
        expected text of every request kind and token ids of every prompt."""
        worker = subprocess.Popen([self.binary, "worker", "--listen", "127.0.0.1:0", "--model", MODEL],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        gateway = None
        try:
            endpoint = worker.stdout.readline().split()[-1]
            gateway = subprocess.Popen([self.binary, "gateway", "--listen", "127.0.0.1:0", "--workers", endpoint,
                                        "--model", MODEL], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            url = gateway.stdout.readline().split()[-1]
            for kind in request_kinds():
                api, prompt, max_tokens = kind
                outcome = self.classify_sse(*self.curl(None, url, kind, 1), kind=None)
                if outcome[0] != "complete":
                    raise RuntimeError(f"colocated run: {kind}: {outcome}")
                self.expected[kind] = outcome[1]
                if api == "completions":
                    result = subprocess.run([self.binary, "generate", "--endpoint", endpoint, "--max-tokens",
                                             str(max_tokens), "--seed", "1", "--json", prompt],
                                            capture_output=True, text=True, timeout=30)
                    frames = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
                    if result.returncode != 0 or frames[-1]["type"] != "finish":
                        raise RuntimeError(f"colocated generate: {kind}: {result.stderr[-300:]}")
                    self.expected_ids[(prompt, max_tokens)] = [t for f in frames if f["type"] == "tokens"
                                                               for t in f["token_ids"]]
        finally:
            for process in (gateway, worker):
                if process is not None and process.poll() is None:
                    process.kill()
                    process.wait()

    # -------------------------------------------------------------- clients

    def curl(self, host, url, kind, seed):
        """(curl exit code, HTTP status, body, seconds) of one streamed request."""
        api, prompt, max_tokens = kind
        path = "/v1/chat/completions" if api == "chat" else "/v1/completions"
        argv = ["curl", "-sS", "-N", "--noproxy", "*", "--max-time", str(CLIENT_LIMIT_S), "-o", "-",
                "-w", "\n%{http_code}", url + path, "-H", "Content-Type: application/json",
                "-d", json.dumps(body_of(api, prompt, max_tokens, seed))]
        if host is not None:
            argv = self.place.command(host, argv)
        started = time.monotonic()
        result = subprocess.run(argv, capture_output=True, text=True, timeout=CLIENT_LIMIT_S + 30)
        took = time.monotonic() - started
        body, _, status = result.stdout.rpartition("\n")
        return result.returncode, int(status) if status.isdigit() else 0, body, took, result.stderr

    def classify_sse(self, code, status, body, took, stderr, kind):
        """('complete', text) | ('exact'|'retryable'|'wrong'|'hung', detail)."""
        if code == 28 or took > REQUEST_BOUND_S:
            return "hung", f"ended after {took:.1f} s (bound {REQUEST_BOUND_S:.0f} s), curl exit {code}"
        if status in (429, 503):
            try:
                error = json.loads(body)["error"]
            except (ValueError, KeyError, TypeError):
                return "wrong", f"HTTP {status} without an OpenAI error body: {body[-300:]!r}"
            return "retryable", f"HTTP {status} {error.get('type')}/{error.get('code')}"
        if status != 200:
            return "wrong", f"HTTP {status} (curl exit {code}: {stderr.strip()[-200:]}): {body[-300:]!r}"
        text, ids, done, error = [], [], False, None
        for line in body.splitlines():
            if line.startswith("id: "):
                ids.append(line[4:])
            elif line.startswith("data: "):
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    continue
                try:
                    event = json.loads(data)
                except ValueError:
                    return "wrong", f"an SSE event that is not JSON: {data[:200]!r}"
                if "error" in event:
                    error = event["error"]
                    continue
                for choice in event.get("choices", []):
                    piece = choice.get("text")
                    if piece is None:
                        piece = (choice.get("delta") or {}).get("content")
                    text.append(piece or "")
        stitched = "".join(text)
        numbered = [int(i) for i in ids if i.isdigit()]
        if numbered != list(range(1, len(numbered) + 1)):
            return "wrong", f"SSE ids not 1..n once each: {ids[:50]}"
        if kind is None:  # the colocated run
            return ("complete", stitched) if done and error is None else ("failed", body[-300:])
        expected = self.expected[kind]
        if error is not None:
            if error.get("code") not in RETRYABLE_CODES:
                return "wrong", f"error event not retryable: {error}"
            if not expected.startswith(stitched):
                return "wrong", f"cut by {error.get('code')} after text that is not a prefix of the expected: " \
                                f"{stitched!r} vs {expected!r}"
            if done:
                return "wrong", f"[DONE] after an error event {error}"
            return "retryable", f"SSE error event {error.get('type')}/{error.get('code')}"
        if not done:
            return "wrong", f"the stream ended without [DONE] or an error (curl exit {code} " \
                            f"{stderr.strip()[-200:]}): {body[-300:]!r}"
        if stitched != expected:
            return "wrong", f"text {stitched!r} != expected {expected!r}"
        return "exact", ""

    def record(self, outcome, detail, client, kind, started):
        with self.lock:
            self.results.append((outcome, detail, client, kind, started))
            if outcome == "retryable":
                self.errors_by_kind[detail] += 1

    def gateway_client(self, number, stop=None, kinds=None):
        rng = random.Random(self.arguments.seed * 1000 + number)
        kinds = kinds or request_kinds()
        url = f"http://{self.address('gateway')}:{self.roles['gateway'].port}"
        stop = stop or self.stop_clients
        while not stop.is_set():
            if self.pause_clients.is_set():
                time.sleep(0.05)
                continue
            kind = rng.choice(kinds)
            started = time.monotonic()
            with self.lock:
                self.in_flight += 1
            try:
                outcome, detail = self.classify_sse(*self.curl("client", url, kind, rng.randrange(1 << 30)), kind=kind)
            except subprocess.TimeoutExpired:
                outcome, detail = "hung", "curl itself did not end"
            finally:
                with self.lock:
                    self.in_flight -= 1
            self.record(outcome, detail, f"gateway#{number}", kind, started - self.t0)

    def native_client(self):
        rng = random.Random(self.arguments.seed * 1000 + 999)
        kinds = [kind for kind in request_kinds() if kind[0] == "completions"]
        endpoints = ",".join(f"{self.address(name)}:{self.roles[name].port}" for name in ("router1", "router2"))
        while not self.stop_clients.is_set():
            if self.pause_clients.is_set():
                time.sleep(0.05)
                continue
            kind = rng.choice(kinds)
            _, prompt, max_tokens = kind
            argv = self.place.command("client", [self.binary, "generate", "--endpoint", endpoints, "--max-tokens",
                                                 str(max_tokens), "--seed", str(rng.randrange(1 << 30)), "--json",
                                                 "--log-level", "off", prompt])
            started = time.monotonic()
            with self.lock:
                self.in_flight += 1
            try:
                result = subprocess.run(argv, capture_output=True, text=True, timeout=CLIENT_LIMIT_S)
                took = time.monotonic() - started
                outcome, detail = self.classify_native(result, took, kind)
            except subprocess.TimeoutExpired:
                outcome, detail = "hung", f"fmwire generate did not end within {CLIENT_LIMIT_S:.0f} s"
            finally:
                with self.lock:
                    self.in_flight -= 1
            self.record(outcome, detail, "native", kind, started - self.t0)

    def classify_native(self, result, took, kind):
        _, prompt, max_tokens = kind
        if took > REQUEST_BOUND_S:
            return "hung", f"ended after {took:.1f} s (bound {REQUEST_BOUND_S:.0f} s)"
        try:
            frames = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
        except ValueError:
            return "wrong", f"output that is not JSON lines: {result.stdout[-300:]!r}"
        tokens = [frame for frame in frames if frame.get("type") == "tokens"]
        indexes = [frame["first_index"] + i for frame in tokens for i in range(len(frame["token_ids"]))]
        ids = [t for frame in tokens for t in frame["token_ids"]]
        expected = self.expected_ids[(prompt, max_tokens)]
        if indexes != list(range(len(indexes))):
            return "wrong", f"token indexes not 0..n-1 once each: {indexes[:50]}"
        last = frames[-1] if frames else {}
        if last.get("type") == "finish" and result.returncode == 0:
            if ids != expected:
                return "wrong", f"token ids {ids} != expected {expected}"
            return "exact", ""
        if last.get("type") == "error":
            if not last.get("retryable") and last.get("code") not in RETRYABLE_CODES:
                return "wrong", f"error not retryable: {last}"
            if ids != expected[:len(ids)]:
                return "wrong", f"cut by {last.get('code')} after ids that are not a prefix: {ids} vs {expected}"
            return "retryable", f"native error {last.get('code')}"
        return "wrong", f"exit {result.returncode} without a finish or error frame: {result.stdout[-300:]!r} " \
                        f"{result.stderr[-300:]!r}"

    # -------------------------------------------------------------- topology

    def address(self, host):
        return self.place.addresses[host]

    def wait_listening(self, host, port, limit_s=30):
        netns_cluster.wait_listening(_Probe(self, host), host, port, limit_s)

    def build(self):
        hosts = ["etcd", "router1", "router2", "prefill1", "prefill2", "decode1", "decode2", "gateway", "client"]
        self.namespaced = False
        if not self.arguments.loopback:
            try:
                self.place = netns_cluster.Cluster(hosts)
                self.namespaced = True
            except netns_cluster.ClusterUnavailable as reason:
                self.note(f"no network namespaces ({reason}): every process on 127.0.0.1, link faults skipped")
        if self.place is None:
            self.place = Loopback(hosts)
            _install_loopback_teardown(self.place)
        ports = {}
        for host in hosts:
            if self.namespaced:
                base = {"etcd": netns_cluster.ETCD_PORT, "gateway": netns_cluster.GATEWAY_PORT}
                ports[host] = base.get(host, netns_cluster.ROUTER_PORT if host.startswith("router")
                                       else netns_cluster.WORKER_PORT)
            else:
                ports[host] = free_port()
        metrics_port = {host: (9100 if self.namespaced else free_port()) for host in hosts}
        self.metrics_port = metrics_port
        listen_host = "0.0.0.0" if self.namespaced else "127.0.0.1"
        binary = self.binary
        etcd_url = f"http://{self.address('etcd')}:{ports['etcd']}" if self.has_etcd else None
        worker_names = ["prefill1", "prefill2", "decode1", "decode2"]
        if self.has_etcd:
            folder = os.path.join(self.logs, "etcd-data")
            peer_port = ports["etcd"] + 1 if self.namespaced else free_port()
            client = f"http://{self.address('etcd')}:{ports['etcd']}"
            peer = f"http://{self.address('etcd')}:{peer_port}"
            etcd_binary = shutil.which("etcd")
            self.roles["etcd"] = Role(self, "etcd", lambda: [
                etcd_binary, "--name", "default", "--data-dir", folder, "--listen-client-urls", client,
                "--advertise-client-urls", client, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"default={peer}"], ports["etcd"])
        else:
            self.note("etcd is not installed: workers found by list, the etcd-restart fault skipped")

        def worker_argv(name):
            role = "prefill" if name.startswith("prefill") else "decode"
            argv = [binary, "worker", "--listen", f"{listen_host}:{ports[name]}", "--model", MODEL, "--role", role,
                    "--kv-memory-mib", str(KV_MEMORY_MIB),
                    "--name", name, "--metrics-listen", f"{listen_host}:{metrics_port[name]}",
                    "--kv-timeout-ms", str(KV_TIMEOUT_MS), "--load-report-interval-ms", "50"]
            if etcd_url:
                argv += ["--etcd", etcd_url, "--advertise", f"{self.address(name) if not self.namespaced else name}"
                                                           f":{ports[name]}", "--etcd-ttl-s", "3"]
            return argv

        for name in worker_names:
            self.roles[name] = Role(self, name, lambda name=name: worker_argv(name), ports[name])

        def router_argv(name):
            argv = [binary, "router", "--listen", f"{listen_host}:{ports[name]}", "--migrate", "--name", name,
                    "--dead-after-ms", str(DEAD_AFTER_MS), "--metrics-listen", f"{listen_host}:{metrics_port[name]}"]
            if etcd_url:
                argv += ["--etcd", etcd_url, "--advertise",
                         f"{self.address(name) if not self.namespaced else name}:{ports[name]}", "--etcd-ttl-s", "3"]
            else:
                argv += ["--workers", ",".join(f"{self.address(w)}:{ports[w]}" for w in worker_names)]
            return argv

        for name in ("router1", "router2"):
            self.roles[name] = Role(self, name, lambda name=name: router_argv(name), ports[name])
        routers = ",".join(f"{self.address(r) if not self.namespaced else r}:{ports[r]}" for r in ("router1", "router2"))
        self.roles["gateway"] = Role(self, "gateway", lambda: [
            binary, "gateway", "--listen", f"{listen_host}:{ports['gateway']}", "--router", routers, "--model", MODEL,
            "--dead-after-ms", str(DEAD_AFTER_MS)], ports["gateway"])
        order = (["etcd"] if self.has_etcd else []) + worker_names + ["router1", "router2", "gateway"]
        for name in order:
            self.roles[name].start()
        self.note(f"{'namespaces' if self.namespaced else 'loopback'}: {', '.join(order)} started; "
                  f"netem {'present' if self.place.has_netem else 'absent'}; logs in {self.logs}")

    def worker_metrics(self, name):
        """{series: value} of a worker's /metrics, or None when unreachable."""
        url = f"http://{self.address(name)}:{self.metrics_port[name]}/metrics"
        try:
            result = self.place.run("client", ["curl", "-sS", "--noproxy", "*", "--max-time", "3", url], timeout=10)
        except subprocess.TimeoutExpired:
            return None
        if result.returncode != 0:
            return None
        values = {}
        for line in result.stdout.splitlines():
            if line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                try:
                    values[series] = float(value)
                except ValueError:
                    pass
        return values

    def integrity_failures(self):
        """KV chunks the decode workers refused for a digest mismatch."""
        return sum((self.worker_metrics(name) or {}).get("fmwire_worker_kv_integrity_failures_total", 0)
                   for name in ("decode1", "decode2"))

    def wait_split_ready(self, limit_s=30):
        """Until a request through the gateway is served exactly (the
        routers know both kinds of worker)."""
        kind = request_kinds()[0]
        url = f"http://{self.address('gateway')}:{self.roles['gateway'].port}"
        deadline = time.monotonic() + limit_s
        last = None
        while time.monotonic() < deadline:
            last = self.classify_sse(*self.curl("client", url, kind, 1), kind=kind)
            if last[0] == "exact":
                return
            time.sleep(0.2)
        raise RuntimeError(f"the cluster did not serve a request within {limit_s} s: {last}")

    # -------------------------------------------------------------- baseline and leaks

    def survivors(self):
        return [name for name, role in self.roles.items() if name != "etcd" and role.restarts == 0]

    def measure(self, name):
        role = self.roles[name]
        pid = role.process.pid
        numbers = {"fds": len(os.listdir(f"/proc/{pid}/fd"))}
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    numbers["rss_kib"] = int(line.split()[1])
        if name.startswith(("prefill", "decode")):
            # The KV cache is one mapping, paged in as blocks are first
            # used and kept by the prefix cache: it grows until every block
            # has been touched, bounded by --kv-memory-mib, and its blocks
            # are counted below. The rest of the RSS is what must come back.
            numbers["rss_kib"] -= mapping_rss_kib(pid, KV_MEMORY_MIB * 1024)
        if name.startswith(("prefill", "decode")):
            page = self.worker_metrics(name) or {}
            capacity = page.get("fmwire_worker_kv_blocks_capacity")
            free = page.get("fmwire_worker_kv_blocks_free")
            numbers["kv_blocks_in_use"] = None if capacity is None or free is None else capacity - free
            for series in ("kv_blocks_reserved", "kv_blocks_held", "open_streams", "running_sequences",
                           "kv_transfers_active"):
                numbers[series] = page.get(f"fmwire_worker_{series}")
        return numbers

    def wait_idle(self):
        """Until every live worker reports nothing running, open or in use."""
        deadline = time.monotonic() + IDLE_LIMIT_S
        while time.monotonic() < deadline:
            busy = []
            for name in ("prefill1", "prefill2", "decode1", "decode2"):
                page = self.worker_metrics(name)
                if page is None:
                    busy.append(f"{name} unreachable")
                    continue
                for series in ("open_streams", "running_sequences", "kv_transfers_active", "kv_blocks_reserved"):
                    if page.get(f"fmwire_worker_{series}", 0) != 0:
                        busy.append(f"{name} {series}={page.get(f'fmwire_worker_{series}')}")
            if not busy:
                return []
            time.sleep(0.2)
        return busy

    def leaks(self, baseline):
        found = []
        for name in self.survivors():
            now = self.measure(name)
            for key, before in baseline[name].items():
                after = now.get(key)
                if before is None or after is None:
                    found.append(f"{name} {key}: unreadable (baseline {before}, now {after})")
                elif after > before * 1.10 and after > before:
                    found.append(f"{name} {key}: {after:g} after the run, baseline {before:g} (more than 10% up)")
        return found

    # -------------------------------------------------------------- faults

    def fault(self, name, cycle):
        if name == "kill-worker":
            self.roles["decode1"].kill()
            time.sleep(2)
            self.roles["decode1"].restarted()
            return "SIGKILL decode1, restarted"
        if name == "kill-router":
            victim = "router1" if cycle % 2 == 0 else "router2"
            self.roles[victim].kill()
            time.sleep(2)
            self.roles[victim].restarted()
            return f"SIGKILL {victim}, restarted"
        if name == "stop-worker":
            self.roles["prefill1"].signal(signal.SIGSTOP)
            time.sleep(LONGEST_OUTAGE_S)
            self.roles["prefill1"].signal(signal.SIGCONT)
            return f"SIGSTOP prefill1 {LONGEST_OUTAGE_S} s, SIGCONT"
        if name == "cut-link":
            if not self.namespaced:
                return None
            self.place.cut("decode2")
            time.sleep(LONGEST_OUTAGE_S)
            self.place.restore("decode2")
            return f"decode2's link cut {LONGEST_OUTAGE_S} s, restored"
        if name == "netem":
            if not self.namespaced:
                return None
            space = self.place.namespace("prefill2")
            if self.place.has_netem:
                netns_cluster._run("tc", "-n", space, "qdisc", "add", "dev", "eth0", "root", "netem", "loss", "5%",
                                   "delay", "20ms")
                what = "5% loss + 20 ms delay (netem) on prefill2's link for 8 s"
            else:
                # No netem in this kernel: no loss; the delay of a slow
                # link's queue instead (tbf, 4 Mbit/s, up to 10 ms queued).
                self.place.shape("prefill2", rate_mbit=4)
                what = "no netem in this kernel: loss skipped; prefill2's link held to 4 Mbit/s (tbf) for 8 s"
            time.sleep(8)
            netns_cluster._run("tc", "-n", space, "qdisc", "del", "dev", "eth0", "root")
            return what
        if name == "etcd-restart":
            if not self.has_etcd:
                return None
            self.roles["etcd"].stop()
            time.sleep(2)
            self.roles["etcd"].restarted()
            return "etcd SIGTERM, restarted on its data"
        if name == "corrupt-chunk":
            caught_before = self.integrity_failures()
            self.roles["prefill2"].stop()
            self.roles["prefill2"].restarted({"FMWIRE_FAULT_CORRUPT_KV_CHUNK": "1"})
            time.sleep(8)
            self.roles["prefill2"].stop()
            self.roles["prefill2"].restarted()
            caught = self.integrity_failures() - caught_before
            return f"prefill2 corrupting the first chunk of every KV transfer for 8 s " \
                   f"({caught:g} caught by the decode workers' digest check)"
        raise ValueError(name)

    def skip_reason(self, name):
        if name == "cut-link" and not self.namespaced:
            return "not root / no namespaces: no link to cut on loopback"
        if name == "netem" and not self.namespaced:
            return "not root / no namespaces: no link to shape on loopback"
        if name == "netem":
            return "the kernel has no netem (tc qdisc add ... netem refused)"
        if name == "etcd-restart":
            return "no etcd binary installed"
        return "?"

    # -------------------------------------------------------------- the run

    def run(self):
        total_s = self.arguments.minutes * 60
        self.colocated()
        self.note(f"expected outputs of {len(self.expected)} request kinds from a colocated run")
        self.build()
        self.wait_split_ready()
        self.t0 = time.monotonic()
        threads = [threading.Thread(target=self.gateway_client, args=(n,), daemon=True)
                   for n in range(self.arguments.clients)]
        threads.append(threading.Thread(target=self.native_client, daemon=True))
        warmup_done = threading.Event()
        # The extra warm-up clients move the most KV (the longest prompt,
        # a short completion): each loop's provided receive buffers (16 MiB,
        # paged in as the ring cycles through them) fill sooner.
        heavy = [kind for kind in request_kinds() if kind[1] == PROMPTS[-1] and kind[2] == MAX_TOKENS[0]]
        extra = [threading.Thread(target=self.gateway_client, args=(100 + n, warmup_done, heavy), daemon=True)
                 for n in range(self.arguments.clients)]
        for thread in threads + extra:
            thread.start()
        time.sleep(WARMUP_S)
        # Then on until the survivors' RSS holds still (within 3% over 10 s),
        # for at most WARMUP_MAX_S in all.
        previous = {name: self.measure(name)["rss_kib"] for name in self.survivors()}
        moving = {}
        while time.monotonic() - self.t0 < WARMUP_MAX_S:
            time.sleep(10)
            now = {name: self.measure(name)["rss_kib"] for name in self.survivors()}
            moving = {name: (previous[name], now[name]) for name in now if now[name] > previous[name] * 1.03}
            if not moving:
                break
            previous = now
        else:
            self.note(f"RSS still growing after {WARMUP_MAX_S} s of warm-up: {moving}; baseline taken anyway")
        warmup_s = time.monotonic() - self.t0
        # Baseline: clients paused, the cluster idle.
        warmup_done.set()
        self.pause_clients.set()
        self.wait_clients_quiet()
        for thread in extra:
            thread.join(timeout=CLIENT_LIMIT_S + 40)
        busy = self.wait_idle()
        if busy:
            raise RuntimeError(f"not idle after the warm-up: {busy}")
        baseline = {name: self.measure(name) for name in self.survivors()}
        self.pause_clients.clear()
        self.note(f"baseline after {warmup_s:.0f} s of warm-up: {json.dumps(baseline)}")
        slots = max(len(FAULTS), int((total_s - COOLDOWN_S - (time.monotonic() - self.t0)) // SLOT_S))
        self.note(f"{slots} fault slots of {SLOT_S} s; every request bounded by {REQUEST_BOUND_S:.0f} s")
        for slot in range(slots):
            name = FAULTS[slot % len(FAULTS)]
            slot_start = time.monotonic()
            what = self.fault(name, slot // len(FAULTS))
            at = slot_start - self.t0
            if what is None:
                if name not in self.faults_skipped:
                    self.faults_skipped[name] = self.skip_reason(name)
                    self.note(f"fault {name} skipped: {self.faults_skipped[name]}")
            else:
                self.faults_applied[name] += 1
                self.note(f"t={at:.0f}s fault {name}: {what}")
            time.sleep(max(0.0, SLOT_S - (time.monotonic() - slot_start)))
        time.sleep(COOLDOWN_S)
        self.stop_clients.set()
        for thread in threads:
            thread.join(timeout=CLIENT_LIMIT_S + 40)
        hung_clients = [thread.name for thread in threads if thread.is_alive()]
        minutes = (time.monotonic() - self.t0) / 60
        busy = self.wait_idle()
        leaked = self.leaks(baseline)
        if busy:
            leaked += [f"not idle {IDLE_LIMIT_S} s after the clients stopped: {', '.join(busy)}"]
        return self.report(minutes, leaked, hung_clients, baseline)

    def wait_clients_quiet(self):
        deadline = time.monotonic() + CLIENT_LIMIT_S + 5
        while time.monotonic() < deadline:
            with self.lock:
                if self.in_flight == 0:
                    return
            time.sleep(0.05)

    def report(self, minutes, leaked, hung_clients, baseline):
        counts = collections.Counter(outcome for outcome, *_ in self.results)
        for outcome, detail, client, kind, started in self.results:
            if outcome in ("wrong", "hung"):
                print(f"soak: {outcome.upper()} t={started:.1f}s {client} {kind[0]} "
                      f"prompt={kind[1][:30]!r} max_tokens={kind[2]}: {detail}")
        for name in hung_clients:
            print(f"soak: HUNG client thread {name} still running")
        for line in leaked:
            print(f"soak: LEAKED {line}")
        survivors = self.survivors()
        self.note(f"{minutes:.1f} minutes; faults applied: "
                  + ", ".join(f"{name} x{count}" for name, count in self.faults_applied.items())
                  + ("; skipped: " + ", ".join(f"{n} ({r})" for n, r in self.faults_skipped.items())
                     if self.faults_skipped else ""))
        self.note("retryable errors by kind: " + (", ".join(f"{kind} x{count}" for kind, count in
                                                           self.errors_by_kind.most_common()) or "none"))
        self.note(f"survivors measured against their baseline: {', '.join(survivors)}: "
                  + json.dumps({name: self.measure(name) for name in survivors}))
        hung = counts["hung"] + len(hung_clients)
        print(f"soak: {len(self.results)} requests, {counts['exact']} exact, {counts['retryable']} retryable errors, "
              f"{counts['wrong']} wrong, {hung} hung, {len(leaked)} leaked", flush=True)
        return 0 if counts["wrong"] == 0 and hung == 0 and not leaked else 1

    def teardown(self, keep_logs):
        if self.place is not None:
            self.place.remove()
        if keep_logs:
            self.note(f"process logs kept in {self.logs}")
        else:
            shutil.rmtree(self.logs, ignore_errors=True)


def mapping_rss_kib(pid, size_kib):
    """Resident KiB of the process's mappings of exactly size_kib (the KV
    cache's; glibc maps an allocation that large on its own)."""
    resident = 0
    size = None
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            if line.startswith("Size:"):
                size = int(line.split()[1])
            elif line.startswith("Rss:") and size is not None and size_kib <= size <= size_kib + 8:
                resident += int(line.split()[1])
    return resident


class _Probe:
    """What netns_cluster.wait_listening needs (run on a host), probing
    from the client's host: on loopback the address is 127.0.0.1."""

    def __init__(self, soak, host):
        self.soak = soak
        self.host = host

    def run(self, host, argv, timeout):
        # netns_cluster's probe connects to (host name, port); on loopback
        # and from the client's namespace the name is resolved there.
        address = self.soak.address(self.host)
        argv = [part.replace(f"('{self.host}',", f"('{address}',") for part in argv]
        return self.soak.place.run("client", argv, timeout=timeout)


def _install_loopback_teardown(place):
    import atexit
    atexit.register(place.remove)

    def on_signal(number, _frame):
        place.remove()
        sys.exit(128 + number)

    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, on_signal)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--fmwire", default=os.path.join(HERE, "..", "build-release", "cli", "fmwire"))
    parser.add_argument("--clients", type=int, default=6, help="concurrent clients through the gateway")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--loopback", action="store_true", help="127.0.0.1 even as root")
    arguments = parser.parse_args()
    if arguments.minutes <= 0 or arguments.clients < 1:
        parser.error("--minutes must be positive and --clients at least 1")
    if not os.access(arguments.fmwire, os.X_OK):
        print(f"soak: {arguments.fmwire} is not an executable fmwire (build it first)", file=sys.stderr)
        return 2
    if shutil.which("curl") is None:
        print("soak: curl is not installed", file=sys.stderr)
        return 2
    soak = Soak(arguments)
    code = 2
    try:
        code = soak.run()
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        print(f"soak: could not run: {error}", flush=True)
        code = 2
    finally:
        soak.teardown(keep_logs=code != 0)
    return code


if __name__ == "__main__":
    sys.exit(main())
