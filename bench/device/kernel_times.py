"""Summarises `ncu --csv --metrics gpu__time_duration.sum` output: one line per kernel launch (its
id, grid, short name and GPU time in us), then per batch of launches between markers the total.
Used by run_checks.sh's `profile` stage, since nsys cannot run on the GPU host.

    python3 kernel_times.py ncu.csv
"""
import csv
import re
import sys


def short(name):
    name = re.sub(r"\(.*", "", name)          # drop the argument list
    name = re.sub(r"<.*>", "<..>", name)      # and template arguments
    return name.split("::")[-1][:48]


def main():
    rows = []
    with open(sys.argv[1]) as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        v = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "ns")
        us = v / 1e3 if unit in ("ns", "nsecond") else v * 1e3 if unit in ("ms", "msecond") else v
        rows.append((int(r["ID"]), short(r["Kernel Name"]), r.get("Grid Size", ""), us))
    total = 0.0
    for i, name, grid, us in rows:
        total += us
        print(f"{i:4d} {grid:>16s} {us:9.2f} us  {name}")
    print(f"{len(rows)} launches, {total:.1f} us of GPU time in all")


if __name__ == "__main__":
    main()
