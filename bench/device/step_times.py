"""Medians of the daemon's debug-log times of Infer steps (engine_sessions.cc, service_sessions.cc).

  python3 bench/device/step_times.py blockd.log [--blocks=32] [--client=bench_session.log]

Reads the lines "Infer step of N blocks ...: upload U us, tables T us, launch L us, compute +
download C us" (a graph step: "check, tables, run"), "Session step of N blocks: found, checked and
batched in B us, committed in C us", "InferStep of session ...: input I us, engine E us, reply R
us" and "Infer stream step: waited for a pool thread Q us, ran X us, written in W us", and prints
each time's median (the steps of a --blocks span only: a service or stream line is the step's
whose engine line came last, as one stream's steps run one at a time).

With --client (the output of `bench_session --trace`: "TRACE <step> <sent> <answered>", unix us;
"TRACE-BUSY" lines for its busy-waiting client, split apart), each client step past the first 16
is matched with the stream line whose read falls between its send and its answer, and the step's
time seen by the client is split: "there" (the client's send to the daemon's OnReadDone),
"daemon" (OnReadDone to StartWrite) and "back" (StartWrite to the client's answer).
"""
import re
import statistics
import sys


def main():
    path = sys.argv[1]
    blocks, client = None, None
    for a in sys.argv[2:]:
        if a.startswith("--blocks="):
            blocks = int(a.split("=", 1)[1])
        if a.startswith("--client="):
            client = a.split("=", 1)[1]
    series = {}
    number = re.compile(r"([a-z +]+?) (-?[0-9.e+-]+) us")
    last_blocks = None
    with open(path, errors="replace") as f:
        lines = f.readlines()
    for line in lines:
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
    if client:
        split(lines, client)


def split(daemon_lines, client_log):
    """Medians of each client step's way there, time in the daemon and way back (see above), for
    each client of the log ("TRACE": SPLIT lines; "TRACE-BUSY": SPLIT-BUSY lines)."""
    stamps = re.compile(r"read at unix (\d+), written from unix (\d+)")
    served = [tuple(map(int, m.groups())) for m in map(stamps.search, daemon_lines) if m]
    clients, unmatched = {}, {}
    for line in open(client_log, errors="replace"):
        f = line.split()
        if len(f) != 4 or not f[0].startswith("TRACE") or int(f[1]) < 16:  # past the warm-up
            continue
        sent, answered = int(f[2]), int(f[3])
        match = [(r, w) for r, w in served if sent <= r <= w <= answered]
        if len(match) != 1:
            unmatched[f[0]] = unmatched.get(f[0], 0) + 1
            continue
        r, w = match[0]
        parts = clients.setdefault(f[0].replace("TRACE", "SPLIT"), {"there": [], "daemon": [], "back": []})
        parts["there"].append(r - sent)
        parts["daemon"].append(w - r)
        parts["back"].append(answered - w)
    for label, parts in clients.items():
        for name, values in parts.items():
            print(f"{label} {name:8s} median {statistics.median(values):9.1f} us, min {min(values):7.1f} over "
                  f"{len(values)} steps")
    for label, n in unmatched.items():
        print(f"{label}: {n} steps matched no single daemon line, left out")


if __name__ == "__main__":
    main()
