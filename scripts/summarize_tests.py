#!/usr/bin/env python3
"""Counts test cases across meson test logs; prints 'N passed, N failed, N skipped'.

A doctest binary counts as the test cases its summary line reports (a case
skipped by its decorator, such as a CUDA case where no device is, counts as
skipped); any other meson test counts as one, a meson SKIP as one skipped. A
binary that failed without a summary (a crash, a sanitizer report at exit)
counts one more failure than its summary shows.
Extra results (steps outside meson) are given as NAME=EXIT_CODE, or as
NAME=FILE.json when the step writes one test case per line in the same JSON
lines as meson's testlog.json (name, result, stdout), as
scripts/instruction_gate.py does.
"""
import json
import re
import sys

DOCTEST = re.compile(
    r"\[doctest\] test cases:\s*(\d+)\s*\|\s*(\d+) passed\s*\|\s*(\d+) failed(?:\s*\|\s*(\d+) skipped)?")


def count_log(path, label):
    passed = failed = skipped = 0
    with open(path, encoding="utf-8", errors="replace") as log:
        for line in log:
            entry = json.loads(line)
            ok = entry["result"] in ("OK", "EXPECTEDFAIL")
            if entry["result"] == "SKIP":
                skipped += 1
                continue
            summary = DOCTEST.findall(entry.get("stdout") or "")
            if summary:
                total_passed = sum(int(p) for _, p, _, _ in summary)
                total_failed = sum(int(f) for _, _, f, _ in summary)
                skipped += sum(int(s or 0) for _, _, _, s in summary)
                if not ok and total_failed == 0:
                    total_failed = 1
            else:
                total_passed, total_failed = (1, 0) if ok else (0, 1)
            passed += total_passed
            failed += total_failed
            if not ok:
                print(f"FAILED [{label}] {entry['name']} ({entry['result']})")
                tail = (entry.get("stdout") or "").strip().splitlines()[-30:]
                for text in tail:
                    print(f"    {text}")
    return passed, failed, skipped


def main(arguments):
    passed = failed = skipped = 0
    for argument in arguments:
        label, _, value = argument.partition("=")
        if value.endswith(".json"):
            p, f, s = count_log(value, label)
        else:
            p, f, s = (1, 0, 0) if value == "0" else (0, 1, 0)
            if f:
                print(f"FAILED [{label}] exit code {value}")
        print(f"  {label}: {p} passed, {f} failed, {s} skipped")
        passed += p
        failed += f
        skipped += s
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
