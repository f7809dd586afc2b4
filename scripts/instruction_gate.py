#!/usr/bin/env python3
"""The instruction-count gate: counts each workload of bench/instruction_gate
under callgrind and fails one that grew more than 3% over the baseline.

Instructions, not time: a count is the same from run to run on any machine
with the same compiler and libraries, so a 3% growth is a change in the code,
never noise. A workload that grew prints the functions whose own counts grew
most against the per-function counts kept in the baseline.

  scripts/instruction_gate.py [--build build-release] [--results FILE]
  scripts/instruction_gate.py --update   # rewrite bench/instruction_baseline.json

--update is for a deliberate commit that says why the counts moved. With
--results, each workload is written as one test case, in the JSON lines of
meson's testlog.json (name, result, stdout), for scripts/summarize_tests.py.
The exit code is non-zero when any workload failed.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = os.path.join(ROOT, "bench", "instruction_baseline.json")
TOLERANCE = 0.03
# Functions kept per workload in the baseline: those with at least this
# share of its count (the rest are too small to be where 3% went).
KEPT_SHARE = 0.002
SHOWN_GROWERS = 8

# What callgrind counts for each workload. Most bracket their own work with
# CALLGRIND_TOGGLE_COLLECT; the relay's work is inside the router, counted
# from the router's per-frame entry (bench/instruction_gate.cpp says why).
TOGGLES = {
    "relay": ["--toggle-collect=fmwire::router::WorkerLink::on_stream_frame*"],
}

ANNOTATE_LINE = re.compile(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.*?)(?: \[[^\]]*\])?$")


def build_identity(build):
    """The compiler and build type the counts are measured with."""
    with open(os.path.join(build, "meson-info", "intro-buildoptions.json"), encoding="utf-8") as options:
        values = {option["name"]: option["value"] for option in json.load(options)}
    compiler = "unknown"
    with open(os.path.join(build, "meson-info", "intro-targets.json"), encoding="utf-8") as targets:
        for target in json.load(targets):
            if target["name"] == "instruction_gate":
                command = [part for part in target["target_sources"][0]["compiler"] if part != "ccache"]
                version = subprocess.run(command + ["--version"], capture_output=True, text=True, check=False)
                compiler = version.stdout.splitlines()[0] if version.stdout else " ".join(command)
    valgrind = subprocess.run(["valgrind", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return {"compiler": compiler, "build_type": values.get("buildtype", "?"),
            "b_sanitize": values.get("b_sanitize", "none"), "valgrind": valgrind}


def count(program, workload, scratch):
    """Runs one workload under callgrind: its total and each function's own count."""
    out = os.path.join(scratch, f"callgrind.{workload}")
    command = ["valgrind", "--tool=callgrind", "--collect-atstart=no", f"--callgrind-out-file={out}",
               *TOGGLES.get(workload, []), program, workload]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"{workload} exited {run.returncode} under callgrind:\n{run.stderr[-2000:]}")
    total = None
    with open(out, encoding="utf-8", errors="replace") as data:
        for line in data:
            if line.startswith("totals:") or (total is None and line.startswith("summary:")):
                total = int(line.split()[1])
    if not total:
        raise RuntimeError(f"{workload}: callgrind counted nothing (is the toggle's function name still right?)")
    annotate = subprocess.run(["callgrind_annotate", "--threshold=100", out], capture_output=True, text=True,
                              check=True).stdout
    functions = {}
    in_functions = False
    for line in annotate.splitlines():
        if line.rstrip().endswith("file:function"):
            in_functions = True
            continue
        match = ANNOTATE_LINE.match(line) if in_functions else None
        if match:
            # "file:function": the file is "???" without debug information.
            name = match.group(2).split(":", 1)[1] if ":" in match.group(2) else match.group(2)
            functions[name] = functions.get(name, 0) + int(match.group(1).replace(",", ""))
    return total, functions


def growers(functions, baseline_functions, baseline_total):
    """The functions whose own counts grew most, largest first. One the
    baseline did not keep counts only when it would be kept now: below that
    its whole count may be what it always was."""
    changes = []
    for name in set(functions) | set(baseline_functions):
        grown = functions.get(name, 0) - baseline_functions.get(name, 0)
        if name not in baseline_functions and functions[name] < baseline_total * KEPT_SHARE:
            continue
        if grown > 0:
            changes.append((grown, name))
    changes.sort(reverse=True)
    lines = []
    for grown, name in changes[:SHOWN_GROWERS]:
        before = baseline_functions.get(name)
        was = f"{before:,}" if before is not None else "not in the baseline's list"
        lines.append(f"      +{grown:,}  {name}  (now {functions.get(name, 0):,}, was {was})")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default=os.path.join(ROOT, "build-release"),
                        help="the release build whose bench/instruction_gate is counted")
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--update", action="store_true", help="rewrite the baseline with these counts")
    parser.add_argument("--results", help="write each workload as a test case (testlog JSON lines) here")
    arguments = parser.parse_args()

    program = os.path.join(arguments.build, "bench", "instruction_gate")
    results = []

    def finish(code):
        if arguments.results:
            with open(arguments.results, "w", encoding="utf-8") as out:
                for name, ok, text in results:
                    out.write(json.dumps({"name": f"instruction gate {name}", "result": "OK" if ok else "FAIL",
                                          "stdout": text}) + "\n")
        return code

    for tool in ("valgrind", "callgrind_annotate"):
        if shutil.which(tool) is None:
            print(f"instruction gate: {tool} not found (scripts/setup.sh installs valgrind)")
            results.append(("setup", False, f"{tool} not found"))
            return finish(1)
    if not os.access(program, os.X_OK):
        print(f"instruction gate: no {program} (built only when valgrind's header is found)")
        results.append(("setup", False, f"no {program}"))
        return finish(1)

    identity = build_identity(arguments.build)
    workloads = subprocess.run([program, "--list"], capture_output=True, text=True, check=True).stdout.split()
    baseline = {}
    if os.path.exists(arguments.baseline):
        with open(arguments.baseline, encoding="utf-8") as data:
            baseline = json.load(data)
    if not arguments.update:
        measured_with = {key: baseline.get(key) for key in identity}
        if measured_with != identity:
            print(f"instruction gate: the baseline was measured with {measured_with}, this build is {identity}: "
                  "counts may differ by the compiler's doing, not the code's")

    counted = {}
    failed = False
    with tempfile.TemporaryDirectory(prefix="fmwire-callgrind-") as scratch:
        for workload in workloads:
            try:
                total, functions = count(program, workload, scratch)
            except (RuntimeError, subprocess.SubprocessError) as error:
                print(f"FAILED {workload}: {error}")
                results.append((workload, False, str(error)))
                failed = True
                continue
            counted[workload] = (total, functions)
            before = baseline.get("workloads", {}).get(workload)
            if arguments.update:
                print(f"  {workload:<10} {total:>13,} instructions")
                continue
            if before is None:
                text = f"{workload}: {total:,} instructions; not in the baseline (run with --update)"
                print(f"FAILED {text}")
                results.append((workload, False, text))
                failed = True
                continue
            change = (total - before["instructions"]) / before["instructions"]
            text = f"{workload:<10} {total:>13,} instructions, baseline {before['instructions']:>13,} ({change:+.2%})"
            if change > TOLERANCE:
                lines = [f"FAILED {text}: more than {TOLERANCE:.0%} over the baseline; grew most:"]
                lines += growers(functions, before.get("functions", {}), before["instructions"])
                text = "\n".join(lines)
                failed = True
                print(text)
                results.append((workload, False, text))
            else:
                print(f"  {text}")
                results.append((workload, True, text))

    if arguments.update:
        if failed:
            print("instruction gate: baseline not written: a workload failed")
            return finish(1)
        entries = {}
        for workload, (total, functions) in counted.items():
            kept = {name: value for name, value in sorted(functions.items(), key=lambda item: -item[1])
                    if value >= total * KEPT_SHARE}
            entries[workload] = {"instructions": total, "functions": kept}
        with open(arguments.baseline, "w", encoding="utf-8") as out:
            json.dump({**identity, "workloads": entries}, out, indent=2)
            out.write("\n")
        print(f"instruction gate: wrote {os.path.relpath(arguments.baseline, ROOT)}")
    return finish(1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
