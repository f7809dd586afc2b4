#!/usr/bin/env python3
"""`fmwire perf serve` and `fmwire perf run` as separate processes, as a
user runs them across two hosts: on 127.0.0.1 for each test kind, tokens
and latency against the gRPC peer `perf serve` runs (skipped, 77, where
gRPC is not built in), with bad input and a server killed mid-test (also
in the gRPC rounds), and across two network namespaces
(scripts/netns_cluster.py) on links held to 1 and 10 Gbit/s, bulk and kv
against iperf3, tokens and latency against gRPC (root only: skipped, 77,
with the reason where namespaces cannot be made).

    perf_cli_test.py FMWIRE_BINARY BACKEND SCENARIO

Every wait is bounded and every process (iperf3 included) is stopped, and
every namespace removed, on the way out, also when a scenario fails. The
numbers are checked to be there and positive, never against a target: the
machines are shared.
"""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "..", "..", "scripts")
sys.path.insert(0, SCRIPTS)

from native_cli_test import LIMIT_S, SKIPPED, TIME_SCALE, Failure, Server, check, read_until, run_scenario  # noqa: E402
from netns_cluster import Cluster, ClusterUnavailable, wait_listening  # noqa: E402

PERF_PORT = 7100
IPERF3_PORT = 5201


class PerfServer(Server):
    """`fmwire perf serve` on a free port of 127.0.0.1 (Server's stop and
    kill; its own start, the subcommand being two words)."""

    def __init__(self, binary, env, *extra):
        self.process = subprocess.Popen([binary, "perf", "serve", "--listen", "127.0.0.1:0", *extra],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.process.stdout.readline()
        if not line.startswith("listening on 127.0.0.1:"):
            self.kill()
            raise Failure(f"perf serve printed {line!r}; stderr {self.process.stderr.read()!r}")
        self.endpoint = line.split()[-1]


def perf_run(binary, env, endpoint, *arguments, timeout=LIMIT_S * 3):
    return subprocess.run([binary, "perf", "run", "--to", endpoint, *arguments],
                          capture_output=True, text=True, env=env, timeout=timeout)


def number(output, label):
    """The number after `label` in perf run's table, or Failure."""
    match = re.search(re.escape(label) + r"\s+([0-9.]+)", output)
    check(match is not None, f"no {label!r} in {output!r}")
    return float(match.group(1))


def results(path):
    with open(path) as file:
        document = json.load(file)
    check(document.get("bench") == "perf", f"bench name {document.get('bench')!r}")
    return {row["name"]: row for row in document["results"]}


def free_port():
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def children(pid):
    """The pids of pid's child processes (every thread's)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as file:
            found += [int(child) for child in file.read().split()]
    return found


# ---------------------------------------------------------------- loopback


@contextlib.contextmanager
def served(binary, env, *extra):
    """A perf server and a scratch folder for one scenario: the folder is
    removed on the way out, and a server that does not drain cleanly (exit
    0 on SIGTERM) fails the scenario."""
    server = PerfServer(binary, env, *extra)
    folder = tempfile.mkdtemp(prefix="fmwire-perf-")
    try:
        yield server, folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        code = server.stop()
    check(code == 0, f"perf serve did not drain cleanly: exit {code}, {server.process.stderr.read()!r}")


def tokens_loopback(binary, env):
    with served(binary, env) as (server, folder):
        path = os.path.join(folder, "tokens.json")
        result = perf_run(binary, env, server.endpoint, "--test", "tokens", "--repetitions", "3",
                          "--frames", "200000", "--json", path)
        print(result.stdout, end="")
        check(result.returncode == 0, f"exit {result.returncode}: {result.stderr!r}")
        check(number(result.stdout, "token frames/s") > 0, "no token frames/s")
        check(number(result.stdout, "client CPU-s per million frames") > 0, "no client CPU")
        check(number(result.stdout, "server CPU-s per million frames") > 0, "no server CPU (its report)")
        rows = results(path)
        for name in ("tokens_frames_per_s", "tokens_client_cpu_s_per_million_frames",
                     "tokens_server_cpu_s_per_million_frames"):
            check(rows.get(name, {}).get("value", 0) > 0, f"JSON row {name}: {rows.get(name)!r}")


def latency_loopback(binary, env):
    with served(binary, env) as (server, folder):
        path = os.path.join(folder, "latency.json")
        result = perf_run(binary, env, server.endpoint, "--test", "latency", "--seconds", "1",
                          "--requests", "500", "--json", path)
        print(result.stdout, end="")
        check(result.returncode == 0, f"exit {result.returncode}: {result.stderr!r}")
        p50 = number(result.stdout, "round trip p50 us")
        p99 = number(result.stdout, "round trip p99 us")
        check(0 < p50 <= p99, f"p50 {p50}, p99 {p99}")
        check("not a one-way measurement" in result.stdout, "the halved round trip is not said to be one")
        rows = results(path)
        check(abs(rows["latency_round_trip_p50"]["value"] - p50) < 0.1,
              f"JSON p50 {rows['latency_round_trip_p50']!r} against printed {p50}")
        check(rows["latency_round_trip_p99"]["value"] > 0, "JSON p99")


GRPC_NOT_BUILT = "gRPC not built in here: skipped"


def grpc_built_in(binary):
    """Whether `fmwire version` says the gRPC peer is built in."""
    version = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=LIMIT_S).stdout
    match = re.search(r"^gRPC peer \(perf --compare\): (.*)$", version, re.MULTILINE)
    check(match is not None, f"fmwire version does not say whether gRPC is built in: {version!r}")
    return match.group(1) != "not built in"


def check_grpc_rows(output, rows, names):
    """The gRPC peer's rows of tokens or latency: in the table with a
    ratio, and in the JSON with gRPC's value and a ratio."""
    check(re.search(r"peer: gRPC \d", output), f"no gRPC peer note in {output!r}")
    for name in names:
        row = rows.get(name, {})
        check(row.get("peer") == "grpc" and row.get("peer_value", 0) > 0 and row.get("ratio", 0) > 0,
              f"JSON row {name}: {row!r}")


def check_tokens_against_grpc(output, rows):
    check(number(output, "gRPC frames/s") > 0, "no gRPC frames/s")
    check(number(output, "gRPC server CPU-s per Mframe") > 0, "no gRPC server CPU (perf serve's report)")
    for label in ("fmwire / gRPC frames/s", "gRPC / fmwire client CPU/frame", "gRPC / fmwire server CPU/frame"):
        check(re.search(re.escape(label) + r"\s+[0-9.]+x", output), f"no {label!r} ratio in {output!r}")
    check_grpc_rows(output, rows, ("tokens_frames_per_s", "tokens_client_cpu_s_per_million_frames",
                                   "tokens_server_cpu_s_per_million_frames"))


def check_latency_against_grpc(output, rows):
    p50 = number(output, "gRPC round trip p50 us")
    p99 = number(output, "gRPC round trip p99 us")
    check(0 < p50 <= p99, f"gRPC p50 {p50}, p99 {p99}")
    check(re.search(r"gRPC / fmwire p50, p99\s+[0-9.]+x, [0-9.]+x", output), f"no gRPC ratios in {output!r}")
    check_grpc_rows(output, rows, ("latency_round_trip_p50", "latency_round_trip_p99"))


def check_kv_against_grpc(output, rows):
    """kv's rows against the gRPC KvTransfer server perf serve runs."""
    check(number(output, "gRPC GB/s") > 0, "no gRPC GB/s")
    check(number(output, "gRPC server CPU-s per GB") > 0, "no gRPC server CPU (perf serve's report)")
    check(re.search(r"fmwire / gRPC GB/s\s+[0-9.]+x", output), f"no fmwire / gRPC ratio in {output!r}")
    check(re.search(r"gRPC peer: gRPC \d", output), f"no gRPC peer note in {output!r}")
    for name in ("kv_gb_per_s_vs_grpc", "kv_client_cpu_s_per_gb_vs_grpc", "kv_server_cpu_s_per_gb_vs_grpc"):
        row = rows.get(name, {})
        check(row.get("peer") == "grpc" and row.get("peer_value", 0) > 0 and row.get("ratio", 0) > 0,
              f"JSON row {name}: {row!r}")


def grpc_compare(test):
    """tokens or latency with --compare against the gRPC server `perf serve`
    runs in its process: its rows and ratios in the table and the JSON.
    Where gRPC is not built in, the rows say so, have no peer, and the
    scenario is skipped."""
    def scenario(binary, env):
        # latency names the gRPC port (--grpc-port, refused where gRPC is not
        # built in); tokens takes the free one perf serve picks.
        grpc_port = free_port() if test == "latency" and grpc_built_in(binary) else None
        extra = ["--grpc-port", str(grpc_port)] if grpc_port else []
        with served(binary, env, *extra) as (server, folder):
            path = os.path.join(folder, f"{test}.json")
            shape = ["--frames", "200000"] if test == "tokens" else ["--requests", "500"]
            result = perf_run(binary, env, server.endpoint, "--test", test, "--repetitions", "3", *shape,
                              "--compare", "--json", path)
            print(result.stdout, end="")
            check(result.returncode == 0, f"exit {result.returncode}: {result.stderr!r}")
            rows = results(path)
            if GRPC_NOT_BUILT in result.stdout:
                check(all(row["peer"] == "" for row in rows.values()), f"a peer that did not run has a value: {rows!r}")
                print("skipped: gRPC not built in")
                return SKIPPED
            said = server.process.stdout.readline()
            check(re.fullmatch(r"gRPC peer on 127\.0\.0\.1:\d+\n", said), f"perf serve's second line {said!r}")
            if grpc_port:
                check(said.strip().endswith(f":{grpc_port}"), f"--grpc-port {grpc_port}, but perf serve said {said!r}")
            check(f"on {said.split()[-1]}" in result.stdout, f"the run did not use the port perf serve said: {said!r}")
            if test == "tokens":
                check_tokens_against_grpc(result.stdout, rows)
            else:
                check_latency_against_grpc(result.stdout, rows)
    return scenario


# Under a sanitizer (meson passes its slowdown) the rounds are smaller: there
# the figures mean nothing and the point is the plumbing. Under
# ThreadSanitizer writing fresh KV memory is shadow page faults (5 s for a
# worker's 190 MiB, measured): CI's loaded run of 128 MiB rounds saw the
# server silent past the client's 6-s keepalive, most likely from that.
def round_bytes(release_bytes):
    return max(16 << 20, int(release_bytes / TIME_SCALE)) if TIME_SCALE > 1 else release_bytes


def loopback_compare(test):
    """bulk or kv with --compare against the iperf3 server `perf serve`
    runs; the JSON has iperf3 as the peer and scripts/plot.py charts it; the
    iperf3 child is gone once perf serve has stopped."""
    def scenario(binary, env):
        iperf3_port = free_port()
        with served(binary, env, "--iperf3-port", str(iperf3_port)) as (server, folder):
            iperf3_children = children(server.process.pid) if shutil.which("iperf3") else []
            path = os.path.join(folder, f"{test}.json")
            result = perf_run(binary, env, server.endpoint, "--test", test, "--repetitions", "3",
                              "--bytes", str(round_bytes(128 << 20)), "--compare", "--iperf3-port", str(iperf3_port), "--json", path)
            print(result.stdout, end="")
            check(result.returncode == 0, f"exit {result.returncode}: {result.stderr!r}")
            check(number(result.stdout, "fmwire GB/s") > 0, "no GB/s")
            check(number(result.stdout, "client CPU-s per GB") > 0, "no client CPU")
            check(number(result.stdout, "server CPU-s per GB") > 0, "no server CPU (its report)")
            rows = results(path)
            row = rows[f"{test}_gb_per_s"]
            if shutil.which("iperf3") is None:
                check("iperf3 not installed" in result.stderr + result.stdout, "a missing iperf3 not said to be skipped")
                check(row["peer"] == "", "a peer that did not run has a value")
            else:
                check(len(iperf3_children) == 1, f"perf serve --iperf3-port has children {iperf3_children}")
                check(number(result.stdout, "iperf3 GB/s") > 0, "no iperf3 GB/s")
                ratio = re.search(r"fmwire / iperf3\s+([0-9.]+)x", result.stdout)
                check(ratio is not None and float(ratio.group(1)) > 0, "no fmwire / iperf3 ratio")
                check(row["peer"] == "iperf3" and row["ratio"] > 0, f"JSON row {row!r}")
            if test == "kv" and grpc_built_in(binary):
                check_kv_against_grpc(result.stdout, rows)
                plotted = subprocess.run(["/usr/bin/python3", os.path.join(SCRIPTS, "plot.py"), "--out", folder, path],
                                         capture_output=True, text=True, timeout=LIMIT_S * 3)
                check(plotted.returncode == 0, f"plot.py exit {plotted.returncode}: {plotted.stderr!r}")
                check(os.path.exists(os.path.join(folder, "perf-ratios.svg")), f"plot.py wrote {os.listdir(folder)}")
        for child in iperf3_children:
            check(not os.path.exists(f"/proc/{child}"), f"iperf3 {child} outlived perf serve")
    return scenario


def bad_test_exits_2(binary, env):
    result = perf_run(binary, env, "127.0.0.1:1", "--test", "throughput")
    check(result.returncode == 2, f"exit {result.returncode}: {result.stderr!r}")
    check("unknown --test 'throughput'" in result.stderr, f"stderr {result.stderr!r}")
    for size in (1000, 3 << 30):  # under one KV block; over the server's 2 GiB
        result = perf_run(binary, env, "127.0.0.1:1", "--test", "kv", "--bytes", str(size))
        check(result.returncode == 2 and "--bytes for kv must be" in result.stderr,
              f"kv --bytes {size}: exit {result.returncode} {result.stderr!r}")


def grpc_port_taken_exits_1(binary, env):
    """perf serve --grpc-port or --grpc-kv-port on a port that is taken:
    exit 1, saying so, at once (where gRPC is not built in, the flags are
    refused, exit 2, and the scenario skipped)."""
    import socket
    for flag in ("--grpc-port", "--grpc-kv-port"):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            process = subprocess.run([binary, "perf", "serve", "--listen", "127.0.0.1:0", flag, str(port)],
                                     capture_output=True, text=True, env=env, timeout=LIMIT_S)
        if "gRPC not built in" in process.stderr:
            check(process.returncode == 2, f"{flag} without gRPC: exit {process.returncode}")
            print("skipped: gRPC not built in")
            return SKIPPED
        check(process.returncode == 1, f"{flag}: exit {process.returncode}: {process.stderr!r}")
        check(f"{flag}: gRPC server could not listen on 127.0.0.1:{port}" in process.stderr,
              f"{flag}: stderr {process.stderr!r}")


def server_unreachable(binary, env):
    started = time.monotonic()
    result = perf_run(binary, env, f"127.0.0.1:{free_port()}", "--test", "tokens", timeout=LIMIT_S)
    check(result.returncode == 1, f"exit {result.returncode}: {result.stderr!r}")
    check("connect to 127.0.0.1" in result.stderr, f"stderr {result.stderr!r}")
    check(time.monotonic() - started < 10, "took more than 10 s to say so")


def server_killed_mid_test(binary, env):
    """SIGKILL under a run that would last 30 s: it ends, non-zero, with a
    message, within 10 s. "grpc" is tokens --compare killed once its gRPC
    rounds have begun (where gRPC is built in)."""
    for test in ("tokens", "bulk", "kv", "grpc"):
        server = PerfServer(binary, env)
        run = None
        try:
            if test == "grpc":
                # fmwire's two rounds of 2M frames take seconds; gRPC's two then about 10 s.
                shape = ["--test", "tokens", "--compare", "--repetitions", "1", "--frames", "2000000"]
            else:
                shape = ["--test", test, "--seconds", "30", "--bytes", str(64 << 20)]
            run = subprocess.Popen([binary, "perf", "run", "--to", server.endpoint, *shape],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            if test == "grpc":
                said = read_until(run.stderr, lambda text: "gRPC token rounds against" in text
                                  or "gRPC not built in" in text, limit_s=LIMIT_S * 3)
                if "gRPC not built in" in said:
                    print("grpc: skipped, gRPC not built in")
                    continue
                time.sleep(0.5)
            else:
                time.sleep(1.0)
            if run.poll() is not None:
                raise Failure(f"{test} run ended before the kill: {run.communicate()!r}")
            server.process.kill()
            killed = time.monotonic()
            try:
                _, stderr = run.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                run.kill()
                run.wait()
                raise Failure(f"{test} run still running 10 s after the server was killed")
            print(f"{test}: exit {run.returncode} {time.monotonic() - killed:.2f} s after the kill: {stderr.strip()}")
            check(run.returncode == 1, f"{test} exit {run.returncode}: {stderr!r}")
            said_test = "tokens" if test == "grpc" else test
            check(f"fmwire perf run: {said_test} against {server.endpoint}" in stderr, f"stderr {stderr!r}")
            if test == "grpc":
                check("gRPC" in stderr.split(f"{said_test} against {server.endpoint}")[-1], f"stderr {stderr!r}")
        finally:
            if run is not None and run.poll() is None:
                run.kill()
                run.wait()
            server.kill()


# ---------------------------------------------------------------- across namespaces


def across_namespaces(rate_mbit):
    def scenario(binary, env):
        try:
            cluster = Cluster(["server", "client"], rate_mbit=rate_mbit)
        except ClusterUnavailable as reason:
            print(f"skipped: {reason}")
            return SKIPPED
        with cluster, tempfile.TemporaryDirectory(prefix="fmwire-perf-") as folder:
            server_log = tempfile.NamedTemporaryFile("w+", prefix="fmwire-perf-serve-")
            server = cluster.start("server", [binary, "perf", "serve", "--listen",
                                              f"{cluster.addresses['server']}:{PERF_PORT}",
                                              "--iperf3-port", str(IPERF3_PORT)],
                                   stdout=server_log, stderr=subprocess.STDOUT, env=env)
            try:
                wait_listening(cluster, "server", PERF_PORT)
                # 1 Gbit/s: 125 MB/s, so 128 MiB a round is about a second.
                bytes_per_round = (128 << 20) if rate_mbit <= 1000 else (512 << 20)
                result = cluster.run("client", [binary, "perf", "run", "--to", f"server:{PERF_PORT}", "--test", "bulk",
                                                "--repetitions", "3", "--bytes", str(bytes_per_round), "--compare",
                                                "--iperf3-port", str(IPERF3_PORT)],
                                     timeout=LIMIT_S * 6, env=env)
                print(f"bulk across namespaces, links held to {rate_mbit} Mbit/s:")
                print(result.stdout, end="")
                check(result.returncode == 0, f"exit {result.returncode}: {result.stderr!r}")
                check(number(result.stdout, "fmwire GB/s") > 0, "no GB/s")
                check(number(result.stdout, "server CPU-s per GB") > 0, "no server CPU (its report)")
                if shutil.which("iperf3"):
                    check(number(result.stdout, "iperf3 GB/s") > 0, "no iperf3 GB/s")
                    check(re.search(r"fmwire / iperf3\s+[0-9.]+x", result.stdout), "no ratio")
                kv_path = os.path.join(folder, "kv.json")
                kv = cluster.run("client", [binary, "perf", "run", "--to", f"server:{PERF_PORT}", "--test", "kv",
                                            "--repetitions", "3", "--bytes", str(bytes_per_round), "--compare",
                                            "--iperf3-port", str(IPERF3_PORT), "--json", kv_path],
                                 timeout=LIMIT_S * 6, env=env)
                print(f"kv across namespaces, links held to {rate_mbit} Mbit/s:")
                print(kv.stdout, end="")
                check(kv.returncode == 0, f"kv exit {kv.returncode}: {kv.stderr!r}")
                check(number(kv.stdout, "fmwire GB/s") > 0, "no kv GB/s")
                if shutil.which("iperf3"):
                    check(re.search(r"fmwire / iperf3\s+[0-9.]+x", kv.stdout), "no kv ratio")
                if grpc_built_in(binary):
                    check_kv_against_grpc(kv.stdout, results(kv_path))
                # tokens and latency against the gRPC peer perf serve runs, found
                # by name across the link as fmwire's server is.
                for test, shape in (("tokens", ["--frames", "500000"]), ("latency", ["--requests", "1000"])):
                    path = os.path.join(folder, f"{test}.json")
                    result = cluster.run("client", [binary, "perf", "run", "--to", f"server:{PERF_PORT}", "--test",
                                                    test, "--repetitions", "3", *shape, "--compare", "--json", path],
                                         timeout=LIMIT_S * 6, env=env)
                    print(f"{test} across namespaces, links held to {rate_mbit} Mbit/s:")
                    print(result.stdout, end="")
                    check(result.returncode == 0, f"{test} exit {result.returncode}: {result.stderr!r}")
                    if GRPC_NOT_BUILT in result.stdout:
                        print(f"{test}: gRPC not built in, its rows skipped")
                    elif test == "tokens":
                        check_tokens_against_grpc(result.stdout, results(path))
                    else:
                        check_latency_against_grpc(result.stdout, results(path))
            finally:
                if server.poll() is None:
                    server.send_signal(signal.SIGTERM)
                    try:
                        server.wait(timeout=LIMIT_S)
                    except subprocess.TimeoutExpired:
                        server.kill()
                server_log.seek(0)
                log = server_log.read()
                server_log.close()
            check(server.returncode == 0, f"perf serve exit {server.returncode}: {log!r}")
    return scenario


SCENARIOS = {
    "tokens_loopback": tokens_loopback,
    "latency_loopback": latency_loopback,
    "tokens_loopback_compare": grpc_compare("tokens"),
    "latency_loopback_compare": grpc_compare("latency"),
    "bulk_loopback_compare": loopback_compare("bulk"),
    "kv_loopback_compare": loopback_compare("kv"),
    "bad_test_exits_2": bad_test_exits_2,
    "grpc_port_taken_exits_1": grpc_port_taken_exits_1,
    "server_unreachable": server_unreachable,
    "server_killed_mid_test": server_killed_mid_test,
    "across_namespaces_1g": across_namespaces(1000),
    "across_namespaces_10g": across_namespaces(10000),
}

if __name__ == "__main__":
    sys.exit(run_scenario("perf", SCENARIOS))
