#!/usr/bin/env python3
"""Multi-process tests of `fmwire worker`: the worker and `fmwire generate`
as separate processes on 127.0.0.1, as a user runs them.

    worker_cli_test.py FMWIRE_BINARY BACKEND SCENARIO

Same rules as native_cli_test.py: free ports, bounded waits, every process
killed on the way out.
"""
import json
import os
import signal
import subprocess
import sys

from native_cli_test import LIMIT_S, Failure, Server, check, generate, read_until, start_generate, run_scenario


class Worker(Server):
    def __init__(self, binary, env, *extra):
        super().__init__(binary, env, "worker", *extra)


def frames_of(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def builtin_streams(binary, env):
    worker = Worker(binary, env, "--model", "builtin")
    try:
        result = generate(binary, env, worker.endpoint, "--max-tokens", "16", "--json", "Hello")
        check(result.returncode == 0, f"exit {result.returncode}: {result.stderr}")
        frames = frames_of(result.stdout)
        indexes = [frame["first_index"] + i for frame in frames if frame["type"] == "tokens"
                   for i in range(len(frame["token_ids"]))]
        check(indexes == list(range(16)), f"indexes {indexes}")
        finish = frames[-1]
        check(finish["type"] == "finish" and finish["reason"] == "max_tokens", f"finish {finish}")
        check(finish["usage"] == {"prompt_tokens": 6, "completion_tokens": 16, "cached_prompt_tokens": 0},
              f"usage {finish['usage']}")
        check(finish["timings"][0]["hop"].startswith("worker "), f"timings {finish['timings']}")
        # Greedy is deterministic: the plain text is the JSON pieces joined.
        text = generate(binary, env, worker.endpoint, "--max-tokens", "16", "Hello")
        check(text.returncode == 0, f"exit {text.returncode}: {text.stderr}")
        pieces = "".join(piece for frame in frames if frame["type"] == "tokens" for piece in frame["text"])
        check(text.stdout == pieces + finish["trailing_text"] + "\n", f"{text.stdout!r} != {pieces!r}")
        check(worker.stop() == 0, "the worker did not stop cleanly")
        _, errors = worker.process.communicate()
        check("cpu backend" in errors and "2 streams finished" in errors, f"worker stderr {errors!r}")
        check("CUDA: " in errors, f"no line on the CUDA choice: {errors!r}")
    finally:
        worker.kill()


def bad_request(binary, env):
    worker = Worker(binary, env, "--model", "builtin")
    try:
        result = generate(binary, env, worker.endpoint, "--max-tokens", "5000", "hi")
        check(result.returncode == 1, f"exit {result.returncode}")
        check("bad_request" in result.stderr and "context" in result.stderr, f"stderr {result.stderr!r}")
        again = generate(binary, env, worker.endpoint, "--max-tokens", "2", "hi")
        check(again.returncode == 0, f"after the error: {again.stderr!r}")
    finally:
        worker.kill()


def unknown_model(binary, env):
    result = subprocess.run([binary, "worker", "--listen", "127.0.0.1:0", "--model", "synthetic:nope"],
                            capture_output=True, text=True, env=env, timeout=LIMIT_S)
    check(result.returncode == 2, f"exit {result.returncode}")
    check("unknown synthetic model 'nope'" in result.stderr and "llama-3-8b" in result.stderr,
          f"stderr {result.stderr!r}")
    missing = subprocess.run([binary, "worker", "--listen", "127.0.0.1:0", "--model", "/no/such/model.bin"],
                             capture_output=True, text=True, env=env, timeout=LIMIT_S)
    check(missing.returncode == 2 and "/no/such/model.bin" in missing.stderr, f"stderr {missing.stderr!r}")


def kv_dtype(binary, env):
    """--kv-dtype sets the KV cache's element type (f16 by default), which the
    start-up log states with the bytes per token; any other value is refused
    with exit code 2, naming the flag and the values it takes."""
    result = subprocess.run([binary, "worker", "--listen", "127.0.0.1:0", "--kv-dtype", "fp8"],
                            capture_output=True, text=True, env=env, timeout=LIMIT_S)
    check(result.returncode == 2, f"exit {result.returncode}")
    check("--kv-dtype" in result.stderr and "f16, bf16 or f32" in result.stderr, f"stderr {result.stderr!r}")
    for flags, line in ((["--model", "builtin", "--device", "cpu"], "KV in f16 (1024 bytes per token)"),
                        (["--model", "builtin", "--device", "cpu", "--kv-dtype", "f32"], "KV in f32 (2048 bytes per token)"),
                        (["--model", "synthetic:llama-3-8b", "--kv-dtype", "bf16", "--step-us", "500"],
                         "131072 bytes of KV per token (bf16)")):
        worker = Worker(binary, env, *flags)
        try:
            result = generate(binary, env, worker.endpoint, "--max-tokens", "8", "--json", "Hello")
            check(result.returncode == 0, f"{flags}: exit {result.returncode}: {result.stderr}")
            check(frames_of(result.stdout)[-1]["usage"]["completion_tokens"] == 8, f"{flags}: short stream")
            check(worker.stop() == 0, f"{flags}: the worker did not stop cleanly")
            _, errors = worker.process.communicate()
            check(line in errors, f"{flags}: worker stderr {errors!r}")
        finally:
            worker.kill()


def synthetic_8b(binary, env):
    # Llama-3-8B's KV shape (128 KiB a token) with a fast step.
    worker = Worker(binary, env, "--model", "synthetic:llama-3-8b", "--step-us", "500", "--kv-memory-mib", "64")
    try:
        result = generate(binary, env, worker.endpoint, "--max-tokens", "100", "--json", "time me")
        check(result.returncode == 0, f"exit {result.returncode}: {result.stderr}")
        check(frames_of(result.stdout)[-1]["usage"]["completion_tokens"] == 100, "short stream")
        check(worker.stop() == 0, "the worker did not stop cleanly")
        _, errors = worker.process.communicate()
        check("131072 bytes of KV per token (f16)" in errors, f"worker stderr {errors!r}")
    finally:
        worker.kill()


def unblocked_shutdown_signals(pid):
    """Threads of `pid` that would take SIGINT or SIGTERM themselves: the
    kernel gives a process's signal to any thread not blocking it, so one
    such thread ends the process undrained. The signal watcher's thread is
    the one meant to take them (sigtimedwait unblocks them while it waits)."""
    wanted = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
    unblocked = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        if fields["Name"].strip() != "fmwire-signals" and int(fields["SigBlk"], 16) & wanted != wanted:
            unblocked.append(f"{fields['Name'].strip()} ({task})")
    return unblocked


def drain_finishes_open_stream(binary, env):
    worker = Worker(binary, env, "--model", "synthetic:tiny", "--step-us", "10000")
    client = start_generate(binary, env, worker.endpoint, "--max-tokens", "40", "--json", "drain me")
    try:
        read_until(client.stdout, lambda text: text.count("\n") >= 2)
        unblocked = unblocked_shutdown_signals(worker.process.pid)
        check(not unblocked, f"threads that would end the worker undrained: {unblocked}")
        worker.process.send_signal(signal.SIGTERM)
        rest, errors = client.communicate(timeout=LIMIT_S)
        check(client.returncode == 0, f"the open stream did not finish: exit {client.returncode}, {errors!r}")
        check(json.loads(rest.splitlines()[-1])["usage"]["completion_tokens"] == 40, f"last {rest!r}")
        check(worker.process.wait(timeout=LIMIT_S) == 0, "the worker did not exit 0 after draining")
    finally:
        worker.kill()
        if client.poll() is None:
            client.kill()
            client.wait()


def worker_killed_mid_stream(binary, env):
    worker = Worker(binary, env, "--model", "synthetic:tiny", "--step-us", "5000")
    client = start_generate(binary, env, worker.endpoint, "--max-tokens", "1000", "--json", "kill it")
    try:
        read_until(client.stdout, lambda text: text.count("\n") >= 3)
        worker.kill()  # SIGKILL: no GoAway, no Error frame
        _, errors = client.communicate(timeout=LIMIT_S)
        check(client.returncode == 1, f"exit {client.returncode}")
        check("worker_lost" in errors and "retryable" in errors, f"stderr {errors!r}")
    finally:
        worker.kill()
        if client.poll() is None:
            client.kill()
            client.wait()


def sigint_cancels(binary, env):
    worker = Worker(binary, env, "--model", "synthetic:tiny", "--step-us", "5000")
    client = start_generate(binary, env, worker.endpoint, "--max-tokens", "1000", "--json", "cancel me")
    try:
        read_until(client.stdout, lambda text: text.count("\n") >= 3)
        client.send_signal(signal.SIGINT)
        _, errors = client.communicate(timeout=LIMIT_S)
        check(client.returncode == 130, f"exit {client.returncode}: {errors!r}")
        again = generate(binary, env, worker.endpoint, "--max-tokens", "2", "next")
        check(again.returncode == 0, f"after the cancel: {again.stderr!r}")
        check(worker.stop() == 0, "the worker did not drain cleanly")
        _, worker_errors = worker.process.communicate()
        check("1 cancelled" in worker_errors, f"the worker did not see the cancel: {worker_errors!r}")
    finally:
        worker.kill()
        if client.poll() is None:
            client.kill()
            client.wait()


def device_cuda(binary, env):
    """--device cuda serves where a GPU is and otherwise exits with the reason.
    Either way only the worker opens the CUDA library: the fmwire binary
    itself needs none, so clients and gateways never load cuBLAS."""
    linked = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=LIMIT_S)
    check(linked.returncode == 0, f"ldd: {linked.stderr!r}")
    check("libcudart" not in linked.stdout and "libcublas" not in linked.stdout, f"fmwire links CUDA: {linked.stdout}")
    process = subprocess.Popen([binary, "worker", "--listen", "127.0.0.1:0", "--model", "builtin", "--device", "cuda"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        if line.startswith("listening on 127.0.0.1:"):
            result = generate(binary, env, line.split()[-1], "--max-tokens", "4", "Hello")
            check(result.returncode == 0, f"on the GPU: exit {result.returncode}: {result.stderr}")
            # The CUDA runtime starts threads of its own while the model loads.
            unblocked = unblocked_shutdown_signals(process.pid)
            process.send_signal(signal.SIGTERM)
            _, errors = process.communicate(timeout=LIMIT_S)
            check(not unblocked, f"threads that would end the worker undrained: {unblocked}")
            check(process.returncode == 0 and "cuda backend" in errors and "stopped after 1 streams" in errors,
                  f"worker exit {process.returncode}, stderr {errors!r}")
        else:
            _, errors = process.communicate(timeout=LIMIT_S)
            check(process.returncode == 2 and "--device cuda: CUDA: " in errors and "skipped" in errors,
                  f"without a GPU: exit {process.returncode}, stderr {errors!r}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


SCENARIOS = {
    "device_cuda": device_cuda,
    "builtin_streams": builtin_streams,
    "bad_request": bad_request,
    "unknown_model": unknown_model,
    "synthetic_8b": synthetic_8b,
    "kv_dtype": kv_dtype,
    "drain_finishes_open_stream": drain_finishes_open_stream,
    "worker_killed_mid_stream": worker_killed_mid_stream,
    "sigint_cancels": sigint_cancels,
}



if __name__ == "__main__":
    sys.exit(run_scenario("worker", SCENARIOS))
