#!/usr/bin/env python3
"""Multi-process tests of the native protocol's TLS (issue 15): TLS 1.3 with
mutual authentication on every native hop (gateway -> router -> worker,
client -> worker, worker -> worker for KV), `--tls-ca --tls-cert --tls-key`
(`--native-tls-*` on the gateway). Certificates are made at test time with
openssl in a temporary folder, never committed.

    native_tls_cli_test.py FMWIRE_BINARY BACKEND SCENARIO

Same rules as native_cli_test.py: free ports, bounded waits, every process
killed on the way out.
"""
import json
import re
import subprocess
import tempfile
import time

from gateway_cli_test import HttpServer, curl_sse, make_certificate, run_openai_client
from native_cli_test import LIMIT_S, check, generate, run_scenario
from perf_cli_test import GRPC_NOT_BUILT, PerfServer, check_tokens_against_grpc, free_port, number, perf_run
from router_cli_test import Router, Worker, frames_of, stop_all


class Pki:
    """A test CA with one certificate per process, and another CA with a
    certificate of its own: what a peer from another cluster presents."""

    def __init__(self, folder):
        self.folder = folder
        self.ca = make_certificate(folder, "fmwire-test-ca")
        self.other_ca = make_certificate(folder, "other-ca")

    def flags(self, name, prefix="--tls-", ca=None):
        """The three flags for a process `name` whose certificate `ca` signed
        (default: the test CA); it trusts the test CA either way."""
        certificate, key = make_certificate(self.folder, name, ca or self.ca)
        return [prefix + "ca", self.ca[0], prefix + "cert", certificate, prefix + "key", key]


def sse_events(text):
    """The SSE stream's chunks with what differs per request (id, created)
    taken out, as canonical JSON lines: equal streams give equal lines."""
    events = []
    for line in text.splitlines():
        if not line.startswith("data: "):
            continue
        payload = line[len("data: "):]
        if payload != "[DONE]":
            chunk = json.loads(payload)
            chunk.pop("id", None)
            chunk.pop("created", None)
            payload = json.dumps(chunk, sort_keys=True)
        events.append(payload)
    return events


CHAT = {"model": "builtin", "messages": [{"role": "user", "content": "Once upon a time"}], "stream": True,
        "max_tokens": 24, "temperature": 0}


def chain(binary, env, pki=None):
    """worker -> router -> gateway, with TLS on both native hops when `pki`
    is given: (worker, router, gateway)."""
    worker = router = gateway = None
    try:
        worker = Worker(binary, env, "--model", "builtin", *(pki.flags("worker") if pki else []))
        router = Router(binary, env, [worker], *(pki.flags("router") if pki else []))
        gateway = HttpServer(binary, env, "gateway", "--listen", "127.0.0.1:0", "--router", router.endpoint,
                             *(pki.flags("gateway", "--native-tls-") if pki else []))
        return worker, router, gateway
    except BaseException:
        stop_all(worker, router)
        if gateway:
            gateway.kill()
        raise


def stream_after_router_link(gateway_url):
    """curl's SSE once the gateway reaches a worker (the router links to its
    workers in the background): (exit code, text) of the first full stream."""
    deadline = time.monotonic() + LIMIT_S
    while True:
        code, text = curl_sse(gateway_url, CHAT)
        if (code == 0 and "[DONE]" in text) or time.monotonic() > deadline:
            return code, text
        time.sleep(0.1)


def gateway_router_worker_over_tls(binary, env):
    """gateway -> router -> worker all with TLS: a streamed completion
    through curl is the plaintext chain's, chunk for chunk (ids and
    timestamps aside); the official openai SDK streams through it; every
    process logs which TLS it uses; a plaintext client is refused."""
    with tempfile.TemporaryDirectory() as folder:
        pki = Pki(folder)
        plain = chain(binary, env)
        try:
            code, plain_text = stream_after_router_link(plain[2].url)
            check(code == 0, f"curl exit {code} (plaintext)")
        finally:
            plain[2].kill()
            stop_all(plain[1], plain[0])
        worker, router, gateway = chain(binary, env, pki)
        try:
            code, tls_text = stream_after_router_link(gateway.url)
            check(code == 0, f"curl exit {code} (TLS)")
            plain_events, tls_events = sse_events(plain_text), sse_events(tls_text)
            check(len(tls_events) >= 3 and tls_events[-1] == "[DONE]", f"TLS stream {tls_text[-600:]!r}")
            check(tls_events == plain_events, f"TLS {tls_events} != plaintext {plain_events}")
            print(f"{len(tls_events)} SSE events, the same over TLS as in plaintext")
            run_openai_client(gateway.url, "builtin")
            # A plaintext client to the TLS worker and router: refused, non-zero exit.
            for server in (worker, router):
                refused = generate(binary, env, server.endpoint, "--max-tokens", "4", "--connect-timeout-ms", "3000",
                                   "hi")
                check(refused.returncode != 0, f"a plaintext client was served by {server.endpoint}")
            code, _, gateway_errors = gateway.stop()
            check(code == 0, f"gateway exit {code}: {gateway_errors[-800:]!r}")
            check(router.stop() == 0, "the router did not stop cleanly")
            _, router_errors = router.process.communicate()
            check(worker.stop() == 0, "the worker did not stop cleanly")
            _, worker_errors = worker.process.communicate()
            for name, errors in (("router", router_errors), ("worker", worker_errors)):
                check("native TLS 1.3, mutual: OpenSSL" in errors and "tcp_available_ulp" in errors,
                      f"no TLS start-up line from the {name}: {errors[:800]!r}")
            check("TLS handshake failed: the peer does not speak TLS 1.3" in worker_errors,
                  f"the worker did not log the plaintext client: {worker_errors[-800:]!r}")
        finally:
            gateway.kill()
            stop_all(router, worker)


def generate_with_other_ca_refused(binary, env):
    """`fmwire generate` with a certificate from another CA is refused with
    a message that says so, exit 1; with the CA's certificate it streams;
    half the flags exit 2 naming the missing ones."""
    with tempfile.TemporaryDirectory() as folder:
        pki = Pki(folder)
        worker = Worker(binary, env, "--model", "builtin", *pki.flags("worker"))
        try:
            good = generate(binary, env, worker.endpoint, "--max-tokens", "8", *pki.flags("client"), "hi")
            check(good.returncode == 0 and good.stdout.strip(), f"exit {good.returncode}: {good.stderr[-600:]!r}")
            rogue = generate(binary, env, worker.endpoint, "--max-tokens", "8",
                             *pki.flags("rogue", ca=pki.other_ca), "hi")
            check(rogue.returncode == 1, f"exit {rogue.returncode}: {rogue.stderr[-600:]!r}")
            check("our certificate does not chain to its CA" in rogue.stderr and "retryable" not in rogue.stderr,
                  f"stderr {rogue.stderr[-600:]!r}")
            print(f"refused: {rogue.stderr.strip().splitlines()[-1]}")
            half = generate(binary, env, worker.endpoint, "--tls-ca", pki.ca[0], "hi")
            check(half.returncode == 2 and "--tls-cert --tls-key" in half.stderr, f"half: {half.stderr!r}")
            missing = generate(binary, env, worker.endpoint, *pki.flags("client")[:4], "--tls-key",
                               folder + "/absent.key", "hi")
            check(missing.returncode == 2 and "absent.key" in missing.stderr, f"missing key: {missing.stderr!r}")
            check(worker.stop() == 0, "the worker did not stop cleanly")
            _, errors = worker.process.communicate()
            check("the peer's certificate does not chain to our CA" in errors, f"worker log {errors[-800:]!r}")
        finally:
            stop_all(worker)


def kv_transfer_over_tls(binary, env):
    """A prefill and a decode worker behind a router, every hop TLS, the KV
    pushed worker to worker over TLS: the greedy tokens are those of one
    worker serving the request whole, and the KV chunks were sent and
    received."""
    with tempfile.TemporaryDirectory() as folder:
        pki = Pki(folder)
        prefill = decode = whole = router = None
        try:
            prefill = Worker(binary, env, "--model", "builtin", "--role", "prefill", "--max-batch-tokens", "64",
                             *pki.flags("prefill"))
            decode = Worker(binary, env, "--model", "builtin", "--role", "decode", *pki.flags("decode"))
            whole = Worker(binary, env, "--model", "builtin", *pki.flags("whole"))
            router = Router(binary, env, [prefill, decode], *pki.flags("router"))
            time.sleep(0.5)  # the router learns the roles from the first load reports
            client = pki.flags("client")
            for prompt in ("Hi", "x" * 300):
                direct = generate(binary, env, whole.endpoint, "--max-tokens", "24", "--json", *client, prompt)
                split = generate(binary, env, router.endpoint, "--max-tokens", "24", "--json", *client, prompt)
                check(direct.returncode == 0 and split.returncode == 0, f"exit {direct.stderr} {split.stderr}")
                ids = [[t for f in frames_of(r.stdout) if f["type"] == "tokens" for t in f["token_ids"]]
                       for r in (direct, split)]
                check(ids[0] == ids[1] and len(ids[0]) == 24, f"split {ids[1]} != whole {ids[0]}")
            check(router.stop() == 0, "the router did not stop cleanly")
            lines = {}
            for name, worker in (("prefill", prefill), ("decode", decode)):
                check(worker.stop() == 0, f"the {name} worker did not stop cleanly")
                _, errors = worker.process.communicate()
                lines[name] = next((line for line in errors.splitlines() if "KV transfers" in line), "")
                print(f"{name}: {lines[name]}")
            sent = re.search(r"KV transfers (\d+) sent", lines["prefill"])
            received = re.search(r"(\d+) received", lines["decode"])
            check(sent and int(sent.group(1)) >= 2, f"prefill: {lines['prefill']!r}")
            check(received and int(received.group(1)) >= 2, f"decode: {lines['decode']!r}")
        finally:
            stop_all(router, prefill, decode, whole)


def perf_over_tls(binary, env):
    """`fmwire perf serve` and `perf run` with TLS: tokens and a KV shard
    measured over TLS (JSON rows named "(tls)"), each with --compare against
    gRPC serving TLS from the same files (where gRPC is built in); a
    plaintext run against the TLS server fails (exit 1)."""
    with tempfile.TemporaryDirectory() as folder:
        pki = Pki(folder)
        iperf3_port = free_port()  # kv --compare runs iperf3 too
        server = PerfServer(binary, env, "--iperf3-port", str(iperf3_port), *pki.flags("perf-server"))
        try:
            client = pki.flags("perf-client")
            path = folder + "/tokens.json"
            tokens = perf_run(binary, env, server.endpoint, "--test", "tokens", "--repetitions", "2",
                              "--frames", "100000", "--compare", "--json", path, *client)
            print(tokens.stdout, end="")
            check(tokens.returncode == 0, f"exit {tokens.returncode}: {tokens.stderr!r}")
            check("over TLS 1.3" in tokens.stdout, f"no TLS line in {tokens.stdout!r}")
            with open(path) as file:
                rows = {row["name"]: row for row in json.load(file)["results"]}
            check(rows and all(name.endswith(" (tls)") for name in rows), f"JSON rows {list(rows)}")
            grpc_built = GRPC_NOT_BUILT not in tokens.stdout
            if grpc_built:
                # gRPC's client connected to gRPC's TLS server (with a plaintext
                # client it would not have), and its rows have ratios.
                check("gRPC's too, with the same certificates" in tokens.stdout, f"no gRPC TLS line: {tokens.stdout!r}")
                check_tokens_against_grpc(tokens.stdout, {name[:-len(" (tls)")]: row for name, row in rows.items()})
            # 16 MiB: enough to cross many chunks over TLS, little enough that
            # a TSan build on a loaded 2-core machine answers keepalives in
            # time (64 MiB went silent past the 6 s keepalive there).
            kv = perf_run(binary, env, server.endpoint, "--test", "kv", "--repetitions", "2", "--bytes",
                          str(16 << 20), "--compare", "--iperf3-port", str(iperf3_port), *client)
            print(kv.stdout, end="")
            check(kv.returncode == 0 and "fmwire GB/s" in kv.stdout, f"exit {kv.returncode}: {kv.stderr!r}")
            if grpc_built:
                check(number(kv.stdout, "gRPC GB/s") > 0, f"no gRPC GB/s over TLS in {kv.stdout!r}")
            plain = perf_run(binary, env, server.endpoint, "--test", "tokens", "--repetitions", "1",
                             "--frames", "1000", "--connect-timeout-ms", "3000")
            check(plain.returncode == 1, f"a plaintext perf run against TLS: exit {plain.returncode}")
            check(server.stop() == 0, "perf serve did not drain cleanly")
        finally:
            server.kill()


SCENARIOS = {name: function for name, function in globals().items()
             if name in ("gateway_router_worker_over_tls", "generate_with_other_ca_refused", "kv_transfer_over_tls",
                         "perf_over_tls")}

if __name__ == "__main__":
    raise SystemExit(run_scenario("native_tls", SCENARIOS))
