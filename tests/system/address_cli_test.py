#!/usr/bin/env python3
"""Multi-process tests of addresses: IPv6 in brackets, host names resolved
off the loop, and --advertise for what a worker or router registers in etcd.
Loopback only (127.0.0.1, ::1, localhost) and names under .invalid, which
never resolve (RFC 6761): no traffic leaves the machine.

    address_cli_test.py FMWIRE_BINARY BACKEND SCENARIO

Same rules as native_cli_test.py: free ports, bounded waits, every process
killed on the way out. Scenarios that need IPv6 loopback exit 77 (skipped)
where the machine has none.
"""
import json
import os
import socket
import subprocess
import sys
import time

from native_cli_test import LIMIT_S, Failure, check, generate, run_scenario
from router_cli_test import Etcd, frames_of, until

SKIP = 77


def have_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


class Listening:
    """A server subcommand of fmwire listening on `listen`; `endpoint` is
    the address its first line prints, as given back to clients."""

    def __init__(self, binary, env, command, listen, *extra):
        self.process = subprocess.Popen(
            [binary, command, "--listen", listen, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.kill()
            raise Failure(f"{command} --listen {listen} printed {line!r}; stderr {self.process.stderr.read()!r}")
        self.endpoint = line.split()[-1]
        self.port = int(self.endpoint.rsplit(":", 1)[1])

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
        try:
            code = self.process.wait(timeout=LIMIT_S)
            return code, self.process.stderr.read()
        finally:
            self.kill()

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def stop_all(*servers):
    for server in servers:
        if server is not None:
            server.kill()


def worker(binary, env, listen, *extra):
    return Listening(binary, env, "worker", listen, "--model", "synthetic:tiny", "--step-us", "0", *extra)


def ipv6_worker_served(binary, env):
    """A worker on [::1]:0 prints its address in brackets, and `fmwire
    generate --endpoint [::1]:PORT` is served by it."""
    if not have_ipv6_loopback():
        print("skipped: no IPv6 loopback (::1) on this machine")
        sys.exit(SKIP)
    served = worker(binary, env, "[::1]:0")
    try:
        check(served.endpoint == f"[::1]:{served.port}", f"listening line gave {served.endpoint!r}")
        result = generate(binary, env, served.endpoint, "--max-tokens", "3", "--json", "over six")
        check(result.returncode == 0, f"exit {result.returncode}: {result.stderr}")
        check(frames_of(result.stdout)[-1]["type"] == "finish", f"stdout {result.stdout!r}")
        # Nothing listens on 127.0.0.1 at that port: it really went over IPv6.
        code, _ = served.stop()
        check(code == 0, "the worker did not stop cleanly")
    finally:
        stop_all(served)


def router_reaches_worker_by_name(binary, env):
    """A worker listening on localhost:0 and a router given it as
    localhost:PORT: the router looks the name up (off its loop) and serves."""
    served = worker(binary, env, "localhost:0")
    router = None
    try:
        check(served.endpoint == f"localhost:{served.port}", f"listening line gave {served.endpoint!r}")
        router = Listening(binary, env, "router", "127.0.0.1:0", "--workers", f"localhost:{served.port}")
        result = None

        def routed():
            nonlocal result
            result = generate(binary, env, router.endpoint, "--max-tokens", "3", "--json", "by name")
            return result.returncode == 0

        until(routed, LIMIT_S, "the router to reach localhost:PORT")
        hops = [hop["hop"] for hop in frames_of(result.stdout)[-1]["timings"]]
        check(any(f"localhost:{served.port}" in hop for hop in hops), f"hops {hops}")
    finally:
        stop_all(router, served)


def unresolvable_name_is_an_error(binary, env):
    """A name that does not resolve: `generate` fails within its bound,
    naming the host; a router given it starts, logs the lookup error once
    (not on every retry) and refuses streams rather than hanging."""
    started = time.monotonic()
    result = generate(binary, env, "no-such-worker.invalid:7000", "--connect-timeout-ms", "8000", "hello")
    took = time.monotonic() - started
    check(result.returncode == 1, f"exit {result.returncode}: {result.stderr!r}")
    check("no-such-worker.invalid:7000" in result.stderr, f"stderr {result.stderr!r}")
    check("not found" in result.stderr or "lookup" in result.stderr, f"stderr {result.stderr!r}")
    check(took < 9, f"took {took:.1f} s")
    router = Listening(binary, env, "router", "127.0.0.1:0", "--workers", "no-such-worker.invalid:7000")
    try:
        refused = generate(binary, env, router.endpoint, "--max-tokens", "2", "anyone?")
        check(refused.returncode == 1 and "no_worker" in refused.stderr, f"stderr {refused.stderr!r}")
        code, errors = router.stop()
        check(code == 0, "the router did not stop cleanly")
        said = "worker no-such-worker.invalid:7000: looking up no-such-worker.invalid: "
        check(errors.count(said) == 1, f"router stderr {errors!r}")
    finally:
        stop_all(router)


def etcd_without_advertise_refused(binary, env):
    """Listening on every interface with --etcd and no --advertise would
    register 0.0.0.0 or [::]: refused (exit 2) before anything binds, the
    message naming the fix. No etcd is needed: nothing gets that far."""
    url = "http://127.0.0.1:9"  # never contacted
    for command in ("worker", "router"):
        for listen in ("0.0.0.0:0", "[::]:0"):
            extra = ["--model", "synthetic:tiny"] if command == "worker" else []
            result = subprocess.run([binary, command, "--listen", listen, "--etcd", url, *extra],
                                    capture_output=True, text=True, env=env, timeout=LIMIT_S)
            check(result.returncode == 2, f"{command} --listen {listen}: exit {result.returncode}: {result.stderr!r}")
            check("--advertise HOST:PORT" in result.stderr and listen in result.stderr,
                  f"{command} --listen {listen}: stderr {result.stderr!r}")
            check(result.stdout == "", f"{command} --listen {listen} listened: {result.stdout!r}")


def etcd_advertised_name_found(binary, env):
    """A worker registers its --advertise name (port 0: the port it listens
    on) in etcd, reached by the name localhost; a router watching etcd finds
    the worker by that name and serves through it; the router registers its
    own --advertise name under the routers' prefix."""
    etcd = Etcd()
    by_name = etcd.url.replace("127.0.0.1", "localhost")
    served = None
    router = None
    try:
        served = worker(binary, env, "127.0.0.1:0", "--etcd", by_name, "--advertise", "localhost:0",
                        "--etcd-ttl-s", "2")
        router = Listening(binary, env, "router", "127.0.0.1:0", "--etcd", by_name, "--advertise", "localhost:0",
                           "--policy", "round-robin")
        result = None

        def routed():
            nonlocal result
            result = generate(binary, env, router.endpoint, "--max-tokens", "3", "--json", "advertised")
            return result.returncode == 0

        until(routed, LIMIT_S, "the router to find the advertised worker")
        hops = [hop["hop"] for hop in frames_of(result.stdout)[-1]["timings"]]
        check(any(f"localhost:{served.port}" in hop for hop in hops), f"hops {hops}")
        code, worker_errors = served.stop()
        check(code == 0, "the worker did not stop cleanly")
        check(f"registered in etcd as /fmwire/workers/localhost:{served.port}" in worker_errors,
              f"worker stderr {worker_errors!r}")
        code, router_errors = router.stop()
        check(code == 0, "the router did not stop cleanly")
        check(f"registered in etcd as /fmwire/routers/localhost:{router.port}" in router_errors,
              f"router stderr {router_errors!r}")
    finally:
        stop_all(router, served)
        etcd.stop()


SCENARIOS = {
    "ipv6_worker_served": ipv6_worker_served,
    "router_reaches_worker_by_name": router_reaches_worker_by_name,
    "unresolvable_name_is_an_error": unresolvable_name_is_an_error,
    "etcd_without_advertise_refused": etcd_without_advertise_refused,
    "etcd_advertised_name_found": etcd_advertised_name_found,
}



if __name__ == "__main__":
    sys.exit(run_scenario("address", SCENARIOS))
