#!/usr/bin/env python3
"""A cluster of simulated hosts on one machine, for fmwire's multi-node tests
and for trying fmwire across hosts by hand: each host is a network
namespace with one interface (eth0, 10.214.0.N/24) joined to the others by
a bridge in a namespace of its own, each link optionally held to a rate
(tc tbf) and delayed (netem, where the kernel has it). Hosts find each
other by name: every namespace gets an /etc/netns/NAMESPACE/hosts file
naming them all, which `ip netns exec` puts in place of /etc/hosts.

Nothing outside the cluster's namespaces is touched: no address, route or
device of the machine's own. Root only (CAP_NET_ADMIN).

As a module (tests/system/cluster_cli_test.py):

    with Cluster(["etcd", "router1", "worker1"]) as cluster:
        process = cluster.start("worker1", ["fmwire", "worker", ...])
        cluster.cut("worker1"); cluster.restore("worker1")

As a command:

    scripts/netns_cluster.py up --fmwire build/cli/fmwire [--workers 3] [--routers 2]
        [--rate-mbit N] [--delay-us N]
        starts etcd, the routers, the workers and a gateway, each on a host
        of its own, prints how to reach them, and on Ctrl-C (or SIGTERM)
        stops them and removes every namespace
    scripts/netns_cluster.py clean
        removes what a cluster killed with SIGKILL left behind (fmc* namespaces)

Teardown runs on leaving the `with`, on SIGINT, SIGTERM and SIGHUP, and at
interpreter exit; only a SIGKILL leaves namespaces behind (`clean`).
"""
import argparse
import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

PREFIX = "fmc"           # every cluster's namespaces start with it (`clean` finds them)
SUBNET = "10.214.0."     # inside the cluster's namespaces only
NETNS_ETC = "/etc/netns"


def kill_all(processes):
    """SIGKILL to every process still running, then each waited for (10 s at most)."""
    for process in processes:
        if process.poll() is None:
            process.kill()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class ClusterUnavailable(Exception):
    """Why no cluster can be made here: not root, no ip or tc, no veth."""


def _run(*arguments, check=True):
    result = subprocess.run(arguments, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments)} failed (exit {result.returncode}): {result.stderr.strip()}")
    return result


class Cluster:
    """Hosts named by the caller, 10.214.0.1 onwards in the order given.
    The bridge's namespace is PREFIX+PID-sw, each host's PREFIX+PID-NAME."""

    _alive = []  # every cluster not yet removed, for the signal handler

    def __init__(self, hosts, rate_mbit=None, delay_us=None):
        if os.geteuid() != 0:
            raise ClusterUnavailable("not root: network namespaces need CAP_NET_ADMIN")
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise ClusterUnavailable(f"`{tool}` is not on PATH (apt-get install iproute2)")
        if len(set(hosts)) != len(hosts) or not hosts or len(hosts) > 200:
            raise ValueError(f"hosts must be 1 to 200 distinct names: {hosts}")
        self.tag = f"{PREFIX}{os.getpid()}"
        self.switch = f"{self.tag}-sw"
        self.hosts = list(hosts)
        self.addresses = {name: f"{SUBNET}{index + 1}" for index, name in enumerate(self.hosts)}
        self.processes = []
        self.removed = False
        self.has_netem = False
        Cluster._alive.append(self)
        _install_handlers()
        try:
            self._make(rate_mbit, delay_us)
        except Exception as error:
            self.remove()
            if isinstance(error, RuntimeError) and "veth" in str(error):
                raise ClusterUnavailable(str(error)) from error
            raise

    def namespace(self, host):
        return f"{self.tag}-{host}"

    def _make(self, rate_mbit, delay_us):
        _run("ip", "netns", "add", self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        hosts_file = "127.0.0.1 localhost\n" + "".join(f"{self.addresses[h]} {h}\n" for h in self.hosts)
        for index, host in enumerate(self.hosts):
            space = self.namespace(host)
            os.makedirs(f"{NETNS_ETC}/{space}", exist_ok=True)
            with open(f"{NETNS_ETC}/{space}/hosts", "w") as file:
                file.write(hosts_file)
            _run("ip", "netns", "add", space)
            port = f"p{index}"
            _run("ip", "link", "add", "eth0", "netns", space, "type", "veth", "peer", "name", port,
                 "netns", self.switch)
            _run("ip", "-n", self.switch, "link", "set", port, "master", "br0")
            _run("ip", "-n", self.switch, "link", "set", port, "up")
            _run("ip", "-n", space, "address", "add", f"{self.addresses[host]}/24", "dev", "eth0")
            _run("ip", "-n", space, "link", "set", "lo", "up")
            _run("ip", "-n", space, "link", "set", "eth0", "up")
        probe = _run("tc", "-n", self.namespace(self.hosts[0]), "qdisc", "add", "dev", "eth0", "root", "netem",
                     "delay", "100us", check=False)
        self.has_netem = probe.returncode == 0
        if self.has_netem:
            _run("tc", "-n", self.namespace(self.hosts[0]), "qdisc", "del", "dev", "eth0", "root")
        if rate_mbit or delay_us:
            for host in self.hosts:
                self.shape(host, rate_mbit, delay_us)

    def shape(self, host, rate_mbit=None, delay_us=None):
        """Holds the host's outgoing traffic to rate_mbit (tbf: a 1 ms
        bucket, at least 64 KiB so a GSO packet passes whole, and at most
        10 ms of queue) and delays it by delay_us (netem, where there is
        one); None for either: not that."""
        space = self.namespace(host)
        _run("tc", "-n", space, "qdisc", "del", "dev", "eth0", "root", check=False)  # none yet is fine
        delayed = bool(delay_us) and self.has_netem
        if delayed:
            _run("tc", "-n", space, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "netem", "delay",
                 f"{delay_us}us", "limit", "100000")
        if rate_mbit:
            bits = int(rate_mbit * 1_000_000)
            burst = str(max(64 * 1024, bits // 8 // 1000))
            where = ["parent", "1:1", "handle", "10:"] if delayed else ["root"]
            _run("tc", "-n", space, "qdisc", "add", "dev", "eth0", *where, "tbf", "rate", f"{bits}bit",
                 "burst", burst, "latency", "10ms")

    def cut(self, host):
        """The host's link goes down: its packets are lost both ways, its
        processes run on (a network partition, not a crash)."""
        _run("ip", "-n", self.namespace(host), "link", "set", "eth0", "down")

    def restore(self, host):
        _run("ip", "-n", self.namespace(host), "link", "set", "eth0", "up")

    def command(self, host, argv):
        """argv run on `host` (`ip netns exec` execs it: the pid is argv's)."""
        return ["ip", "netns", "exec", self.namespace(host), *argv]

    def start(self, host, argv, **popen):
        """argv started on `host`; stopped (SIGKILL) by remove() if still
        running. Popen's keywords pass through (default: text pipes)."""
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
        popen.setdefault("text", True)
        process = subprocess.Popen(self.command(host, argv), **popen)
        self.processes.append(process)
        return process

    def run(self, host, argv, timeout, **run):
        """argv run to its end on `host`: subprocess.run's result."""
        run.setdefault("capture_output", True)
        run.setdefault("text", True)
        return subprocess.run(self.command(host, argv), timeout=timeout, **run)

    def remove(self):
        """Every process started killed, every namespace and hosts file
        removed; each step tried whether or not the one before it worked."""
        if self.removed:
            return
        self.removed = True
        kill_all(self.processes)
        for host in self.hosts:
            space = self.namespace(host)
            _run("ip", "netns", "del", space, check=False)  # its veth end, and so the pair, with it
            shutil.rmtree(f"{NETNS_ETC}/{space}", ignore_errors=True)
        _run("ip", "netns", "del", self.switch, check=False)
        if self in Cluster._alive:
            Cluster._alive.remove(self)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.remove()


_handlers_installed = False


def _remove_all(signal_number=None, _frame=None):
    for cluster in list(Cluster._alive):
        cluster.remove()
    if signal_number is not None:
        print(f"netns_cluster: signal {signal_number}: removed the cluster's namespaces", file=sys.stderr)
        sys.exit(128 + signal_number)


def _install_handlers():
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_remove_all)
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(number) in (signal.SIG_DFL, signal.default_int_handler, signal.SIG_IGN):
            signal.signal(number, _remove_all)


def clean():
    """Removes fmc* namespaces (and their hosts files) whose process is gone."""
    listed = _run("ip", "netns", "list", check=False).stdout.split()
    removed = []
    for name in listed:
        if not name.startswith(PREFIX) or "-" not in name:
            continue
        pid = name[len(PREFIX):name.index("-")]
        if pid.isdigit() and os.path.exists(f"/proc/{pid}"):
            continue  # its cluster is still alive
        _run("ip", "netns", "del", name, check=False)
        shutil.rmtree(f"{NETNS_ETC}/{name}", ignore_errors=True)
        removed.append(name)
    return removed


# ---------------------------------------------------------------- fmwire on a cluster

ETCD_PORT = 2379
ROUTER_PORT = 7000
WORKER_PORT = 7100
GATEWAY_PORT = 8000


def wait_listening(cluster, host, port, limit_s=20):
    """Until something accepts TCP on host:port, from inside the cluster."""
    deadline = time.monotonic() + limit_s
    probe = ["python3", "-c", f"import socket; socket.create_connection(('{host}', {port}), timeout=1).close()"]
    while time.monotonic() < deadline:
        if cluster.run(host, probe, timeout=5).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {host}:{port} after {limit_s} s")


def start_etcd(cluster, host="etcd"):
    folder = tempfile.mkdtemp(prefix="fmwire-etcd-")
    client = f"http://{cluster.addresses[host]}:{ETCD_PORT}"
    peer = f"http://{cluster.addresses[host]}:{ETCD_PORT + 1}"
    process = cluster.start(host, [shutil.which("etcd") or "/usr/bin/etcd", "--name", "default",
                                   "--data-dir", folder, "--listen-client-urls", client,
                                   "--advertise-client-urls", client, "--listen-peer-urls", peer,
                                   "--initial-advertise-peer-urls", peer,
                                   "--initial-cluster", f"default={peer}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(cluster, host, ETCD_PORT)
    return process, f"http://{host}:{ETCD_PORT}", folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start a cluster with fmwire on it; Ctrl-C ends it")
    up.add_argument("--fmwire", required=True, help="the fmwire binary")
    up.add_argument("--workers", type=int, default=3)
    up.add_argument("--routers", type=int, default=2)
    up.add_argument("--model", default="builtin")
    up.add_argument("--rate-mbit", type=float)
    up.add_argument("--delay-us", type=int)
    commands.add_parser("clean", help="remove what a killed cluster left behind")
    arguments = parser.parse_args()
    if arguments.command == "clean":
        removed = clean()
        print(f"removed {len(removed)} namespace(s): {' '.join(removed)}")
        return 0
    if arguments.workers < 1 or arguments.routers < 1:
        parser.error("--workers and --routers must be at least 1")
    binary = os.path.abspath(arguments.fmwire)
    workers = [f"worker{i + 1}" for i in range(arguments.workers)]
    routers = [f"router{i + 1}" for i in range(arguments.routers)]
    hosts = ["etcd", *routers, *workers, "gateway", "client"]
    try:
        cluster = Cluster(hosts, arguments.rate_mbit, arguments.delay_us)
    except ClusterUnavailable as reason:
        print(f"netns_cluster: {reason}", file=sys.stderr)
        return 2
    with cluster:
        _, etcd_url, folder = start_etcd(cluster)
        for worker in workers:
            cluster.start(worker, [binary, "worker", "--listen", f"0.0.0.0:{WORKER_PORT}", "--model",
                                   arguments.model, "--etcd", etcd_url, "--advertise", f"{worker}:{WORKER_PORT}"],
                          stdout=None, stderr=None)
        for router in routers:
            cluster.start(router, [binary, "router", "--listen", f"0.0.0.0:{ROUTER_PORT}", "--etcd", etcd_url,
                                   "--advertise", f"{router}:{ROUTER_PORT}"], stdout=None, stderr=None)
        for router in routers:
            wait_listening(cluster, router, ROUTER_PORT)
        cluster.start("gateway", [binary, "gateway", "--listen", f"0.0.0.0:{GATEWAY_PORT}", "--router",
                                  ",".join(f"{router}:{ROUTER_PORT}" for router in routers), "--model",
                                  arguments.model],
                      stdout=None, stderr=None)
        wait_listening(cluster, "gateway", GATEWAY_PORT)
        print(f"cluster {cluster.tag}: {', '.join(f'{h} {a}' for h, a in cluster.addresses.items())}")
        print(f"try: ip netns exec {cluster.namespace('client')} curl -sSN http://gateway:{GATEWAY_PORT}/v1/completions "
              f"-H 'Content-Type: application/json' -d '{{\"model\":\"{arguments.model}\",\"prompt\":\"Hi\","
              f"\"max_tokens\":16,\"stream\":true}}'")
        print("Ctrl-C stops it and removes the namespaces", flush=True)
        try:
            while all(process.poll() is None for process in cluster.processes):
                time.sleep(0.5)
            print("netns_cluster: a process exited; stopping the cluster", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0
        finally:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
