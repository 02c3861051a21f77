# Probe: a second process with a CUDA context on the same GPU, as a same-host CUDA IPC client has
# one beside the daemon. Does its mere presence, or what it submits between the daemon's calls,
# slow the step in the other process (GPU time-slicing between contexts, clocks under the power
# cap)? Prints "ready" once its context exists, then works until killed:
#   idle:   nothing after the context is made;
#   events: an event recorded on its own stream and waited for every --period_ms (the in-place
#           client records one per micro-batch);
#   copies: a --mib MiB device-to-device copy, then the wait, every --period_ms (the copying
#           client's puts and gets).
#   python3 bench/probe/second_context.py --mode events --period_ms 15
import argparse, sys, time
import torch

p = argparse.ArgumentParser()
p.add_argument("--mode", choices=["idle", "events", "copies"], required=True)
p.add_argument("--period_ms", type=float, default=15.0)
p.add_argument("--mib", type=int, default=32)
a = p.parse_args()
stream = torch.cuda.Stream()
src = torch.empty(a.mib << 20, dtype=torch.uint8, device="cuda")
dst = torch.empty_like(src)
torch.cuda.synchronize()
print("ready", flush=True)
n = 0
while True:
    if a.mode != "idle":
        with torch.cuda.stream(stream):
            if a.mode == "copies":
                dst.copy_(src)
            e = torch.cuda.Event()
            e.record(stream)
        e.synchronize()
        n += 1
    time.sleep(a.period_ms / 1e3)
    if n and n % 2000 == 0:
        print(f"{n} rounds", file=sys.stderr, flush=True)
