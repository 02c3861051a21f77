"""Medians of the daemon's debug-log times of Infer steps (engine_sessions.cc, service_sessions.cc).

  python3 bench/device/step_times.py blockd.log [--blocks=32]

Reads the lines "Infer step of N blocks ...: upload U us, tables T us, launch L us, compute +
download C us" (a graph step: "check, tables, run"), "Session step of N blocks: found, checked and
batched in B us, committed in C us", "InferStep of session ...: input I us, engine E us, reply R
us" and "Infer stream step: waited for a pool thread Q us, ran X us, written in W us", and prints
each time's median
(the steps of a --blocks span only: a service or stream line is the step's whose engine line came
last, as one stream's steps run one at a time).
"""
import re
import statistics
import sys


def main():
    path = sys.argv[1]
    blocks = None
    for a in sys.argv[2:]:
        if a.startswith("--blocks="):
            blocks = int(a.split("=", 1)[1])
    series = {}
    number = re.compile(r"([a-z +]+?) (-?[0-9.e+-]+) us")
    last_blocks = None
    for line in open(path, errors="replace"):
        kind = None
        if "Infer step of " in line:
            m = re.search(r"Infer step of (\d+) blocks", line)
            last_blocks = int(m.group(1)) if m else None
            kind = "engine launch"
        elif "Session step of " in line:
            kind = "engine step"
        elif "InferStep of session" in line:
            kind = "service"
        elif "Infer stream step:" in line:
            kind = "stream"
        if kind is None or (blocks is not None and last_blocks != blocks):
            continue
        body = line.split(":", 1)[-1] if kind != "engine launch" else line.split("]:", 1)[-1]
        for name, value in number.findall(body.split(": ", 1)[-1] if kind == "engine launch" else body):
            series.setdefault((kind, name.strip(" ,")), []).append(float(value))
    for (kind, name), values in series.items():
        values = values[len(values) // 4:]  # past the prefill and warm-up
        print(f"STEP {kind:14s} {name:32s} median {statistics.median(values):9.1f} us over {len(values)} steps")


if __name__ == "__main__":
    main()
