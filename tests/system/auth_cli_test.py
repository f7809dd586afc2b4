#!/usr/bin/env python3
"""Multi-process tests of shared-secret authentication (--auth-token-file)
and of etcd over TLS: workers, routers, `fmwire generate` and a real etcd
(https, client certificates made at test time) as separate processes on
127.0.0.1.

    auth_cli_test.py FMWIRE_BINARY BACKEND SCENARIO

Same rules as native_cli_test.py: free ports, bounded waits, every process
killed on the way out.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from native_cli_test import LIMIT_S, Failure, Server, check, generate, start_generate, run_scenario
from perf_cli_test import PerfServer
from router_cli_test import Etcd, free_port, frames_of, indexes_of, stop_all, until

SECRET = "s3cret-for-the-auth-token-tests-0123456789"
OTHER_SECRET = "another-secret-entirely-9876543210"
HERE = os.path.dirname(os.path.abspath(__file__))


class Secrets:
    """Token files in a temporary folder: good, other, and bad ones."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="fmwire-auth-")
        self.good = self.write("good", "\n  " + SECRET + "\n")
        self.other = self.write("other", OTHER_SECRET)
        self.empty = self.write("empty", " \n\t")
        self.short = self.write("short", "fifteen-bytes!!")

    def write(self, name, text):
        path = os.path.join(self.folder, name)
        with open(path, "w") as out:
            out.write(text)
        return path

    def remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)


def token(path):
    return ["--auth-token-file", path]


def token_through_router(binary, env):
    """Router and worker with the token: generate with it streams whole; the
    secret is in no log line and not on /metrics."""
    secrets = Secrets()
    worker = router = None
    try:
        worker = Server(binary, env, "worker", "--model", "builtin", *token(secrets.good))
        metrics_port = free_port()
        router = Server(binary, env, "router", "--workers", worker.endpoint, *token(secrets.good),
                        "--metrics-listen", f"127.0.0.1:{metrics_port}")
        result = generate(binary, env, router.endpoint, "--max-tokens", "12", "--json", *token(secrets.good), "hi")
        check(result.returncode == 0, f"exit {result.returncode}: {result.stderr}")
        check(indexes_of(frames_of(result.stdout)) == list(range(12)), f"stdout {result.stdout!r}")
        metrics = subprocess.run(["curl", "-s", f"http://127.0.0.1:{metrics_port}/metrics"],
                                 capture_output=True, text=True, timeout=LIMIT_S).stdout
        check("fmwire" in metrics and SECRET not in metrics, "the secret is on /metrics, or no /metrics")
        check(router.stop() == 0 and worker.stop() == 0, "did not stop cleanly")
        for server in (router, worker):
            out, errors = server.process.communicate()
            check(SECRET not in out + errors, "the secret is in a log")
    finally:
        stop_all(router, worker)
        secrets.remove()


def wrong_token_refused(binary, env):
    """A client with a wrong token, or none, is refused with a clear error and
    exit 1, while a good client's stream on the same router goes on whole."""
    secrets = Secrets()
    worker = router = good = None
    try:
        worker = Server(binary, env, "worker", "--model", "synthetic:tiny", "--step-us", "3000",
                        *token(secrets.good))
        router = Server(binary, env, "router", "--workers", worker.endpoint, *token(secrets.good))
        # 4.5 s of decoding: longer than two refused clients take to start
        # and be refused under the sanitizers on a busy machine.
        tokens = 1500
        good = start_generate(binary, env, router.endpoint, "--max-tokens", str(tokens), "--json",
                              *token(secrets.good), "keep going")
        time.sleep(0.2)
        wrong = generate(binary, env, router.endpoint, "--max-tokens", "2", *token(secrets.other), "let me in")
        check(wrong.returncode == 1, f"wrong token: exit {wrong.returncode}: {wrong.stderr!r}")
        check("unauthorized" in wrong.stderr and "does not match this side's token" in wrong.stderr,
              f"wrong token: stderr {wrong.stderr!r}")
        missing = generate(binary, env, router.endpoint, "--max-tokens", "2", "let me in")
        check(missing.returncode == 1, f"no token: exit {missing.returncode}")
        check("unauthorized" in missing.stderr and "requires an auth token" in missing.stderr,
              f"no token: stderr {missing.stderr!r}")
        check(good.poll() is None, "the good stream ended before the refusals were done: make it longer")
        out, errors = good.communicate(timeout=LIMIT_S)
        check(good.returncode == 0, f"good stream: exit {good.returncode}: {errors!r}")
        check(indexes_of(frames_of(out)) == list(range(tokens)), "the good stream was disturbed")
    finally:
        if good is not None and good.poll() is None:
            good.kill()
            good.wait()
        stop_all(router, worker)
        secrets.remove()


def router_without_token_refused(binary, env):
    """A worker with a token refuses a router without one (its link never
    comes up, the worker logs why); a router with a token refuses a worker
    without one, both ways clearly."""
    secrets = Secrets()
    worker = router = plain_worker = tokened_router = None
    try:
        worker = Server(binary, env, "worker", "--model", "builtin", *token(secrets.good))
        router = Server(binary, env, "router", "--workers", worker.endpoint)
        refused = generate(binary, env, router.endpoint, "--max-tokens", "2", "hello")
        check(refused.returncode == 1 and "no_worker" in refused.stderr, f"stderr {refused.stderr!r}")
        plain_worker = Server(binary, env, "worker", "--model", "builtin")
        tokened_router = Server(binary, env, "router", "--workers", plain_worker.endpoint, *token(secrets.good))
        refused = generate(binary, env, tokened_router.endpoint, "--max-tokens", "2", *token(secrets.good), "hi")
        check(refused.returncode == 1 and "no_worker" in refused.stderr, f"stderr {refused.stderr!r}")
        stop_all(router, tokened_router)
        logs = {}
        for name, server in (("router", router), ("tokened router", tokened_router)):
            logs[name] = server.process.communicate()[1]
        check("auth refused: this side requires an auth token" in logs["router"],
              f"the router without a token does not say why: {logs['router'][-600:]!r}")
        check("auth refused: the peer sent an auth challenge, but this side has no auth token"
              in logs["tokened router"], f"the router with a token does not say why: {logs['tokened router'][-600:]!r}")
    finally:
        stop_all(router, tokened_router, worker, plain_worker)
        secrets.remove()


def bad_token_file_refused(binary, env):
    """An empty, missing or too short token file: exit 2, naming the file,
    never its contents."""
    secrets = Secrets()
    try:
        for path, reason in ((secrets.empty, "the file is empty"),
                             (os.path.join(secrets.folder, "missing"), "cannot be read"),
                             (secrets.short, "15 bytes; at least 16 are required")):
            for command in (["worker", "--listen", "127.0.0.1:0"], ["router", "--listen", "127.0.0.1:0",
                                                                    "--workers", "127.0.0.1:1"],
                            ["generate", "--endpoint", "127.0.0.1:1", "x"], ["perf", "serve", "--listen",
                                                                           "127.0.0.1:0"]):
                result = subprocess.run([binary, *command, *token(path)], capture_output=True, text=True, env=env,
                                        timeout=LIMIT_S)
                check(result.returncode == 2, f"{command[0]} {path}: exit {result.returncode}: {result.stderr!r}")
                check(f"--auth-token-file {path}: " in result.stderr and reason in result.stderr,
                      f"{command[0]} {path}: stderr {result.stderr!r}")
                check("fifteen" not in result.stderr, "the secret is in the error")
    finally:
        secrets.remove()


def perf_with_token(binary, env):
    """`perf serve` with a token serves `perf run` with it and refuses one
    with another, saying why."""
    secrets = Secrets()
    server = None
    try:
        server = PerfServer(binary, env, *token(secrets.good))
        good = subprocess.run([binary, "perf", "run", "--to", server.endpoint, "--test", "latency", "--requests", "50",
                               "--repetitions", "1", *token(secrets.good)],
                              capture_output=True, text=True, env=env, timeout=LIMIT_S)
        check(good.returncode == 0, f"exit {good.returncode}: {good.stderr!r}")
        wrong = subprocess.run([binary, "perf", "run", "--to", server.endpoint, "--test", "latency", "--requests",
                                "50", "--repetitions", "1", *token(secrets.other)],
                               capture_output=True, text=True, env=env, timeout=LIMIT_S)
        check(wrong.returncode == 1 and "does not match this side's token" in wrong.stderr,
              f"exit {wrong.returncode}: {wrong.stderr!r}")
    finally:
        stop_all(server)
        secrets.remove()


def up_disaggregated_with_token(binary, env):
    """`fmwire up` split into a prefill and a decode worker, all with the
    token: its demo streams, so every hop proved it, the prefill worker's KV
    link to the decode worker included."""
    secrets = Secrets()
    up = None
    try:
        up = subprocess.Popen([binary, "up", "--port", "0", "--prefill-workers", "1", "--decode-workers", "1",
                               "--demo-prompt", "hello there", *token(secrets.good)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + LIMIT_S
        out = ""
        while time.monotonic() < deadline and "demo: " not in out.split("streaming", 1)[-1]:
            line = up.stdout.readline()
            if not line:
                break
            out += line
        check("demo: done: 48 tokens" in out, f"stdout {out!r}")
        up.send_signal(signal.SIGINT)
        _, errors = up.communicate(timeout=LIMIT_S)
        check(up.returncode == 0, f"exit {up.returncode}: {errors[-800:]!r}")
        # The split went through the KV link: had the decode worker refused
        # it, the router would have served the request whole instead.
        check("1 split, 0 of them served whole after a part failed" in errors, f"stderr {errors[-600:]!r}")
        check(SECRET not in errors + out, "the secret is in a log")
    finally:
        if up is not None and up.poll() is None:
            up.kill()
            up.wait()
        secrets.remove()


class TlsEtcd(Etcd):
    """A real etcd serving https only, with --client-cert-auth, on
    certificates made now by tests/make_test_certs.sh."""

    def __init__(self):
        binary = shutil.which("etcd") or "/usr/bin/etcd"
        check(os.path.exists(binary), "etcd is not installed (scripts/setup.sh installs etcd-server)")
        self.folder = tempfile.mkdtemp(prefix="fmwire-etcd-tls-")
        self.certs = os.path.join(self.folder, "certs")
        made = subprocess.run(["sh", os.path.join(HERE, "..", "make_test_certs.sh"), self.certs],
                              capture_output=True, text=True, timeout=LIMIT_S)
        check(made.returncode == 0, f"making certificates: {made.stderr}")
        client, peer = free_port(), free_port()
        self.url = f"https://127.0.0.1:{client}"
        self.process = subprocess.Popen(
            [binary, "--name", "default", "--data-dir", os.path.join(self.folder, "data"),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"default=http://127.0.0.1:{peer}",
             "--cert-file", self.cert("server.pem"), "--key-file", self.cert("server.key"),
             "--client-cert-auth", "--trusted-ca-file", self.cert("ca.pem")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def healthy():
            probe = subprocess.run(["curl", "-s", "--max-time", "1", "--cacert", self.cert("ca.pem"),
                                    "--cert", self.cert("client.pem"), "--key", self.cert("client.key"),
                                    self.url + "/health"], capture_output=True, text=True)
            return '"health":"true"' in probe.stdout

        until(healthy, 15, "etcd to start")

    def cert(self, name):
        return os.path.join(self.certs, name)

    def flags(self, client="client"):
        return ["--etcd", self.url, "--etcd-cacert", self.cert("ca.pem"),
                "--etcd-cert", self.cert(client + ".pem"), "--etcd-key", self.cert(client + ".key")]


def etcd_tls_discovery(binary, env):
    """A worker registers over https and a router discovers it there; a
    worker whose client certificate is from another CA is refused by etcd
    and exits saying so."""
    etcd = TlsEtcd()
    router = None
    workers = []
    try:
        router = Server(binary, env, "router", *etcd.flags(), "--policy", "round-robin")
        workers.append(Server(binary, env, "worker", "--model", "synthetic:tiny", "--step-us", "0",
                              *etcd.flags(), "--etcd-ttl-s", "2"))
        until(lambda: generate(binary, env, router.endpoint, "--max-tokens", "2", "hello").returncode == 0,
              LIMIT_S, "the router to find the worker registered over https")
        stranger = subprocess.run([binary, "worker", "--listen", "127.0.0.1:0", "--model", "synthetic:tiny",
                                   *etcd.flags("other-client")],
                                  capture_output=True, text=True, env=env, timeout=LIMIT_S)
        check(stranger.returncode != 0, "a worker with another CA's certificate registered")
        check(f"etcd at 127.0.0.1:{etcd.url.rsplit(':', 1)[1]}" in stranger.stderr and "TLS" in stranger.stderr,
              f"stderr {stranger.stderr[-800:]!r}")
        check(router.stop() == 0, "the router did not stop cleanly")
    finally:
        stop_all(router, *workers)
        etcd.stop()


SCENARIOS = {
    "token_through_router": token_through_router,
    "wrong_token_refused": wrong_token_refused,
    "router_without_token_refused": router_without_token_refused,
    "bad_token_file_refused": bad_token_file_refused,
    "perf_with_token": perf_with_token,
    "up_disaggregated_with_token": up_disaggregated_with_token,
    "etcd_tls_discovery": etcd_tls_discovery,
}


if __name__ == "__main__":
    sys.exit(run_scenario("auth", SCENARIOS))
