"""Processes for the Python SDK's tests: `fmwire worker` and `fmwire router`
on 127.0.0.1, each on a free port (port 0, read back from its first line),
every wait bounded, every process killed on the way out.

FMWIRE_BINARY names the fmwire binary (meson passes build/cli/fmwire);
PYTHONPATH holds the build's python/ folder, where the package is.
"""
import os
import re
import subprocess
import tempfile
import time
import urllib.request

import pytest

LIMIT_S = 20
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def until(predicate, what, limit_s=LIMIT_S):
    """Waits, polling, until predicate() holds; fails naming `what` after limit_s."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    pytest.fail(f"waited {limit_s} s for {what}")


class Process:
    """A server subcommand of fmwire on a free port, with /metrics; its
    standard error goes to a temporary file (read by errors())."""

    def __init__(self, binary, command, *extra):
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [binary, command, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        try:
            line = self.process.stdout.readline()
            if not line.startswith("listening on 127.0.0.1:"):
                raise RuntimeError(f"{command} printed {line!r}; stderr {self.errors()!r}")
            self.endpoint = line.split()[-1]
            line = self.process.stdout.readline().strip()
            found = re.match(r"^metrics on (http://127\.0\.0\.1:\d+/metrics)$", line)
            if not found:
                raise RuntimeError(f"{command} printed {line!r} where its metrics address was expected")
            self.metrics_url = found.group(1)
        except BaseException:
            self.kill()
            raise

    def metric(self, series):
        """The value of `series` ("name{labels}") on its /metrics page."""
        with NO_PROXY.open(self.metrics_url, timeout=LIMIT_S) as response:
            page = response.read().decode()
        found = re.search("^" + re.escape(series) + r" (\S+)$", page, re.MULTILINE)
        if found is None:
            pytest.fail(f"no {series} at {self.metrics_url}")
        return float(found.group(1))

    def errors(self):
        self.log.seek(0)
        return self.log.read()

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


@pytest.fixture(scope="session")
def binary():
    path = os.environ.get("FMWIRE_BINARY")
    if not path or not os.access(path, os.X_OK):
        pytest.fail(f"FMWIRE_BINARY must name the fmwire binary, not {path!r}")
    return path


@pytest.fixture(scope="session")
def processes():
    """Kills what start() started, whatever the outcome."""
    started = []
    yield started
    for process in started:
        process.kill()


@pytest.fixture(scope="session")
def start(binary, processes):
    def start_process(command, *extra):
        process = Process(binary, command, *extra)
        processes.append(process)
        return process
    return start_process


@pytest.fixture(scope="module")
def worker(start):
    """The built-in model (a real decoder on the CPU): greedy output is deterministic."""
    return start("worker", "--model", "builtin")


@pytest.fixture(scope="module")
def router(start, worker):
    return start("router", "--workers", worker.endpoint)


@pytest.fixture(scope="module")
def slow_worker(start):
    """A synthetic model at 500 steps/s: streams long enough to cancel or cut."""
    return start("worker", "--model", "synthetic:tiny", "--step-us", "2000")


@pytest.fixture(params=["worker", "router"])
def endpoint(request, worker, router):
    """The worker's endpoint, and the router's in front of it."""
    return worker.endpoint if request.param == "worker" else router.endpoint
