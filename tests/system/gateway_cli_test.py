#!/usr/bin/env python3
"""Multi-process tests of `fmwire up` and `fmwire gateway` with real clients:
OpenAI's official Node SDK (openai_client_test.mjs), curl, plain HTTP and
promtool, against real workers on 127.0.0.1; and 1,000 HTTP readers that
never read, to bound the gateway's memory per stalled stream.

    gateway_cli_test.py FMWIRE_BINARY BACKEND SCENARIO

Same rules as native_cli_test.py: free ports (port 0, read back from the
first line), bounded waits, every process killed on the way out. The openai
package is installed once into tests/system/node (npm ci, from its lock
file) when it is not there yet; scripts/test.sh does that up front.
"""
import fcntl
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.client import HTTPConnection, HTTPSConnection

from native_cli_test import LIMIT_S, Failure, check, read_until, run_scenario
from worker_cli_test import Worker

HERE = os.path.dirname(os.path.abspath(__file__))
NODE_DIR = os.path.join(HERE, "node")
CLIENT_TEST = os.path.join(HERE, "openai_client_test.mjs")
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, whatever http_proxy says
CHAT = {"model": "builtin", "messages": [{"role": "user", "content": "Hello"}], "stream": True, "max_tokens": 12}


class HttpServer:
    """`fmwire up` or `fmwire gateway` on a free port; its first line is
    "listening on http://HOST:PORT"."""

    def __init__(self, binary, env, *arguments):
        self.process = subprocess.Popen([binary, *arguments], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=env)
        # A blocking readline of its output ends, at the latest, when this kills it.
        self.watchdog = threading.Timer(4 * LIMIT_S, self.kill)
        self.watchdog.daemon = True
        self.watchdog.start()
        line = self.process.stdout.readline()
        if not re.match(r"listening on https?://127\.0\.0\.1:", line):
            self.kill()
            raise Failure(f"{arguments[0]} printed {line!r}; stderr {self.process.stderr.read()!r}")
        self.url = line.split()[-1]

    def stop(self, sig=signal.SIGINT):
        """Signals it; its exit code and the rest of its stdout and stderr."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            out, errors = self.process.communicate(timeout=LIMIT_S)
            return self.process.returncode, out, errors
        finally:
            self.kill()

    def kill(self):
        self.watchdog.cancel()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def up(binary, env, *extra):
    return HttpServer(binary, env, "up", "--port", "0", *extra)


def http(url, body=None, headers=None):
    """(status, body text) of a GET, or of a POST of `body` as JSON."""
    status, _, text = http_with_headers(url, body, headers)
    return status, text


def http_with_headers(url, body=None, headers=None):
    """(status, response headers, body text), as http()."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with NO_PROXY.open(request, timeout=LIMIT_S) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


def metric(page, series):
    """The value of `series` ("name{labels}") on a /metrics page, or None."""
    found = re.search("^" + re.escape(series) + r" (\S+)$", page, re.MULTILINE)
    return float(found.group(1)) if found else None


def resident_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise Failure(f"no VmRSS for process {pid}")


def cpu_seconds(pid):
    """User plus system CPU time the process has used."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(predicate, limit_s, what):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise Failure(f"timed out after {limit_s} s waiting for {what}")


def install_openai_package():
    """npm ci into tests/system/node once, whichever test gets there first."""
    if os.path.isdir(os.path.join(NODE_DIR, "node_modules", "openai")):
        return
    check(shutil.which("node") and shutil.which("npm"), "node and npm are needed: bash scripts/setup.sh installs them")
    with open(os.path.join(tempfile.gettempdir(), "fmwire-npm-ci.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(os.path.join(NODE_DIR, "node_modules", "openai")):
            return
        result = subprocess.run(["npm", "ci", "--prefix", NODE_DIR, "--no-audit", "--no-fund"],
                                capture_output=True, text=True, timeout=300)
        check(result.returncode == 0, f"npm ci --prefix {NODE_DIR} failed: {result.stderr[-2000:]}")


def run_openai_client(base_url, model, api_key=None, env=None):
    install_openai_package()
    arguments = ["node", CLIENT_TEST, base_url + "/v1", model] + ([api_key] if api_key else [])
    result = subprocess.run(arguments, capture_output=True, text=True, timeout=3 * LIMIT_S, env=env)
    check(result.returncode == 0, f"the openai client test failed:\n{result.stdout}{result.stderr}")
    passed = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    check(len(passed) >= (10 if api_key else 9), f"too few checks ran:\n{result.stdout}")


def curl_sse(url, body, *headers):
    """`curl -N` of a streaming request: (exit code, stdout)."""
    arguments = ["curl", "-N", "-sS", "--noproxy", "*", "--max-time", str(LIMIT_S), url + "/v1/chat/completions",
                 "-H", "Content-Type: application/json", "-d", json.dumps(body)]
    for header in headers:
        arguments += ["-H", header]
    result = subprocess.run(arguments, capture_output=True, text=True, timeout=LIMIT_S + 5)
    return result.returncode, result.stdout


def check_sse(text):
    """Lines "data: {chunk}" ... "data: [DONE]", with text in the chunks."""
    data = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    check(len(data) >= 3 and data[-1] == "[DONE]", f"SSE {text[-600:]!r}")
    chunks = [json.loads(payload) for payload in data[:-1]]
    content = "".join(choice.get("delta", {}).get("content") or "" for chunk in chunks for choice in chunk["choices"])
    check(content, f"no text in {text[-600:]!r}")
    check(any(choice.get("finish_reason") for chunk in chunks for choice in chunk["choices"]),
          f"no finish_reason in {text[-600:]!r}")


def check_metrics_page(url, workers):
    """/metrics has each worker's gauges, labelled by its endpoint, and
    passes `promtool check metrics`."""
    status, page = http(url + "/metrics")
    check(status == 200, f"/metrics {status}")
    for worker in workers:
        for name in ("kv_blocks_in_use", "kv_blocks_capacity", "running_sequences", "queued_sequences",
                     "paused_sequences"):
            series = f'fmwire_gateway_worker_{name}{{worker="{worker}"}}'
            check(metric(page, series) is not None, f"no {series} on /metrics:\n{page}")
    check(shutil.which("promtool"), "promtool is needed (Debian package prometheus): bash scripts/setup.sh installs it")
    result = subprocess.run(["promtool", "check", "metrics"], input=page, capture_output=True, text=True,
                            timeout=LIMIT_S)
    check(result.returncode == 0, f"promtool check metrics: {result.stdout}{result.stderr}\n{page}")


def openai_sdk_up(binary, env):
    server = up(binary, env, "--no-demo", "--workers", "2")
    try:
        run_openai_client(server.url, "builtin")
        code, _, errors = server.stop()
        check(code == 0, f"fmwire up exit {code}: {errors[-1000:]!r}")
    finally:
        server.kill()


def openai_sdk_gateway_workers(binary, env):
    workers = [Worker(binary, env, "--model", "builtin") for _ in range(2)]
    server = None
    try:
        server = HttpServer(binary, env, "gateway", "--listen", "127.0.0.1:0",
                            "--workers", ",".join(worker.endpoint for worker in workers), "--api-key", "sk-test-1")
        run_openai_client(server.url, "builtin", "sk-test-1")
        code, _, errors = server.stop(signal.SIGTERM)
        check(code == 0, f"fmwire gateway exit {code}: {errors[-1000:]!r}")
        for worker in workers:
            check(worker.stop() == 0, "a worker did not stop cleanly")
    finally:
        if server:
            server.kill()
        for worker in workers:
            worker.kill()


def curl_streams_sse(binary, env):
    server = up(binary, env, "--no-demo")
    try:
        code, text = curl_sse(server.url, CHAT)
        check(code == 0, f"curl exit {code}")
        check_sse(text)
        code, _, errors = server.stop()
        check(code == 0, f"fmwire up exit {code}: {errors[-1000:]!r}")
    finally:
        server.kill()


def curl_refuses_tools(binary, env):
    """A request with tools (which the gateway does not honour) is a 400
    naming `tools`, on both endpoints, rather than plain text."""
    server = up(binary, env, "--no-demo")
    try:
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
        for path, body in (("/v1/chat/completions", dict(CHAT, tools=tools)),
                           ("/v1/completions", {"prompt": "Hello", "max_tokens": 4, "tools": tools})):
            result = subprocess.run(["curl", "-sS", "--noproxy", "*", "--max-time", str(LIMIT_S), "-o", "-",
                                     "-w", "\n%{http_code}", server.url + path, "-H", "Content-Type: application/json",
                                     "-d", json.dumps(body)], capture_output=True, text=True, timeout=LIMIT_S + 5)
            check(result.returncode == 0, f"curl exit {result.returncode}: {result.stderr!r}")
            text, _, status = result.stdout.rpartition("\n")
            check(status == "400", f"{path} with tools: {status} {text!r}")
            error = json.loads(text)["error"]
            check(error["param"] == "tools" and error["code"] == "unsupported_parameter"
                  and "not supported" in error["message"], f"{path} with tools: {text!r}")
        code, _, errors = server.stop()
        check(code == 0, f"fmwire up exit {code}: {errors[-1000:]!r}")
    finally:
        server.kill()


def gateway_router_api_keys_file(binary, env):
    with tempfile.TemporaryDirectory() as folder:
        keys = os.path.join(folder, "keys")
        with open(keys, "w") as file:
            file.write("# the test's keys\n\nsk-from-file-1\n  sk-from-file-2  \n")
        empty = os.path.join(folder, "empty")
        with open(empty, "w") as file:
            file.write("# nothing here\n\n")
        for bad, says in ((os.path.join(folder, "missing"), "cannot read"), (empty, "no key")):
            result = subprocess.run([binary, "gateway", "--listen", "127.0.0.1:0", "--router", "127.0.0.1:1",
                                     "--api-keys", bad], capture_output=True, text=True, env=env, timeout=LIMIT_S)
            check(result.returncode == 2 and says in result.stderr, f"{bad}: exit {result.returncode} {result.stderr!r}")

        worker = Worker(binary, env, "--model", "builtin")
        router = server = None
        try:
            router = subprocess.Popen([binary, "router", "--listen", "127.0.0.1:0", "--workers", worker.endpoint],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            line = router.stdout.readline()
            check(line.startswith("listening on 127.0.0.1:"), f"router printed {line!r}")
            server = HttpServer(binary, env, "gateway", "--listen", "127.0.0.1:0", "--router", line.split()[-1],
                                "--api-keys", keys)
            code, text = curl_sse(server.url, CHAT, "Authorization: Bearer sk-from-file-2")
            check(code == 0, f"curl exit {code}")
            check_sse(text)
            status, body = http(server.url + "/v1/chat/completions", dict(CHAT, stream=False),
                                {"Authorization": "Bearer sk-not-in-file"})
            check(status == 401, f"a wrong key: {status} {body!r}")
            # The router's load reports of its worker reach the gateway's page.
            wait_for(lambda: f'worker="{worker.endpoint}"' in http(server.url + "/metrics")[1], LIMIT_S,
                     "the worker's gauges on /metrics")
            check_metrics_page(server.url, [worker.endpoint])
            code, _, errors = server.stop(signal.SIGTERM)
            check(code == 0, f"fmwire gateway exit {code}: {errors[-1000:]!r}")
            router.send_signal(signal.SIGTERM)
            check(router.wait(timeout=LIMIT_S) == 0, "the router did not stop cleanly")
            check(worker.stop() == 0, "the worker did not stop cleanly")
        finally:
            if server:
                server.kill()
            if router and router.poll() is None:
                router.kill()
                router.wait()
            worker.kill()


class KeyedGateway:
    """`fmwire gateway` with an embedded router in front of one builtin
    worker, taking the keys sk-first and sk-second; `extra` are more flags."""

    KEYS = ("sk-first", "sk-second")

    def __init__(self, binary, env, *extra):
        self.worker = Worker(binary, env, "--model", "builtin")
        self.server = None
        try:
            self.server = HttpServer(binary, env, "gateway", "--listen", "127.0.0.1:0", "--workers",
                                     self.worker.endpoint, "--api-key", self.KEYS[0], "--api-key", self.KEYS[1], *extra)
        except BaseException:
            self.worker.kill()
            raise
        self.url = self.server.url

    def stop(self):
        code, _, errors = self.server.stop(signal.SIGTERM)
        check(code == 0, f"fmwire gateway exit {code}: {errors[-1000:]!r}")
        check(self.worker.stop() == 0, "the worker did not stop cleanly")

    def kill(self):
        if self.server:
            self.server.kill()
        self.worker.kill()


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def gateway_wrong_key_refused(binary, env):
    """No key, a wrong key, and a configured key's prefix are a 401 with
    WWW-Authenticate and OpenAI's error; either configured key is served."""
    gateway = KeyedGateway(binary, env)
    try:
        request = dict(CHAT, stream=False)
        for headers in ({}, bearer("sk-wrong"), bearer("sk-firs"), bearer("sk-firstx"), {"Authorization": "sk-first"}):
            status, answer_headers, body = http_with_headers(gateway.url + "/v1/chat/completions", request, headers)
            check(status == 401, f"{headers}: {status} {body!r}")
            check(answer_headers.get("WWW-Authenticate") == "Bearer", f"{headers}: headers {dict(answer_headers)}")
            check(json.loads(body)["error"]["code"] == "invalid_api_key", f"{headers}: {body!r}")
        for key in KeyedGateway.KEYS:
            status, body = http(gateway.url + "/v1/chat/completions", request, bearer(key))
            check(status == 200, f"{key}: {status} {body!r}")
        gateway.stop()
    finally:
        gateway.kill()


def gateway_rate_limit_429(binary, env):
    """--rate-limit 0.5 (a request per 2 s a key): a key's second request at
    once is a 429 with Retry-After: 2 and OpenAI's rate-limit error; the
    other key is served meanwhile; after the wait the first is again. A bad
    --rate-limit exits 2 with the reason."""
    for command in (["gateway", "--router", "127.0.0.1:1"], ["up", "--no-demo", "--port", "0"]):
        result = subprocess.run([binary, *command, "--rate-limit", "5,lots"], capture_output=True, text=True,
                                env=env, timeout=LIMIT_S)
        check(result.returncode == 2 and "bad tokens per minute 'lots'" in result.stderr,
              f"{command[0]} --rate-limit 5,lots: exit {result.returncode} {result.stderr!r}")
    gateway = KeyedGateway(binary, env, "--rate-limit", "0.5")
    try:
        request = dict(CHAT, stream=False, max_tokens=4)
        status, body = http(gateway.url + "/v1/chat/completions", request, bearer("sk-first"))
        check(status == 200, f"first request: {status} {body!r}")
        refused_at = time.monotonic()
        status, headers, body = http_with_headers(gateway.url + "/v1/chat/completions", request, bearer("sk-first"))
        check(status == 429, f"second request at once: {status} {body!r}")
        check(headers.get("Retry-After") == "2", f"Retry-After {headers.get('Retry-After')!r}")
        error = json.loads(body)["error"]
        check(error["code"] == "rate_limit_exceeded" and error["type"] == "requests", f"429 body {body!r}")
        status, body = http(gateway.url + "/v1/chat/completions", request, bearer("sk-second"))
        check(status == 200, f"the other key: {status} {body!r}")
        time.sleep(max(0.0, refused_at + 2.05 - time.monotonic()))  # what Retry-After said
        status, body = http(gateway.url + "/v1/chat/completions", request, bearer("sk-first"))
        check(status == 200, f"after Retry-After: {status} {body!r}")
        gateway.stop()
    finally:
        gateway.kill()


def gateway_overload_429(binary, env):
    """A worker of 2 batch slots and --max-waiting 2 behind a gateway, 12
    streaming requests at once: those past the 4 it holds get a 429 with
    Retry-After and OpenAI's error (code "overloaded") at once, before any
    event; the ones taken stream every token; the worker counts the
    refusals; once its queue drains it serves again."""
    from metrics_cli_test import Served  # here: it imports this module
    worker = Served(binary, env, "worker", "--model", "synthetic:tiny", "--step-us", "3000", "--max-running", "2",
                    "--max-waiting", "2")
    gateway = None
    try:
        gateway = HttpServer(binary, env, "gateway", "--listen", "127.0.0.1:0", "--workers", worker.endpoint,
                             "--model", "synthetic:tiny")
        request = dict(CHAT, model="synthetic:tiny", max_tokens=40)
        outcomes = [None] * 12
        ready = threading.Barrier(len(outcomes))

        def send(i):
            ready.wait()
            outcomes[i] = http_with_headers(gateway.url + "/v1/chat/completions", request)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(outcomes))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(LIMIT_S)
        check(all(outcome is not None for outcome in outcomes), f"unanswered: {outcomes}")
        served = [body for status, _, body in outcomes if status == 200]
        refused = [(headers, body) for status, headers, body in outcomes if status == 429]
        check(len(served) + len(refused) == len(outcomes), f"statuses {[outcome[0] for outcome in outcomes]}")
        check(len(served) >= 4 and len(refused) >= 1, f"{len(served)} served, {len(refused)} refused")
        for body in served:
            events = [line for line in body.splitlines() if line.startswith("data: {")]
            content = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or "" for line in events
                              if json.loads(line[6:])["choices"])
            check(body.rstrip().endswith("data: [DONE]") and len(events) >= 40,
                  f"a served stream: {len(events)} events, {body[-200:]!r}")
            check(content, "a served stream carried no text")
        for headers, body in refused:
            check(int(headers.get("Retry-After", "0")) >= 1, f"Retry-After {headers.get('Retry-After')!r}")
            error = json.loads(body)["error"]
            check(error["code"] == "overloaded" and error["type"] == "rate_limit_error" and
                  "--max-waiting" in error["message"], f"429 body {body!r}")
        overloaded = worker.value('fmwire_worker_streams_total{event="overloaded"}')
        check(overloaded == len(refused), f"the worker counted {overloaded} overloaded of {len(refused)} refused")
        status, body = http(gateway.url + "/v1/chat/completions", dict(request, stream=False, max_tokens=4))
        check(status == 200, f"after the burst: {status} {body!r}")
        code, _, errors = gateway.stop()
        check(code == 0, f"fmwire gateway exit {code}: {errors[-1000:]!r}")
        check(worker.stop() == 0, "the worker did not stop cleanly")
    finally:
        if gateway:
            gateway.kill()
        worker.kill()


def gateway_resume_other_key_404(binary, env):
    """A resumable stream cut after its first event: another key's GET
    /v1/streams/<id> is the 404 of an id that never was; the opener's key
    gets the rest, from event 2 to [DONE]."""
    gateway = KeyedGateway(binary, env)
    try:
        host, port = gateway.url[len("http://"):].rsplit(":", 1)
        connection = HTTPConnection(host, int(port), timeout=LIMIT_S)
        connection.request("POST", "/v1/chat/completions", json.dumps(dict(CHAT, max_tokens=40)),
                           {"Content-Type": "application/json", "X-Fmwire-Resumable": "1", **bearer("sk-first")})
        response = connection.getresponse()
        check(response.status == 200, f"resumable stream: {response.status}")
        stream_id = response.getheader("X-Fmwire-Stream-Id")
        check(re.fullmatch(r"chatcmpl-[0-9a-f]{32}", stream_id or ""), f"stream id {stream_id!r}: not 128 bits")
        first = response.readline().decode()
        check(first == "id: 1\n", f"first line {first!r}")
        connection.close()

        status, body = http(gateway.url + "/v1/streams/" + stream_id, None,
                            {**bearer("sk-second"), "Last-Event-ID": "1"})
        never = "chatcmpl-" + "0" * 32
        status_never, body_never = http(gateway.url + "/v1/streams/" + never, None, bearer("sk-second"))
        check(status == 404 and status_never == 404, f"another key: {status} {body!r}; unknown id: {status_never}")
        check(json.loads(body)["error"]["code"] == json.loads(body_never)["error"]["code"] == "stream_not_found",
              f"{body!r} / {body_never!r}")

        status, body = http(gateway.url + "/v1/streams/" + stream_id, None, {**bearer("sk-first"), "Last-Event-ID": "1"})
        check(status == 200, f"the opener's key: {status} {body[-400:]!r}")
        ids = [int(line[len("id: "):]) for line in body.splitlines() if line.startswith("id: ")]
        check(ids and ids[0] == 2 and ids == list(range(2, 2 + len(ids))), f"event ids {ids}")
        check(body.rstrip().endswith("data: [DONE]"), f"resumed stream's end {body[-400:]!r}")
        gateway.stop()
    finally:
        gateway.kill()


def make_certificate(folder, name, ca=None):
    """A P-256 key and certificate for 127.0.0.1 and localhost, made now
    (never committed): self-signed (a CA) when `ca` is None, else signed
    by `ca`, a (certificate, key) pair. Returns (certificate, key) paths."""
    key, certificate = os.path.join(folder, name + ".key"), os.path.join(folder, name + ".pem")
    request = ["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key,
               "-subj", f"/CN={name}", "-days", "1"]
    if ca is None:
        request += ["-x509", "-out", certificate]
    else:
        request += ["-out", certificate + ".csr"]
    result = subprocess.run(request, capture_output=True, text=True, timeout=LIMIT_S)
    check(result.returncode == 0, f"openssl req: {result.stderr}")
    if ca is not None:
        extensions = os.path.join(folder, name + ".ext")
        with open(extensions, "w") as file:
            file.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        result = subprocess.run(["openssl", "x509", "-req", "-in", certificate + ".csr", "-CA", ca[0], "-CAkey", ca[1],
                                 "-CAcreateserial", "-days", "1", "-extfile", extensions, "-out", certificate],
                                capture_output=True, text=True, timeout=LIMIT_S)
        check(result.returncode == 0, f"openssl x509: {result.stderr}")
    return certificate, key


def tls_files(folder):
    """A test CA and a server certificate it signed: (ca, certificate, key)."""
    ca = make_certificate(folder, "fmwire-test-ca")
    certificate, key = make_certificate(folder, "server", ca)
    return ca[0], certificate, key


def s_client(port, version, ca):
    """`openssl s_client -VERSION` to the port, willing to speak old
    versions (security level 0, so that a refusal is the server's): (exit
    code, output)."""
    result = subprocess.run(["openssl", "s_client", "-" + version, "-cipher", "DEFAULT:@SECLEVEL=0", "-connect",
                             f"127.0.0.1:{port}", "-CAfile", ca, "-verify_return_error"],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=LIMIT_S)
    return result.returncode, result.stdout + result.stderr


def https_tls_versions(binary, env):
    """`fmwire up --tls-cert --tls-key`: TLS 1.0 and 1.1 refused (a
    protocol_version alert), 1.2 and 1.3 accepted with AEAD ciphers, curl
    streams SSE over https with the test CA; half a pair exits 2."""
    with tempfile.TemporaryDirectory() as folder:
        ca, certificate, key = tls_files(folder)
        result = subprocess.run([binary, "up", "--no-demo", "--port", "0", "--tls-cert", certificate],
                                capture_output=True, text=True, env=env, timeout=LIMIT_S)
        check(result.returncode == 2 and "--tls-key" in result.stderr, f"no key: {result.returncode} {result.stderr!r}")
        server = up(binary, env, "--no-demo", "--workers", "1", "--tls-cert", certificate, "--tls-key", key)
        try:
            check(server.url.startswith("https://"), f"url {server.url}")
            port = int(server.url.rsplit(":", 1)[1])
            for version in ("tls1", "tls1_1"):
                code, text = s_client(port, version, ca)
                check(code != 0 and "alert protocol version" in text, f"{version} not refused: {code} {text[-800:]!r}")
            for version, name in (("tls1_2", "TLSv1.2"), ("tls1_3", "TLSv1.3")):
                code, text = s_client(port, version, ca)
                agreed = re.search(r"New, (\S+), Cipher is (\S+)", text)
                check(code == 0 and agreed and agreed.group(1) == name, f"{version} refused: {code} {text[-800:]!r}")
                check("GCM" in agreed.group(2) or "CHACHA20" in agreed.group(2), f"{version}: {agreed.group(2)}")
            arguments = ["curl", "-N", "-sS", "--noproxy", "*", "--cacert", ca, "--max-time", str(LIMIT_S),
                         server.url + "/v1/chat/completions", "-H", "Content-Type: application/json",
                         "-d", json.dumps(CHAT)]
            result = subprocess.run(arguments, capture_output=True, text=True, timeout=LIMIT_S + 5)
            check(result.returncode == 0, f"curl over https: exit {result.returncode} {result.stderr!r}")
            check_sse(result.stdout)
            code, _, errors = server.stop()
            check(code == 0, f"fmwire up exit {code}: {errors[-1000:]!r}")
        finally:
            server.kill()


def openai_sdk_https(binary, env):
    """OpenAI's Node SDK against `fmwire gateway` over https, trusting the
    test CA through NODE_EXTRA_CA_CERTS."""
    with tempfile.TemporaryDirectory() as folder:
        ca, certificate, key = tls_files(folder)
        gateway = KeyedGateway(binary, env, "--tls-cert", certificate, "--tls-key", key)
        try:
            check(gateway.url.startswith("https://"), f"url {gateway.url}")
            run_openai_client(gateway.url, "builtin", KeyedGateway.KEYS[1], dict(os.environ, NODE_EXTRA_CA_CERTS=ca))
            gateway.stop()
        finally:
            gateway.kill()


def https_client(url, cafile):
    host, port = url[len("https://"):].rsplit(":", 1)
    return HTTPSConnection(host, int(port), timeout=LIMIT_S, context=ssl.create_default_context(cafile=cafile))


def served_certificate(url, cafile):
    """The DER certificate a new TLS connection to the gateway gets."""
    connection = https_client(url, cafile)
    try:
        connection.connect()
        return connection.sock.getpeercert(binary_form=True)
    finally:
        connection.close()


def open_sse(url, cafile, body, headers):
    """A streaming request over https: (connection, response) once its
    first event line has come."""
    connection = https_client(url, cafile)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json", **headers})
    response = connection.getresponse()
    if response.status != 200:
        raise Failure(f"stream over https: {response.status} {response.read()[:400]!r}")
    first = response.readline().decode()
    check(first == "id: 1\n", f"first line {first!r}")
    return connection, response


def https_reload_keeps_stream(binary, env):
    """SIGHUP with a new certificate in the files: new connections get it,
    a stream open over the old one goes on to [DONE] with every event; a
    SIGHUP with a broken file keeps the certificate served and says so."""
    with tempfile.TemporaryDirectory() as folder:
        ca, certificate, key = tls_files(folder)
        worker = Worker(binary, env, "--model", "synthetic:tiny", "--step-us", "10000")
        server = None
        try:
            server = HttpServer(binary, env, "gateway", "--listen", "127.0.0.1:0", "--workers", worker.endpoint,
                                "--tls-cert", certificate, "--tls-key", key)
            before = served_certificate(server.url, ca)
            connection, response = open_sse(server.url, ca, dict(CHAT, max_tokens=200), {})
            renewed, renewed_key = make_certificate(folder, "renewed", (os.path.join(folder, "fmwire-test-ca.pem"),
                                                                       os.path.join(folder, "fmwire-test-ca.key")))
            shutil.copyfile(renewed, certificate)
            shutil.copyfile(renewed_key, key)
            server.process.send_signal(signal.SIGHUP)
            wait_for(lambda: served_certificate(server.url, ca) != before, LIMIT_S, "the renewed certificate served")
            after = served_certificate(server.url, ca)
            with open(certificate, "w") as file:
                file.write("not a certificate\n")
            server.process.send_signal(signal.SIGHUP)
            time.sleep(0.3)
            check(served_certificate(server.url, ca) == after, "a broken certificate file replaced the one served")
            rest = response.read().decode()
            connection.close()
            ids = [int(line[len("id: "):]) for line in rest.splitlines() if line.startswith("id: ")]
            check(ids and ids == list(range(2, 2 + len(ids))), f"the open stream's event ids after the reload: {ids}")
            check(rest.rstrip().endswith("data: [DONE]"), f"the open stream's end {rest[-400:]!r}")
            code, _, errors = server.stop(signal.SIGTERM)
            check(code == 0, f"fmwire gateway exit {code}: {errors[-1000:]!r}")
            check("SIGHUP: TLS certificate loaded again" in errors, f"stderr {errors[-1000:]!r}")
            check("still serving the one loaded before" in errors, f"stderr {errors[-1000:]!r}")
            check(worker.stop() == 0, "the worker did not stop cleanly")
        finally:
            if server:
                server.kill()
            worker.kill()


def https_resume_on_another_thread(binary, env):
    """A resumable stream over https, cut and resumed: the resuming
    connection lands on the next HTTP thread (connections are handed round
    in turn) and its TLS session moves to the stream's thread."""
    with tempfile.TemporaryDirectory() as folder:
        ca, certificate, key = tls_files(folder)
        gateway = KeyedGateway(binary, env, "--tls-cert", certificate, "--tls-key", key, "--http-threads", "3")
        try:
            headers = {"X-Fmwire-Resumable": "1", **bearer("sk-first")}
            connection, response = open_sse(gateway.url, ca, dict(CHAT, max_tokens=40), headers)
            stream_id = response.getheader("X-Fmwire-Stream-Id")
            connection.close()
            resumed = https_client(gateway.url, ca)
            resumed.request("GET", "/v1/streams/" + stream_id, headers={**bearer("sk-first"), "Last-Event-ID": "1"})
            answer = resumed.getresponse()
            check(answer.status == 200, f"resume over https: {answer.status}")
            body = answer.read().decode()
            resumed.close()
            ids = [int(line[len("id: "):]) for line in body.splitlines() if line.startswith("id: ")]
            check(ids and ids == list(range(2, 2 + len(ids))), f"resumed event ids {ids}")
            check(body.rstrip().endswith("data: [DONE]"), f"resumed stream's end {body[-400:]!r}")
            gateway.stop()
        finally:
            gateway.kill()


def https_whole_request_cancelled_on_disconnect(binary, env):
    """A stream:false request over https whose client leaves (close_notify,
    then FIN) before the answer: the worker's sequence is cancelled within
    seconds, not run to its end."""
    from metrics_cli_test import Served  # here: it imports this module
    worker = Served(binary, env, "worker", "--model", "synthetic:tiny", "--step-us", "20000")  # 2,000 tokens: 40 s
    gateway = None
    with tempfile.TemporaryDirectory() as folder:
        ca, certificate, key = tls_files(folder)
        try:
            gateway = HttpServer(binary, env, "gateway", "--listen", "127.0.0.1:0", "--workers", worker.endpoint,
                                 "--model", "synthetic:tiny", "--tls-cert", certificate, "--tls-key", key)
            host, port = gateway.url[len("https://"):].rsplit(":", 1)
            body = json.dumps({"model": "synthetic:tiny", "prompt": "never read", "max_tokens": 2000}).encode()
            raw = socket.create_connection((host, int(port)), timeout=LIMIT_S)
            client = ssl.create_default_context(cafile=ca).wrap_socket(raw, server_hostname=host)
            client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            wait_for(lambda: worker.value("fmwire_worker_running_sequences") == 1, LIMIT_S, "the request running")
            client.setblocking(False)
            try:
                client.unwrap()  # sends close_notify; the gateway's answer is not awaited
            except (ssl.SSLError, OSError):
                pass
            left = time.monotonic()
            client.close()  # FIN (wrap_socket took over the raw socket's descriptor)
            wait_for(lambda: worker.value('fmwire_worker_streams_total{event="cancelled"}') == 1, 5,
                     "the worker's sequence cancelled")
            print(f"cancelled {time.monotonic() - left:.2f} s after the client left")
            wait_for(lambda: worker.value("fmwire_worker_running_sequences") == 0, 5, "no sequence running")
            code, _, errors = gateway.stop()
            check(code == 0, f"fmwire gateway exit {code}: {errors[-1000:]!r}")
        finally:
            if gateway:
                gateway.kill()
            worker.kill()


def up_serves_then_exits_on_sigint(binary, env):
    server = up(binary, env, "--no-demo")
    try:
        status, body = http(server.url + "/health")
        check(status == 200, f"/health {status} {body!r}")
        status, body = http(server.url + "/v1/chat/completions", dict(CHAT, stream=False))
        check(status == 200, f"chat {status} {body!r}")
        completion = json.loads(body)
        check(completion["choices"][0]["message"]["content"], f"chat {body!r}")
        check(completion["usage"]["completion_tokens"] == 12, f"chat {body!r}")
        code, _, errors = server.stop(signal.SIGINT)
        check(code == 0, f"fmwire up exit {code}: {errors[-1000:]!r}")
        check("stopped after" in errors, f"stderr {errors[-1000:]!r}")
    finally:
        server.kill()


def up_streams_its_demo(binary, env):
    server = up(binary, env, "--workers", "1")
    try:
        text = read_until(server.process.stdout, lambda text: "demo: done" in text)
        check("curl -N " + server.url + "/v1/chat/completions" in text, f"no curl line in {text!r}")
        check("\ndemo: streaming a completion" in text, f"no demo header in {text!r}")
        streamed = text.split("\ndemo: streaming a completion", 1)[1].split("\n", 1)[1].rsplit("demo: done", 1)[0]
        check(streamed.strip(), f"no demo text in {text!r}")
        check("finish reason max_tokens" in text.splitlines()[-1], f"last line {text.splitlines()[-1]!r}")
        code, _, errors = server.stop(signal.SIGINT)
        check(code == 0, f"fmwire up exit {code}: {errors[-1000:]!r}")
    finally:
        server.kill()


def up_port_taken(binary, env):
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([binary, "up", "--port", str(port), "--no-demo", "--workers", "1"],
                                capture_output=True, text=True, env=env, timeout=LIMIT_S)
        check(result.returncode == 2, f"exit {result.returncode}: {result.stderr[-600:]!r}")
        check(f"cannot listen on 127.0.0.1:{port}" in result.stderr, f"stderr {result.stderr[-600:]!r}")
    finally:
        taken.close()


STALLED_CLIENTS = 1000
# The bound on the gateway's resident memory per stalled stream, in KiB,
# measured as the slope from half the streams held to all of them. What the
# design holds for one (http_gateway.h, router_service.h) in the gateway's
# process, which runs the router here too:
#   - the native client's stream credit, 64 KiB of Tokens frames, taken
#     off the connection and kept as encoded SSE events for the reader: one
#     token a frame at this rate, ~115 bytes a frame and ~240 bytes an event
#     with its allocations, so ~575 events, ~140 KiB;
#   - the router's window at the worker, 32 KiB of frames kept as copies
#     while the gateway's client has no credit: ~290 frames, ~55 KiB;
#   - the write the reader never takes: up to 8 KiB of events, a 16 KiB
#     string at most;
#   - per-stream objects (socket, SSE sink, strand, the client's and the
#     router's stream entries), and a share of per-connection buffers.
# About 215 KiB in all; the kernel's socket buffers (a fixed 128 KiB send
# buffer a stream) are not RSS. Measured from none to 1,000 streams this
# was 176-193 KiB with Asio but 196-345 with io_uring: that figure carries
# what does not grow with the streams, io_uring's provided receive buffers
# (16 MiB a loop, two loops, touched as traffic cycles through them: 32 KiB
# a stream of the 1,000) and however much of malloc's per-thread arenas a
# run happened to spread over. The slope leaves those out: 136-142 KiB with
# Asio, 149-214 with io_uring (release, meson's MALLOC_PERTURB_, 7 runs).
# The bound leaves 40% over the highest: a credit twice as wide (~+195
# KiB) breaks it; events kept after they are written (~+140 KiB) or the
# socket buffer copied into user space (~+128 KiB) would in most runs,
# the slope itself spreading by ~100 KiB.
BOUND_KIB_PER_STREAM = 300


def open_stalled_stream(port, body):
    """A streaming completion whose reader never reads: a small receive
    buffer, the request sent, nothing read again."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port))
    client.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
    return client


def slow_clients_bounded_memory(binary, env):
    """1,000 readers that never read hold back only their own streams, at
    the worker (paused there); the gateway's memory grows by a bounded
    amount per stream; when they go, everything is freed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = STALLED_CLIENTS + 256
    check(hard == resource.RLIM_INFINITY or hard >= wanted, f"RLIMIT_NOFILE hard limit {hard} < {wanted}")
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    # synthetic:tiny has a context of 2,048 tokens; what a stalled stream's
    # pipeline holds (the kernel's buffers, the gateway, the router) is
    # ~1,700 of them in Tokens frames, so a stream of 2,000 pauses at the
    # worker before its end. CompactTokens frames are half the bytes a token,
    # so the same credit windows would hold a whole completion and nothing
    # would pause: this worker sends Tokens (FMWIRE_COMPACT_TOKENS=0). KV
    # blocks for every stream's whole context: no preemption.
    worker = Worker(binary, dict(env, FMWIRE_COMPACT_TOKENS="0"), "--model", "synthetic:tiny", "--step-us", "100", "--max-running", "1100",
                    "--max-batch-tokens", "2048", "--kv-blocks", "130000", "--load-report-interval-ms", "50")
    server = None
    stalled = []
    try:
        server = HttpServer(binary, env, "gateway", "--listen", "127.0.0.1:0", "--workers", worker.endpoint)
        port = int(server.url.rsplit(":", 1)[1])

        def gauge(name, page):
            return metric(page, f'fmwire_gateway_worker_{name}{{worker="{worker.endpoint}"}}')

        def page():
            return http(server.url + "/metrics")[1]

        wait_for(lambda: gauge("kv_blocks_in_use", page()) == 0, LIMIT_S, "the worker's first load report")
        # Warm up: the first stream pays for one-time allocations.
        status, body = http(server.url + "/v1/completions", {"prompt": "warm", "max_tokens": 200})
        check(status == 200, f"warm-up {status} {body!r}")
        rss_before = resident_kib(server.process.pid)

        # Held: every stream open at the gateway; at the worker nothing
        # generates: each sequence is paused, or done (a completion of
        # 2,000 tokens can just fit what a stalled stream's pipeline holds,
        # the kernel's buffers taking a little more now and then as TCP
        # probes the readers' closed windows), and most are paused; and the
        # gateway idle (under 10% of a core for 2 s): it has taken all that
        # its credit lets through and written what the sockets take.
        def hold(count):
            readings = []

            def held():
                text = page()
                running, paused = gauge("running_sequences", text), gauge("paused_sequences", text)
                readings.append((metric(text, "fmwire_gateway_streams_open"), running, paused, time.monotonic(),
                                 cpu_seconds(server.process.pid)))
                window = [reading for reading in readings if reading[3] >= readings[-1][3] - 2.0]
                busy = (window[-1][4] - window[0][4]) / max(window[-1][3] - window[0][3], 1e-3)
                return (readings[-1][3] - readings[0][3] >= 2.0 and busy < 0.1 and
                        all(open_ == count and running == paused and paused >= 0.9 * count
                            for open_, running, paused, _, _ in window))
            try:
                wait_for(held, 45, f"{count} streams open, held at the worker, and the gateway idle")
            except Failure as failure:
                raise Failure(f"{failure}; (open, running, paused, time, CPU s) last read {readings[-3:]}") from None
            return readings[-1][2]

        # The memory a stalled stream costs is measured as the slope between
        # half the streams held and all of them: what the process holds once
        # whatever the streams' numbers do not change (io_uring's provided
        # receive buffers, 16 MiB a loop, touched once traffic has cycled
        # through them; malloc's per-thread arenas) is left out.
        started = time.monotonic()
        request = json.dumps({"prompt": "x", "max_tokens": 2000, "stream": True}).encode()
        half = STALLED_CLIENTS // 2
        for _ in range(half):
            stalled.append(open_stalled_stream(port, request))
        hold(half)
        rss_half = resident_kib(server.process.pid)
        for _ in range(STALLED_CLIENTS - half):
            stalled.append(open_stalled_stream(port, request))
        paused_held = hold(STALLED_CLIENTS)
        held_s = time.monotonic() - started
        rss_held = resident_kib(server.process.pid)
        blocks_held = gauge("kv_blocks_in_use", page())

        # A reader that reads is not held back by them.
        other_started = time.monotonic()
        status, body = http(server.url + "/v1/completions", {"prompt": "y", "max_tokens": 100, "stream": True})
        other_ms = (time.monotonic() - other_started) * 1000
        check(status == 200, f"a reading client: {status} {body[-400:]!r}")
        events = [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]
        check(events and events[-1] == "[DONE]", f"a reading client's stream did not end: {body[-400:]!r}")
        chunks = [json.loads(event) for event in events[:-1]]
        check(any(choice.get("finish_reason") == "length" for chunk in chunks for choice in chunk["choices"]),
              f"a reading client's stream has no finish: {body[-400:]!r}")
        text = page()
        check(metric(text, "fmwire_gateway_streams_open") == STALLED_CLIENTS,
              f"a stalled stream ended meanwhile: {metric(text, 'fmwire_gateway_streams_open')} open")
        rss_after = resident_kib(server.process.pid)
        per_stream_kib = (max(rss_held, rss_after) - rss_half) / (STALLED_CLIENTS - half)
        print(f"{STALLED_CLIENTS} stalled streams held ({paused_held:.0f} paused at the worker, the rest done there; "
              f"{blocks_held:.0f} KV blocks in use) "
              f"after {held_s:.1f} s; a reading client's 100 tokens meanwhile took {other_ms:.0f} ms; gateway VmRSS "
              f"{rss_before} KiB before, {rss_half} KiB with {half} held, {rss_held} KiB with {STALLED_CLIENTS}, "
              f"{rss_after} KiB after the reading client: {per_stream_kib:.1f} KiB per stalled stream from {half} to "
              f"{STALLED_CLIENTS} (bound {BOUND_KIB_PER_STREAM}); "
              f"{(max(rss_held, rss_after) - rss_before) / STALLED_CLIENTS:.1f} KiB a stream from none")
        check(per_stream_kib < BOUND_KIB_PER_STREAM,
              f"{per_stream_kib:.1f} KiB of gateway memory per stalled stream, over {BOUND_KIB_PER_STREAM}")

        for client in stalled:
            client.close()
        stalled = []

        def freed():
            text = page()
            return (metric(text, "fmwire_gateway_streams_open") == 0 and gauge("running_sequences", text) == 0
                    and gauge("kv_blocks_in_use", text) == 0)
        wait_for(freed, LIMIT_S, "the gateway's streams closed and the worker's blocks free")
        code, _, errors = server.stop(signal.SIGTERM)
        check(code == 0, f"fmwire gateway exit {code}: {errors[-1000:]!r}")
        check(worker.stop() == 0, "the worker did not stop cleanly")
    finally:
        for client in stalled:
            client.close()
        if server:
            server.kill()
        worker.kill()


SCENARIOS = {
    "openai_sdk_up": openai_sdk_up,
    "openai_sdk_gateway_workers": openai_sdk_gateway_workers,
    "curl_streams_sse": curl_streams_sse,
    "curl_refuses_tools": curl_refuses_tools,
    "gateway_router_api_keys_file": gateway_router_api_keys_file,
    "gateway_wrong_key_refused": gateway_wrong_key_refused,
    "gateway_rate_limit_429": gateway_rate_limit_429,
    "gateway_overload_429": gateway_overload_429,
    "gateway_resume_other_key_404": gateway_resume_other_key_404,
    "https_tls_versions": https_tls_versions,
    "openai_sdk_https": openai_sdk_https,
    "https_reload_keeps_stream": https_reload_keeps_stream,
    "https_resume_on_another_thread": https_resume_on_another_thread,
    "https_whole_request_cancelled_on_disconnect": https_whole_request_cancelled_on_disconnect,
    "up_serves_then_exits_on_sigint": up_serves_then_exits_on_sigint,
    "up_streams_its_demo": up_streams_its_demo,
    "up_port_taken": up_port_taken,
    "slow_clients_bounded_memory": slow_clients_bounded_memory,
}



if __name__ == "__main__":
    sys.exit(run_scenario("gateway", SCENARIOS))
