#!/usr/bin/python3
"""Turns benchmark result files (bench_* --json FILE, fmwire's results
format: {"bench": NAME, "results": [{"name", "value", "unit", "peer",
"peer_value", "ratio"}...]}) into SVG charts:

  NAME-ratios.svg      every row that has a peer: ours against the peer
                       (> 1: fmwire better), on a log scale
  NAME-latency.svg     rows of percentiles (p50, p99, ...) in us: each
                       series' percentiles against the peer's, as a CDF
  NAME-cpu.svg         rows of CPU cost: ours and the peer's side by side
  kv-throughput.svg    bench_kv: GB/s against the link (loopback, 10 and
                       1 Gbit/s) for fmwire's wire and session rows,
                       iperf3 and gRPC

    scripts/plot.py [--out DIR] RESULTS.json...

Debian's python3-matplotlib (scripts/setup.sh installs it). Text stays
text in the SVGs (searchable, and what the test reads back).
"""
import argparse
import json
import math
import os
import re
import sys

import matplotlib

matplotlib.use("svg")
matplotlib.rcParams["svg.fonttype"] = "none"
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

# p50, p99.9: alone or after "_" (latency_uring_p99), not inside a word.
PERCENTILE = re.compile(r"(?<![A-Za-z0-9])p(\d+(?:\.\d+)?)(?![A-Za-z0-9])")
CPU_UNITS = ("cpu", "CPU")


def load(path):
    with open(path) as file:
        data = json.load(file)
    if not isinstance(data, dict) or "bench" not in data or not isinstance(data.get("results"), list):
        raise ValueError(f"{path}: not a results file (want {{\"bench\": NAME, \"results\": [...]}})")
    for index, row in enumerate(data["results"]):
        for field in ("name", "value", "unit"):
            if field not in row:
                raise ValueError(f"{path}: result {index} has no {field!r}")
    return data


def has_peer(row):
    return bool(row.get("peer")) and row.get("peer_value", 0) > 0 and row.get("ratio", 0) > 0


def save(figure, directory, name):
    path = os.path.join(directory, name)
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_ratios(bench, rows, directory):
    rows = [row for row in rows if has_peer(row)]
    if not rows:
        return None
    figure, axes = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.2))
    labels = [f"{row['name']} (vs {row['peer']})" for row in rows]
    ratios = [row["ratio"] for row in rows]
    colours = ["tab:green" if ratio >= 1 else "tab:red" for ratio in ratios]
    axes.barh(range(len(rows)), ratios, color=colours)
    axes.set_yticks(range(len(rows)), labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_xlabel("ratio, fmwire against the peer (> 1: fmwire better)")
    axes.set_title(f"bench_{bench}: ratios against peers measured in the same run")
    return save(figure, directory, f"{bench}-ratios.svg")


def plot_latency(bench, rows, directory):
    # Series: the row's name with its percentile taken out, in us.
    series = {}
    for row in rows:
        match = PERCENTILE.search(row["name"])
        if not match or row["unit"] != "us":
            continue
        key = PERCENTILE.sub("p*", row["name"])
        series.setdefault(key, []).append((float(match.group(1)), row))
    series = {key: sorted(points, key=lambda point: point[0]) for key, points in series.items()}
    if not series:
        return None
    figure, axes = plt.subplots(figsize=(9, 5))
    for index, (key, points) in enumerate(sorted(series.items())):
        colour = f"C{index % 10}"
        percentiles = [point[0] for point in points]
        axes.plot([point[1]["value"] for point in points], percentiles, color=colour, marker="o",
                  label=f"{key}: fmwire")
        peers = [point for point in points if has_peer(point[1])]
        if peers:
            axes.plot([point[1]["peer_value"] for point in peers], [point[0] for point in peers], color=colour,
                      marker="x", linestyle="--", label=f"{key}: {peers[0][1]['peer']}")
    axes.set_xscale("log")
    axes.set_xlabel("latency, us (log)")
    axes.set_ylabel("percentile")
    axes.set_title(f"bench_{bench}: latency percentiles, fmwire (solid) against peers (dashed)")
    axes.legend(fontsize=7, loc="lower right")
    return save(figure, directory, f"{bench}-latency.svg")


def plot_cpu(bench, rows, directory):
    rows = [row for row in rows if any(unit in row["unit"] or unit in row["name"] for unit in CPU_UNITS)
            and row["value"] > 0]
    if not rows:
        return None
    figure, axes = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.2))
    positions = range(len(rows))
    axes.barh([p - 0.2 for p in positions], [row["value"] for row in rows], height=0.4, label="fmwire",
              color="tab:blue")
    axes.barh([p + 0.2 for p in positions], [row.get("peer_value", 0) if has_peer(row) else 0 for row in rows],
              height=0.4, label="peer", color="tab:grey")
    axes.set_yticks(list(positions), [f"{row['name']} [{row['unit']}]" + (f" (vs {row['peer']})" if has_peer(row) else "")
                                      for row in rows], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("CPU cost, in each row's unit (less is better)")
    axes.set_title(f"bench_{bench}: CPU against peers")
    axes.legend(fontsize=8)
    return save(figure, directory, f"{bench}-cpu.svg")


KV_ROW = re.compile(r"^kv (session )?(\d+) tokens (loopback|netns 10G|netns 1G) GB/s$")
KV_GRPC_ROW = re.compile(r"^kv (\d+) tokens (loopback|netns 10G|netns 1G) vs grpc GB/s$")
LINK_ORDER = ["netns 1G", "netns 10G", "loopback"]


def plot_kv_throughput(rows, directory):
    cells = {}  # (tokens, link) -> {side: GB/s}
    for row in rows:
        match = KV_ROW.match(row["name"])
        if match:
            session, tokens, link = match.groups()
            cell = cells.setdefault((int(tokens), link), {})
            cell["fmwire session" if session else "fmwire wire"] = row["value"]
            if has_peer(row):
                cell[row["peer"]] = row["peer_value"]
        match = KV_GRPC_ROW.match(row["name"])
        if match and has_peer(row):
            cells.setdefault((int(match.group(1)), match.group(2)), {})["grpc"] = row["peer_value"]
    if not cells:
        return None
    sides = ["fmwire wire", "fmwire session", "iperf3", "grpc"]
    prompts = sorted({tokens for tokens, _ in cells})
    figure, all_axes = plt.subplots(1, len(prompts), figsize=(6 * len(prompts), 4.5), squeeze=False)
    for axes, tokens in zip(all_axes[0], prompts):
        links = [link for link in LINK_ORDER if (tokens, link) in cells]
        width = 0.8 / len(sides)
        for index, side in enumerate(sides):
            values = [cells[(tokens, link)].get(side, 0) for link in links]
            axes.bar([i + (index - 1.5) * width for i in range(len(links))], values, width=width, label=side)
        axes.set_xticks(range(len(links)), links)
        axes.set_yscale("log")
        axes.set_ylabel("GB/s (log)")
        axes.set_title(f"KV of a {tokens}-token prompt")
        axes.legend(fontsize=8)
    figure.suptitle("bench_kv: KV transfer throughput against the link")
    return save(figure, directory, "kv-throughput.svg")


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".", help="directory for the SVG files (made if missing)")
    parser.add_argument("results", nargs="+", help="result files written by a bench's --json")
    arguments = parser.parse_args(argv)
    os.makedirs(arguments.out, exist_ok=True)
    written = []
    for path in arguments.results:
        try:
            data = load(path)
        except (OSError, ValueError) as error:
            print(f"plot: {error}", file=sys.stderr)
            return 2
        bench, rows = data["bench"], data["results"]
        rows = [row for row in rows if isinstance(row["value"], (int, float)) and math.isfinite(row["value"])]
        charts = [plot_ratios(bench, rows, arguments.out), plot_latency(bench, rows, arguments.out),
                  plot_cpu(bench, rows, arguments.out)]
        if bench == "kv":
            charts.append(plot_kv_throughput(rows, arguments.out))
        made = [chart for chart in charts if chart]
        if not made:
            print(f"plot: {path}: no row to chart (bench_{bench}, {len(rows)} rows)", file=sys.stderr)
        written += made
    for path in written:
        print(path)
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
