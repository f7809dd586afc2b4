#!/usr/bin/env python3
"""Multi-process tests of disaggregated prefill/decode: `fmwire worker
--role prefill|decode` processes behind `fmwire router`, `fmwire gateway`
or `fmwire up --disaggregate`, on 127.0.0.1, with the KV moving worker to
worker. Clients: `fmwire generate`, curl -N, OpenAI's Node SDK. Block
counters are read from the gateway's /metrics (each worker's load report,
passed on by the router).

    disaggregation_cli_test.py FMWIRE_BINARY BACKEND SCENARIO

Same rules as native_cli_test.py: free ports, bounded waits, every process
killed on the way out.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

from gateway_cli_test import HttpServer, check_sse, http, metric, run_openai_client, up
from native_cli_test import LIMIT_S, SKIPPED, TIME_SCALE, Failure, check, generate, run_scenario
from router_cli_test import Router, Worker, frames_of, stop_all

# The bounds below are the issue's, for a release build. Under a sanitizer
# the same work takes several times as long (ThreadSanitizer: a 1,500-token
# Llama-3-8B prefill writes 190 MiB of synthetic KV, and the page faults of
# its shadow memory make that 5-7 s, not 0.6), so meson passes a factor for
# them (tests/system/meson.build), and the waits for a state stretch with it.
WAIT_S = LIMIT_S * TIME_SCALE
# The synthetic Llama-3-8B shape: 128 KiB of KV per token in f16, so a
# 1,500-token prompt moves 190 MiB; prefill made slow enough (0.4 ms a
# token) that a signal sent 0.3 s in lands mid-prefill and mid-transfer.
MODEL = "synthetic:llama-3-8b"
SYNTHETIC = ["--model", MODEL, "--kv-blocks", "256", "--step-us", "2000",
             "--load-report-interval-ms", "20"]
SLOW_PREFILL = ["--prefill-ns-per-token", "400000"]
LONG_PROMPT = "a" * 1500
WORKER_LOAD = ("kv_blocks_in_use", "running_sequences", "queued_sequences", "paused_sequences", "kv_reserved_blocks",
               "kv_transfers_active")


def token_ids(stdout):
    return [t for frame in frames_of(stdout) if frame["type"] == "tokens" for t in frame["token_ids"]]


def matches_colocated(binary, env):
    """Greedy tokens through a prefill and a decode worker are the tokens
    of one worker serving the request whole, for short and long prompts."""
    prefill = Worker(binary, env, "--model", "builtin", "--role", "prefill", "--max-batch-tokens", "64")
    decode = Worker(binary, env, "--model", "builtin", "--role", "decode")
    whole = Worker(binary, env, "--model", "builtin")
    router = None
    try:
        router = Router(binary, env, [prefill, decode])
        time.sleep(0.5)  # the router learns the roles from the first load reports
        for prompt in ("Hi", "Once upon a time there was a wire", "x" * 300):
            direct = generate(binary, env, whole.endpoint, "--max-tokens", "24", "--json", prompt)
            split = generate(binary, env, router.endpoint, "--max-tokens", "24", "--json", prompt)
            check(direct.returncode == 0 and split.returncode == 0, f"exit {direct.stderr} {split.stderr}")
            check(token_ids(split.stdout) == token_ids(direct.stdout),
                  f"split {token_ids(split.stdout)} != whole {token_ids(direct.stdout)}")
            finish = frames_of(split.stdout)[-1]
            check(finish["usage"]["completion_tokens"] == 24, f"usage {finish['usage']}")
        check(router.stop() == 0, "the router did not stop cleanly")
        _, errors = router.process.communicate()
        check("3 split" in errors, f"router stderr {errors!r}")
        # Both caches in host memory: every chunk left the prefill worker's
        # cache as it lies and landed in the decode worker's reserved blocks.
        for worker, pattern in ((prefill, r"chunks sent (\d+) \((\d+) from the cache"),
                                (decode, r"received (\d+) \((\d+) into the cache")):
            check(worker.stop() == 0, "a worker did not stop cleanly")
            _, errors = worker.process.communicate()
            found = re.search(pattern, errors)
            check(found and int(found.group(1)) > 0 and found.group(2) == found.group(1), f"worker stderr {errors!r}")
    finally:
        stop_all(router, prefill, decode, whole)


def corrupted_chunk_recomputed(binary, env):
    """A KV chunk corrupted after its digest was taken (the prefill worker's
    fault switch) is caught at the decode worker: the session aborts with
    integrity, the router serves the request whole, the output is still the
    colocated one."""
    corrupting = dict(env, FMWIRE_FAULT_CORRUPT_KV_CHUNK="1")
    prefill = Worker(binary, corrupting, "--model", "builtin", "--role", "prefill")
    decode = Worker(binary, env, "--model", "builtin", "--role", "decode")
    whole = Worker(binary, env, "--model", "builtin")
    router = None
    try:
        router = Router(binary, env, [prefill, decode], "--migrate")
        time.sleep(0.5)  # the router learns the roles from the first load reports
        prompt = "y" * 120
        direct = generate(binary, env, whole.endpoint, "--max-tokens", "16", "--json", prompt)
        split = generate(binary, env, router.endpoint, "--max-tokens", "16", "--json", prompt)
        check(direct.returncode == 0 and split.returncode == 0, f"exit {direct.stderr} {split.stderr}")
        check(token_ids(split.stdout) == token_ids(direct.stdout),
              f"split {token_ids(split.stdout)} != whole {token_ids(direct.stdout)}")
        check(router.stop() == 0, "the router did not stop cleanly")
        _, errors = router.process.communicate()
        check("1 split (1 served whole after a part failed)" in errors, f"router stderr {errors!r}")
    finally:
        stop_all(router, prefill, decode, whole)


class Topology:
    """A prefill and a decode worker (synthetic Llama-3-8B) behind a gateway."""

    def __init__(self, binary, env, prefill_extra=(), decode_extra=()):
        self.prefill = Worker(binary, env, *SYNTHETIC, *SLOW_PREFILL, "--role", "prefill", *prefill_extra)
        self.decode = Worker(binary, env, *SYNTHETIC, "--role", "decode", *decode_extra)
        self.gateway = HttpServer(binary, env, "gateway", "--listen", "127.0.0.1:0", "--model", MODEL,
                                  "--workers", f"{self.prefill.endpoint},{self.decode.endpoint}")
        self.wait_blocks(lambda used: all(value == 0 for value in used.values()), "both workers' load reports")

    def blocks_in_use(self):
        return {name: numbers["kv_blocks_in_use"] for name, numbers in self.loads().items()}

    def loads(self):
        """Each worker's latest load report, as the gateway shows it."""
        try:
            _, page = http(self.gateway.url + "/metrics")
        except ConnectionResetError:
            # Polled every 10 ms on a new connection that the gateway's side
            # closes first: thousands of its sockets wait in TIME_WAIT, and a
            # new connection from a port one of them remembers can be reset
            # by the kernel (most likely what happened the one time this was
            # seen, under TSan with CI's stages running beside it). Once
            # more; a gateway that is really gone fails again.
            time.sleep(0.01)
            _, page = http(self.gateway.url + "/metrics")
        except ConnectionRefusedError:
            # Nothing listens: the gateway is gone. A Failure, so that the
            # scenario says how it ended (its exit code and stderr) rather
            # than a bare traceback, as CI's TSan run once had it.
            code = self.gateway.process.poll()
            raise Failure(f"the gateway refused /metrics: it {'exited with ' + str(code) if code is not None else 'runs'}")
        return {name: {key: metric(page, f'fmwire_gateway_worker_{key}{{worker="{worker.endpoint}"}}')
                       for key in WORKER_LOAD}
                for name, worker in (("prefill", self.prefill), ("decode", self.decode))}

    def wait_idle(self, what):
        """Seconds until neither worker holds anything: no block in use or
        reserved, no sequence running or queued, no transfer open."""
        return self.wait_loads(lambda loads: all(value == 0 for numbers in loads.values() for value in numbers.values()),
                               what)

    def wait_loads(self, predicate, what, limit_s=WAIT_S, of=("prefill", "decode")):
        """Seconds until predicate(loads) holds with every number of the
        workers in `of` known (a killed worker's may be gone)."""
        started = time.monotonic()
        loads = {}
        while time.monotonic() - started < limit_s:
            loads = self.loads()
            if all(None not in loads[name].values() for name in of) and predicate(loads):
                return time.monotonic() - started
            time.sleep(0.01)
        raise Failure(f"timed out waiting for {what}; loads {loads}")

    def wait_blocks(self, predicate, what, limit_s=WAIT_S, of=("prefill", "decode")):
        """Seconds until predicate(blocks in use) holds, polled every 10 ms."""
        return self.wait_loads(lambda loads: predicate({name: numbers["kv_blocks_in_use"]
                                                        for name, numbers in loads.items()}), what, limit_s, of)

    def stream(self, max_tokens, prompt=LONG_PROMPT):
        body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True})
        return subprocess.Popen(["curl", "-N", "-sS", "--noproxy", "*", "--max-time", str(WAIT_S),
                                 self.gateway.url + "/v1/completions", "-H", "Content-Type: application/json",
                                 "-d", body], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def close(self):
        self.gateway.kill()
        stop_all(self.prefill, self.decode)

    def stop_and_tell(self):
        """Stops every process with SIGTERM: the tail of what each wrote to
        stderr (a worker's last line holds its KV counters), for a failure."""
        _, _, errors = self.gateway.stop()
        tails = [f"gateway: {errors[-800:]!r}"]
        for name, worker in (("prefill", self.prefill), ("decode", self.decode)):
            worker.stop()
            tails.append(f"{name}: {worker.process.stderr.read()[-800:]!r}")
        return "; ".join(tails)


def cancel_frees_blocks(binary, env):
    """A client that goes away in each phase (queued for prefill, mid
    prefill and transfer, decoding) leaves no block in use at either
    worker; how long that takes is printed (it includes the load reports'
    interval and the router's pass-on: an upper bound)."""
    topology = Topology(binary, env, prefill_extra=("--max-running", "1"))
    clients = []
    try:
        # Each phase its own prompt: one seen before would be found in the
        # prefill worker's prefix cache, and not prefilled nor queued.
        for phase, prompt, max_tokens in (("mid-transfer", "a" * 1500, 16), ("decoding", "b" * 1500, 2000)):
            client = topology.stream(max_tokens, prompt)
            clients.append(client)
            if phase == "mid-transfer":
                topology.wait_blocks(lambda used: used["decode"] > 0, "the decode worker's reservation")
                time.sleep(0.3)
            else:  # the decode worker has the sequence, the transfer is over
                topology.wait_loads(lambda loads: loads["decode"]["running_sequences"] > 0
                                    and loads["decode"]["kv_transfers_active"] == 0
                                    and loads["prefill"]["running_sequences"] == 0, "decoding at the decode worker")
                time.sleep(0.2)
            check(client.poll() is None, f"{phase}: the stream ended before the cancel: {client.stdout.read()[-300:]!r}")
            client.kill()  # the HTTP client goes away
            client.wait()
            took = topology.wait_idle(f"{phase}: blocks freed")
            print(f"{phase}: both workers idle {took * 1000:.0f} ms after the client went away")
            check(took < 1.0 * TIME_SCALE, f"{phase}: blocks freed after {took:.2f} s")
        # Queued: the prefill worker runs one sequence at a time, so a second
        # request waits while the first prefills (0.6 s); cancel the waiting
        # one, then the first.
        first = topology.stream(2000, "c" * 1500)
        clients.append(first)
        topology.wait_loads(lambda loads: loads["prefill"]["running_sequences"] > 0, "the first request's prefill")
        queued = topology.stream(2000, "d" * 1500)
        clients.append(queued)
        topology.wait_loads(lambda loads: loads["prefill"]["queued_sequences"] > 0, "the second request queued")
        queued.kill()
        queued.wait()
        took = topology.wait_loads(lambda loads: loads["prefill"]["queued_sequences"] == 0,
                                   "the queued request's cancel at the prefill worker")
        print(f"queued: gone from the prefill worker's queue {took * 1000:.0f} ms after its client went away")
        check(first.poll() is None, f"the first request ended with the second's cancel: {first.stdout.read()[-300:]!r}")
        first.kill()
        first.wait()
        took = topology.wait_idle("queued: blocks freed")
        print(f"queued: both workers idle {took * 1000:.0f} ms after the clients went away")
        check(took < 1.0 * TIME_SCALE, f"queued: blocks freed after {took:.2f} s")
    except Failure as failure:
        raise Failure(f"{failure}; {topology.stop_and_tell()}") from None
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait()
        topology.close()


def killed_mid_transfer(binary, env, victim):
    """SIGKILL of one worker while the KV moves: the client's stream goes
    on (served whole by the survivor) or ends with an error, within a
    bound; the survivor holds no block afterwards."""
    topology = Topology(binary, env)
    client = None
    try:
        client = topology.stream(8)
        topology.wait_blocks(lambda used: used["decode"] > 0, "the decode worker's reservation")
        time.sleep(0.1)
        getattr(topology, victim).process.kill()
        killed = time.monotonic()
        output, errors = client.communicate(timeout=max(LIMIT_S, 9 * TIME_SCALE))
        took = time.monotonic() - killed
        print(f"{victim} killed: the client's stream ended {took * 1000:.0f} ms later")
        if "[DONE]" in output:
            check_sse_completion(output)
        else:
            check('"error"' in output, f"neither a completion nor an error: {output[-600:]!r} {errors!r}")
        # The continued stream recomputes the prompt (0.6 s of synthetic
        # prefill) on the survivor: 2 s leaves room for that and this VM.
        check(took < 3.0 * TIME_SCALE, f"the stream ended {took:.2f} s after the kill")
        survivor = "decode" if victim == "prefill" else "prefill"
        freed = topology.wait_blocks(lambda used: used[survivor] == 0, f"the {survivor} worker's blocks",
                                     limit_s=5 * TIME_SCALE, of=(survivor,))
        print(f"{victim} killed: the {survivor} worker holds no block {freed * 1000:.0f} ms after the stream ended")
        check(freed < 1.0 * TIME_SCALE, f"the survivor freed its blocks {freed:.2f} s after the stream ended")
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        topology.close()


def check_sse_completion(text):
    data = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    check(data and data[-1] == "[DONE]", f"SSE {text[-600:]!r}")
    chunks = [json.loads(payload) for payload in data[:-1]]
    check(any(choice.get("finish_reason") for chunk in chunks for choice in chunk["choices"]),
          f"no finish_reason in {text[-600:]!r}")


def prefill_killed_mid_transfer(binary, env):
    killed_mid_transfer(binary, env, "prefill")


def decode_killed_mid_transfer(binary, env):
    killed_mid_transfer(binary, env, "decode")


def openai_sdk_up_disaggregated(binary, env):
    """`fmwire up --disaggregate`: OpenAI's SDK streams through a prefill
    and a decode worker, unchanged."""
    server = up(binary, env, "--no-demo", "--disaggregate")
    try:
        run_openai_client(server.url, "builtin")
        code, _, errors = server.stop()
        check(code == 0, f"fmwire up exit {code}: {errors[-1000:]!r}")
        check(" split" in errors and "0 split" not in errors, f"nothing was split: {errors[-600:]!r}")
    finally:
        server.kill()


def drain_hands_streams_over(binary, env):
    """Live migration: SIGTERM to the worker serving a long stream hands the
    sequence to the other worker by KV transfer; the client's stream goes
    on with every index once, and the draining worker exits long before
    the stream would have ended there."""
    model = ["--model", "synthetic:tiny", "--step-us", "5000", "--load-report-interval-ms", "20"]
    serving = Worker(binary, env, *model)                      # role both: whole requests go here
    taking = Worker(binary, env, *model, "--role", "decode")   # takes handovers
    router = None
    client = None
    try:
        router = Router(binary, env, [serving, taking], "--migrate")
        time.sleep(0.5)  # roles come with the first load reports
        reference = generate(binary, env, serving.endpoint, "--max-tokens", "800", "--json", "move me")
        check(reference.returncode == 0, f"reference: {reference.stderr}")
        client = subprocess.Popen([binary, "generate", "--endpoint", router.endpoint, "--max-tokens", "800", "--json",
                                   "move me"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        output = []
        reader = threading.Thread(target=lambda: output.append(client.stdout.read()), daemon=True)
        reader.start()
        # A quarter into the stream, the drain starts (from a shell: on time
        # whatever this process's threads are doing).
        started = time.monotonic()
        subprocess.run(["sh", "-c", f"sleep 1; kill -TERM {serving.process.pid}"], timeout=LIMIT_S)
        signalled = time.monotonic()
        check(client.poll() is None, "the stream ended before the drain")
        code = serving.process.wait(timeout=LIMIT_S)
        drained = time.monotonic() - signalled
        reader.join(timeout=LIMIT_S)
        streamed = "".join(output)
        errors = client.stderr.read()
        client.wait(timeout=LIMIT_S)
        check(client.returncode == 0, f"generate exit {client.returncode}: {errors!r}")
        frames = frames_of(streamed)
        indexes = [frame["first_index"] + i for frame in frames if frame["type"] == "tokens"
                   for i in range(len(frame["token_ids"]))]
        check(indexes == list(range(800)), f"indexes {indexes[:20]}...")
        check(token_ids(streamed) == token_ids(reference.stdout), "the tokens differ from the worker's own")
        print(f"the draining worker exited {drained * 1000:.0f} ms after SIGTERM (code {code}); "
              f"the stream had about 3000 ms of decoding left")
        check(drained < 1.5 * TIME_SCALE, f"the draining worker took {drained:.2f} s: the stream was not handed over")
        check(router.stop() == 0, "the router did not stop cleanly")
        _, router_errors = router.process.communicate()
        taking.stop()
        _, taking_errors = taking.process.communicate()
        _, serving_errors = serving.process.communicate()
        check("1 handed over by KV transfer" in router_errors,
              f"router stderr {router_errors!r}; serving {serving_errors!r}; taking {taking_errors!r}")
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        stop_all(router, serving, taking)


def cuda_device(binary, env):
    """None where a worker can serve with --device cuda, else the reason
    (the worker's own line: no driver, no device, not built)."""
    process = subprocess.Popen([binary, "worker", "--listen", "127.0.0.1:0", "--model", "builtin", "--device", "cuda"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        if process.stdout.readline().startswith("listening on 127.0.0.1:"):
            return None
        _, errors = process.communicate(timeout=LIMIT_S)
        check(process.returncode == 2 and "--device cuda: CUDA: " in errors, f"exit {process.returncode}: {errors!r}")
        return errors.strip().splitlines()[-1]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def cuda_matches_colocated(binary, env):
    """On a GPU: greedy tokens through a CUDA prefill and a CUDA decode
    worker, the KV leaving one device and landing in the other's blocks,
    are the tokens of one CUDA worker serving the request whole; and a CPU
    prefill worker's f16 KV lets a CUDA decode worker finish the stream."""
    reason = cuda_device(binary, env)
    if reason is not None:
        print(f"skipped: {reason}")
        return SKIPPED
    cuda = ("--model", "builtin", "--device", "cuda")
    prefill = Worker(binary, env, *cuda, "--role", "prefill", "--max-batch-tokens", "64")
    decode = Worker(binary, env, *cuda, "--role", "decode")
    whole = Worker(binary, env, *cuda)
    cpu_prefill = Worker(binary, env, "--model", "builtin", "--role", "prefill", "--max-batch-tokens", "64")
    router = mixed = None
    try:
        router = Router(binary, env, [prefill, decode])
        mixed = Router(binary, env, [cpu_prefill, decode])
        time.sleep(0.5)  # the routers learn the roles from the first load reports
        for prompt in ("Hi", "Once upon a time there was a wire", "x" * 300):
            direct = generate(binary, env, whole.endpoint, "--max-tokens", "24", "--json", prompt)
            split = generate(binary, env, router.endpoint, "--max-tokens", "24", "--json", prompt)
            across = generate(binary, env, mixed.endpoint, "--max-tokens", "24", "--json", prompt)
            check(direct.returncode == 0 and split.returncode == 0 and across.returncode == 0,
                  f"exit {direct.stderr} {split.stderr} {across.stderr}")
            check(token_ids(split.stdout) == token_ids(direct.stdout),
                  f"split {token_ids(split.stdout)} != whole {token_ids(direct.stdout)}")
            # CPU and CUDA logits agree within a rounding step, not bit for
            # bit, so the mixed stream is checked whole, not token by token.
            check(len(token_ids(across.stdout)) == 24 and frames_of(across.stdout)[-1]["usage"]["completion_tokens"] == 24,
                  f"CPU prefill, CUDA decode: {across.stdout[-600:]!r}")
            print(f"{len(prompt)}-char prompt: CUDA split = CUDA whole; CPU->CUDA {token_ids(across.stdout)[:8]}...")
        for each in (router, mixed):
            check(each.stop() == 0, "a router did not stop cleanly")
            _, errors = each.process.communicate()
            check("3 split" in errors, f"router stderr {errors!r}")
        # The device's KV went through the pinned transfer arena both ways
        # (one DMA, no host copy), the CPU worker's from its cache in place.
        lines = {}
        for name, worker in (("cuda prefill", prefill), ("cuda decode", decode), ("cpu prefill", cpu_prefill)):
            check(worker.stop() == 0, f"the {name} worker did not stop cleanly")
            _, errors = worker.process.communicate()
            lines[name] = next((line for line in errors.splitlines() if "KV transfers" in line), "")
            print(f"{name}: {lines[name]}")
        sent = re.search(r"chunks sent (\d+) \((\d+) from the cache, (\d+) from the pinned arena\)", lines["cuda prefill"])
        check(sent and int(sent.group(1)) > 0 and sent.group(3) == sent.group(1), f"cuda prefill: {lines['cuda prefill']!r}")
        landed = re.search(r"received (\d+) \((\d+) into the cache, (\d+) through the pinned arena\)", lines["cuda decode"])
        check(landed and int(landed.group(1)) > 0 and landed.group(3) == landed.group(1), f"cuda decode: {lines['cuda decode']!r}")
        cpu = re.search(r"chunks sent (\d+) \((\d+) from the cache", lines["cpu prefill"])
        check(cpu and int(cpu.group(1)) > 0 and cpu.group(2) == cpu.group(1), f"cpu prefill: {lines['cpu prefill']!r}")
    finally:
        stop_all(router, mixed, prefill, decode, whole, cpu_prefill)


SCENARIOS = {name: function for name, function in globals().items()
             if name in ("matches_colocated", "cancel_frees_blocks", "prefill_killed_mid_transfer",
                         "decode_killed_mid_transfer", "openai_sdk_up_disaggregated", "drain_hands_streams_over",
                         "corrupted_chunk_recomputed", "cuda_matches_colocated")}



if __name__ == "__main__":
    sys.exit(run_scenario("disaggregation", SCENARIOS))
