#!/usr/bin/env python3
"""Multi-process tests of the log every fmwire process writes on standard
error (--log-level, --log-format), on 127.0.0.1: JSON lines a collector
parses, each naming its process, with the start settings, workers joining
and lost, stream and peer events; text lines at --log-level warn that hold
the warnings only; a gateway's failover from one router to the other in
its log; bad log flags refused.

    log_cli_test.py FMWIRE_BINARY BACKEND SCENARIO

Same rules as native_cli_test.py: free ports, bounded waits, every process
killed on the way out.
"""
import json
import re
import signal
import subprocess
import sys
import threading

from gateway_cli_test import HttpServer
from native_cli_test import LIMIT_S, Failure, Server, check, generate, run_scenario
from router_cli_test import stop_all, until

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (debug|info|warning|error) (fmwire [a-z -]+): (.*)$")


class Lines:
    """Every line a process writes on standard error, read as it comes by
    a thread of its own (so that a full pipe never stalls the process)."""

    def __init__(self, stream):
        self.lines = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        for line in stream:
            with self.lock:
                self.lines.append(line.rstrip("\n"))

    def all(self):
        with self.lock:
            return list(self.lines)

    def finish(self):
        self.thread.join(timeout=LIMIT_S)
        return self.all()


def logged(binary, env, command, *extra):
    """A worker or router whose standard error is read into .log."""
    server = Server(binary, env, command, *extra)
    server.log = Lines(server.process.stderr)
    return server


def json_events(lines, process):
    """Each line parsed as JSON, checked for the members every line has."""
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except json.JSONDecodeError as error:
            raise Failure(f"{process}: a line that is not JSON ({error}): {line!r}")
        for key in ("time", "level", "process", "pid", "msg"):
            check(key in event, f"{process}: no {key!r} in {line!r}")
        check(event["process"] == process, f"{process}: process {event['process']!r} in {line!r}")
        check(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", event["time"]), f"time in {line!r}")
        events.append(event)
    return events


def said(events, message, **fields):
    return [event for event in events
            if event["msg"] == message and all(event.get(key) == value for key, value in fields.items())]


def json_lines_name_peers_and_streams(binary, env):
    """Worker and router with --log-format json: every line parses; the
    router's start line carries its settings, each worker joining and the
    killed one lost (a warning naming it, with why), its drain and its
    end; the worker says the router connected."""
    workers = [logged(binary, env, "worker", "--model", "builtin", "--log-format", "json") for _ in range(2)]
    router = None
    try:
        router = logged(binary, env, "router", "--workers", ",".join(w.endpoint for w in workers),
                        "--threads", "2", "--log-format", "json")
        result = generate(binary, env, router.endpoint, "--max-tokens", "4", "--log-format", "json", "Hello")
        check(result.returncode == 0, f"generate: exit {result.returncode} {result.stderr!r}")
        check(result.stderr == "", f"a stream that went well logs nothing at info: {result.stderr!r}")
        workers[1].process.send_signal(signal.SIGKILL)
        workers[1].process.wait(timeout=LIMIT_S)
        until(lambda: any('"worker lost"' in line for line in router.log.all()), what="the router's worker lost line")
        check(router.stop() == 0, "the router did not exit 0")
        events = json_events(router.log.finish(), "fmwire router")
        started = said(events, "started")
        check(len(started) == 1, f"one start line expected: {started}")
        check(started[0]["listen"] == "127.0.0.1:0" and started[0]["threads"] == 2 and
              started[0]["policy"] == "least-loaded" and started[0]["workers"] == 2, f"start line {started[0]}")
        for serving in workers:
            joined = said(events, "worker joined", worker=serving.endpoint)
            check(len(joined) == 1 and joined[0]["level"] == "info",
                  f"one line of {serving.endpoint} joining (said by one loop of 2): {joined}")
        lost = said(events, "worker lost", worker=workers[1].endpoint)
        check(len(lost) == 1 and lost[0]["level"] == "warning" and lost[0]["why"], f"worker lost: {lost}")
        check(said(events, "draining", loop=0, connections=0) and said(events, "draining", loop=1),
              f"no drain lines: {events}")
        check(any(event["msg"].startswith("stopped after 1 streams finished") for event in events), f"{events}")
        check(all(event["pid"] == router.process.pid for event in events), "pid")

        check(workers[0].stop() == 0, "the worker did not exit 0")
        worker_events = json_events(workers[0].log.finish(), "fmwire worker")
        check(said(worker_events, "started", model="builtin", role="both"), f"worker start: {worker_events}")
        check(said(worker_events, "peer connected", name="fmwire router"), f"no router in {worker_events}")
        check(said(worker_events, "peer left", name="fmwire router"), f"router never left: {worker_events}")
    finally:
        stop_all(router, *workers)


def text_at_warn_holds_the_warnings(binary, env):
    """--log-level warn: no start or join lines; the lost worker's warning
    in the text form, time, level, process, message, key=value fields."""
    workers = [Server(binary, env, "worker", "--model", "builtin") for _ in range(2)]
    router = None
    try:
        router = logged(binary, env, "router", "--workers", ",".join(w.endpoint for w in workers),
                        "--log-level", "warn")
        workers[0].kill()
        until(lambda: router.log.all(), what="a line from the router")
        check(router.stop() == 0, "the router did not exit 0")
        lines = router.log.finish()
        check(len(lines) == 1, f"only the warning expected at --log-level warn: {lines}")
        found = TEXT_LINE.match(lines[0])
        check(found and found.group(1) == "warning" and found.group(2) == "fmwire router", f"{lines[0]!r}")
        check(found.group(3).startswith(f"worker lost worker={workers[0].endpoint} streams=0 why="), f"{lines[0]!r}")
    finally:
        stop_all(router, *workers)


def gateway_logs_its_failover(binary, env):
    """A gateway with two routers: the one it is connected to killed, its
    log says that router was lost and the other connected, with names."""
    serving = Server(binary, env, "worker", "--model", "builtin")
    routers = []
    gateway = None
    try:
        routers = [Server(binary, env, "router", "--workers", serving.endpoint) for _ in range(2)]
        gateway = HttpServer(binary, env, "gateway", "--listen", "127.0.0.1:0", "--http-threads", "1",
                             "--router", ",".join(r.endpoint for r in routers), "--log-format", "json")
        gateway.log = Lines(gateway.process.stderr)
        until(lambda: any('"upstream router connected"' in line for line in gateway.log.all()),
              what="the gateway's connected line")
        routers[0].kill()
        until(lambda: any(f'"router":"{routers[1].endpoint}"' in line and "connected" in line
                          for line in gateway.log.all()), what="the gateway's failover to the second router")
        gateway.process.send_signal(signal.SIGINT)
        check(gateway.process.wait(timeout=LIMIT_S) == 0, "the gateway did not exit 0")
        events = json_events(gateway.log.finish(), "fmwire gateway")
        check(said(events, "started", upstreams=",".join(r.endpoint for r in routers)), f"gateway start: {events}")
        check(said(events, "upstream router connected", router=routers[0].endpoint, http_thread=0), f"{events}")
        lost = said(events, "upstream router lost", router=routers[0].endpoint)
        check(len(lost) == 1 and lost[0]["level"] == "warning", f"lost: {events}")
        check(said(events, "upstream router connected", router=routers[1].endpoint), f"{events}")
        check(said(events, "no API keys: the API is open to anyone who can reach it", level="warning"), f"{events}")
    finally:
        if gateway is not None:
            gateway.kill()
        stop_all(*routers, serving)


def bad_log_flags_refused(binary, env):
    for command in (["worker"], ["router", "--workers", "127.0.0.1:1"], ["gateway", "--router", "127.0.0.1:1"],
                    ["generate", "--endpoint", "127.0.0.1:1", "x"]):
        for flag, value, says in (("--log-level", "loud", "--log-level loud: give debug, info, warn, error or off"),
                                  ("--log-format", "xml", "--log-format xml: give text or json")):
            result = subprocess.run([binary, *command, flag, value], capture_output=True, text=True, env=env,
                                    timeout=LIMIT_S)
            check(result.returncode == 2 and says in result.stderr,
                  f"{command[0]} {flag} {value}: exit {result.returncode} {result.stderr!r}")


SCENARIOS = {
    "json_lines_name_peers_and_streams": json_lines_name_peers_and_streams,
    "text_at_warn_holds_the_warnings": text_at_warn_holds_the_warnings,
    "gateway_logs_its_failover": gateway_logs_its_failover,
    "bad_log_flags_refused": bad_log_flags_refused,
}

if __name__ == "__main__":
    sys.exit(run_scenario("log", SCENARIOS))
