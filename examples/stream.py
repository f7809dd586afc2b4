#!/usr/bin/env python3
"""examples/stream.py: stream tokens from Python (module fmwire).

Prints the tokens of a completion as they come, then why it finished and
how many tokens it took; with --async, the same through asyncio, several
streams at once. A worker or router must be running:

    fmwire worker --listen 127.0.0.1:7100 &
    python3 examples/stream.py --endpoint 127.0.0.1:7100 "Once upon a time"

Leaving a loop early (break) cancels its stream at the worker. A worker
lost mid-stream raises fmwire.WorkerLost, which is retryable: the request
may be sent again, and the client has moved on to the next endpoint.
"""
import argparse
import asyncio
import sys

import fmwire


def stream(client, prompt, max_tokens):
    tokens = client.generate(prompt, max_tokens=max_tokens, temperature=0.0)
    for chunk in tokens:
        print(chunk.text, end="", flush=True)
    done = tokens.completion
    print(f"\n[{done.reason}: {done.prompt_tokens} prompt tokens, {done.completion_tokens} generated]")


async def stream_several(client, prompt, max_tokens, count):
    async def one(seed):
        pieces = [chunk.text async for chunk in
                  client.agenerate(prompt, max_tokens=max_tokens, temperature=0.8, seed=seed)]
        return "".join(pieces)

    for seed, text in enumerate(await asyncio.gather(*(one(seed) for seed in range(count)))):
        print(f"[seed {seed}] {text}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="Once upon a time")
    parser.add_argument("--endpoint", default="127.0.0.1:7100", help="HOST:PORT[,HOST:PORT...]")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--async", dest="use_async", action="store_true", help="four streams through asyncio")
    options = parser.parse_args()
    try:
        with fmwire.Client(options.endpoint) as client:
            if options.use_async:
                asyncio.run(stream_several(client, options.prompt, options.max_tokens, 4))
            else:
                stream(client, options.prompt, options.max_tokens)
    except fmwire.Error as error:
        print(f"\nfmwire: {error}", file=sys.stderr)
        return 75 if error.retryable else 1  # EX_TEMPFAIL: worth a retry
    return 0


if __name__ == "__main__":
    sys.exit(main())
