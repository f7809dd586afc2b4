#!/usr/bin/env python3
"""Runs examples/stream.py as a user would, against a worker started here:

    run_example.py FMWIRE_BINARY EXAMPLE [ARGUMENTS...]

The example must exit 0 and print the tokens and its finish line; the
worker is killed on the way out."""
import re
import subprocess
import sys

from conftest import LIMIT_S, Process


def main(binary, example, *arguments):
    worker = Process(binary, "worker", "--model", "builtin")
    try:
        result = subprocess.run([sys.executable, example, "--endpoint", worker.endpoint, *arguments],
                                capture_output=True, text=True, timeout=LIMIT_S)
    finally:
        worker.kill()
    print(result.stdout, result.stderr, sep="")
    if result.returncode != 0:
        return f"{example} exited {result.returncode}"
    if "--async" in arguments:
        if len(re.findall(r"^\[seed \d\] .+", result.stdout, re.MULTILINE)) != 4:
            return "not four streams' texts"
    elif not re.search(r"^\[max_tokens: \d+ prompt tokens, 32 generated\]$", result.stdout, re.MULTILINE):
        return "no finish line with 32 tokens"
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
