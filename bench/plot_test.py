#!/usr/bin/python3
"""scripts/plot.py on what two quick bench runs write: every chart it
names exists, is SVG, and shows the rows it was given; a file that is not
a results file is refused with exit 2.

    plot_test.py PLOT_SCRIPT BENCH_TRANSPORT BENCH_CODEC
"""
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree

SKIPPED = 77


def texts(svg_path):
    tree = ElementTree.parse(svg_path)  # raises on anything that is not XML
    root = tree.getroot()
    if not root.tag.endswith("svg"):
        raise AssertionError(f"{svg_path}: root element {root.tag}, not svg")
    return " ".join(text for element in root.iter() for text in [element.text] if text)


def main():
    plot, bench_transport, bench_codec = sys.argv[1:4]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("skipped: no matplotlib for this python3 (scripts/setup.sh installs python3-matplotlib)")
        return SKIPPED
    with tempfile.TemporaryDirectory() as directory:
        transport = os.path.join(directory, "transport.json")
        codec = os.path.join(directory, "codec.json")
        for command in ([bench_transport, "--quick", "--only", "latency", "--json", transport],
                        [bench_codec, "--quick", "--json", codec]):
            run = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if run.returncode != 0:
                print(f"FAILED: {command[0]} exit {run.returncode}: {run.stderr[-600:]}")
                return 1
        charts = os.path.join(directory, "charts")
        run = subprocess.run([sys.executable, plot, "--out", charts, transport, codec], capture_output=True, text=True,
                             timeout=120)
        if run.returncode != 0:
            print(f"FAILED: plot exit {run.returncode}: {run.stderr[-600:]}")
            return 1
        written = run.stdout.split()
        expected = {"transport-ratios.svg", "transport-latency.svg", "codec-ratios.svg"}
        names = {os.path.basename(path) for path in written}
        if not expected <= names:
            print(f"FAILED: plot wrote {sorted(names)}, want at least {sorted(expected)}")
            return 1
        for name, results in (("transport-ratios.svg", transport), ("codec-ratios.svg", codec)):
            shown = texts(os.path.join(charts, name))
            rows = json.load(open(results))["results"]
            missing = [row["name"] for row in rows
                       if row.get("peer") and row.get("ratio", 0) > 0 and f"{row['name']} (vs {row['peer']})" not in shown]
            if missing:
                print(f"FAILED: {name} leaves out rows {missing}")
                return 1
        latency = texts(os.path.join(charts, "transport-latency.svg"))
        for label in ("latency_uring_p*: fmwire", "latency_uring_p*: grpc", "percentile"):
            if label not in latency:
                print(f"FAILED: transport-latency.svg has no {label!r}")
                return 1
        print(f"ok: {len(written)} charts: {', '.join(sorted(names))}")

        # Not a results file: refused, with the reason.
        bad = os.path.join(directory, "bad.json")
        with open(bad, "w") as file:
            json.dump({"rows": []}, file)
        run = subprocess.run([sys.executable, plot, "--out", charts, bad], capture_output=True, text=True, timeout=60)
        if run.returncode != 2 or "not a results file" not in run.stderr:
            print(f"FAILED: a bad file gave exit {run.returncode}, stderr {run.stderr!r}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
