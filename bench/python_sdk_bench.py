#!/usr/bin/python3
"""bench/python_sdk_bench: tokens/s received in Python (module fmwire)
against the C++ SDK (fmwire::Client, bench_sdk_stream_peer) in the same run,
from the same worker, with the same request shape: one stream, and 64
concurrent streams (Python: asyncio with a task per stream, asyncio with
one task reading all (Client.agenerate_many), and a thread per stream), as tokens/s and as CPU time per token of the receiving process
(its client thread included; the worker's not), the second less at the
mercy of other load on the machine. The worker serves a synthetic model with no step time
(synthetic:tiny --step-us 0), so that the SDKs' receiving is measured, not
a model. Each repetition runs the C++ side, then each Python side; the table
shows medians and the ratios: Python/C++ for tokens/s, C++/Python for CPU
per token (> 1 either way: Python better).

    python_sdk_bench.py --fmwire build/cli/fmwire --peer build/bench/bench_sdk_stream_peer
                        [--quick] [--repetitions N] [--json FILE]

PYTHONPATH must hold the build's python/ folder. Exit code 0 when it ran,
2 for a bad command line, 1 when a measurement failed (DESIGN.md: Measuring).
"""
import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import threading
import time

import fmwire

PROMPT = "Benchmark the Python SDK"


def python_sync(client, streams, max_tokens):
    """One thread per stream (a single stream: the plain for loop)."""
    counts = [0] * streams
    texts = [None] * streams

    def read(i):
        pieces = []
        for chunk in client.generate(PROMPT, max_tokens=max_tokens, seed=i):
            counts[i] += len(chunk.token_ids)
            pieces.append(chunk.text)
        texts[i] = "".join(pieces)

    start = time.perf_counter()
    cpu_start = time.process_time()
    if streams == 1:
        read(0)
    else:
        threads = [threading.Thread(target=read, args=(i,)) for i in range(streams)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return sum(counts), time.perf_counter() - start, time.process_time() - cpu_start


def python_asyncio(client, streams, max_tokens):
    async def read(i):
        count = 0
        pieces = []
        async for chunk in client.agenerate(PROMPT, max_tokens=max_tokens, seed=i):
            count += len(chunk.token_ids)
            pieces.append(chunk.text)
        return count

    async def main():
        start = time.perf_counter()
        cpu_start = time.process_time()
        counts = await asyncio.gather(*(read(i) for i in range(streams)))
        return sum(counts), time.perf_counter() - start, time.process_time() - cpu_start

    return asyncio.run(main())


def python_group(client, streams, max_tokens):
    async def main():
        start = time.perf_counter()
        cpu_start = time.process_time()
        count = 0
        async for _, chunk in client.agenerate_many([PROMPT] * streams, max_tokens=max_tokens):
            count += len(chunk.token_ids)
        return count, time.perf_counter() - start, time.process_time() - cpu_start

    return asyncio.run(main())


def cpp_peer(peer, endpoint, streams, max_tokens):
    result = subprocess.run([peer, endpoint, str(streams), str(max_tokens), "1", PROMPT],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"{peer} exit {result.returncode}: {result.stderr.strip()}")
    tokens, seconds, cpu_seconds = result.stdout.split()
    return int(tokens), float(seconds), float(cpu_seconds)


def start_worker(fmwire_binary):
    worker = subprocess.Popen([fmwire_binary, "worker", "--listen", "127.0.0.1:0", "--model", "synthetic:tiny",
                               "--step-us", "0", "--max-context", "100000", "--log-level", "warn"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = worker.stdout.readline()
    if not line.startswith("listening on "):
        worker.kill()
        raise RuntimeError(f"the worker printed {line!r}")
    return worker, line.split()[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fmwire", required=True, help="the fmwire binary")
    parser.add_argument("--peer", required=True, help="bench_sdk_stream_peer")
    parser.add_argument("--quick", action="store_true", help="short streams, one repetition: proves it runs")
    parser.add_argument("--repetitions", type=int, help="rounds of every row (default 7; --quick: 1)")
    parser.add_argument("--json", help="write the results here")
    options = parser.parse_args()
    repetitions = options.repetitions or (1 if options.quick else 7)
    if repetitions < 1:
        parser.error("--repetitions must be at least 1")
    shapes = [(1, 200 if options.quick else 8000), (64, 20 if options.quick else 1000)]

    worker, endpoint = start_worker(options.fmwire)
    rows = []
    try:
        with fmwire.Client(endpoint) as client:
            for streams, max_tokens in shapes:
                sides = {"C++ SDK": lambda: cpp_peer(options.peer, endpoint, streams, max_tokens)}
                if streams == 1:
                    sides["Python, for loop"] = lambda: python_sync(client, streams, max_tokens)
                else:
                    sides["Python, asyncio, a task per stream"] = lambda: python_asyncio(client, streams, max_tokens)
                    sides["Python, asyncio, one task (agenerate_many)"] = lambda: python_group(client, streams,
                                                                                                max_tokens)
                    sides["Python, a thread per stream"] = lambda: python_sync(client, streams, max_tokens)
                rates = {side: [] for side in sides}
                cpu_per_token = {side: [] for side in sides}
                for _ in range(repetitions):
                    for side, run in sides.items():
                        tokens, seconds, cpu_seconds = run()
                        if tokens != streams * max_tokens:
                            raise RuntimeError(f"{side}: {tokens} tokens, not {streams * max_tokens}")
                        rates[side].append(tokens / seconds)
                        cpu_per_token[side].append(cpu_seconds / tokens * 1e6)
                peer = "C++ SDK (fmwire::Client)"
                peer_rate = statistics.median(rates["C++ SDK"])
                peer_cpu = statistics.median(cpu_per_token["C++ SDK"])
                shape = f"{streams} stream{'s' if streams > 1 else ''} x {max_tokens} tokens"
                for side in sides:
                    if side == "C++ SDK":
                        continue
                    rate = statistics.median(rates[side])
                    cpu = statistics.median(cpu_per_token[side])
                    rows.append({"name": f"{shape}, {side}", "value": rate, "unit": "tokens/s", "peer": peer,
                                 "peer_value": peer_rate, "ratio": rate / peer_rate})
                    rows.append({"name": f"{shape}, {side}, CPU per token", "value": cpu, "unit": "us/token",
                                 "peer": peer, "peer_value": peer_cpu, "ratio": peer_cpu / cpu})
    except (RuntimeError, fmwire.Error) as error:
        print(f"python_sdk_bench: {error}", file=sys.stderr)
        return 1
    finally:
        worker.kill()
        worker.wait()

    print(f"python_sdk_bench: medians of {repetitions}, worker synthetic:tiny --step-us 0 on {endpoint}")
    width = max(len(row["name"]) for row in rows)
    print(f"{'row':<{width}} {'Python':>10} {'C++':>10} {'unit':>9} {'ratio':>6}")
    for row in rows:
        print(f"{row['name']:<{width}} {row['value']:>10,.1f} {row['peer_value']:>10,.1f} {row['unit']:>9} "
              f"{row['ratio']:>6.2f}")
    if options.json:
        with open(options.json, "w") as out:
            json.dump({"bench": "python_sdk", "results": rows}, out, indent=2)
        print(f"results written to {options.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
