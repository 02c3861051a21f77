"""Decode over gRPC on loopback (issue 12's target: a 32-block span at batch 1 >= 85% of the same
span in process): creates `--blocks` frozen bf16 Llama-3-8B-shaped blocks on a running daemon
(seeded weights), opens a session, prefills a `--prompt`-token random input, then decodes `--new`
tokens one at a time on the Infer stream (bf16 on the wire), timing each step from the request
to the response as a client sees it; prints the median step and ms per layer per step as
bench_decode prints them, and, with --in_process_ms (bench_decode's ms/layer/step for the same
span), the share of in-process speed. Blocks and session are removed at the end.

    python3 bench/session_grpc.py --target 127.0.0.1:50051 [--blocks 32] [--prompt 512] [--new 64]
                                  [--batch 1] [--in_process_ms X] [--metrics http://127.0.0.1:9090/metrics]

With --metrics (the daemon's Prometheus endpoint), the engine's own time per decode step
(blockd_session_step_seconds, read before and after the decode steps) splits the client's step
into the engine's part and the rest (the client library, gRPC, the service's handling).
"""
import argparse
import re
import statistics
import time
import urllib.request

import numpy as np

import blockd


def engine_seconds(url):
    """(sum, count) of blockd_session_step_seconds over every batch-size label."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    total = count = 0.0
    for name, value in re.findall(r"^blockd_session_step_seconds_(sum|count)\{[^}]*\} (\S+)$", text, re.M):
        if name == "sum":
            total += float(value)
        else:
            count += float(value)
    return total, count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--in_process_ms", type=float, default=0.0)
    ap.add_argument("--metrics", default="")
    a = ap.parse_args()
    cfg = blockd.BlockConfig(hidden_size=4096, num_attention_heads=32, num_kv_heads=8, head_dim=128,
                             intermediate_size=14336, rms_norm_eps=1e-5, rope_theta=500000.0)
    client = blockd.Client(a.target)
    ids = [f"grpc-decode-{i}" for i in range(a.blocks)]
    t0 = time.perf_counter()
    for i, b in enumerate(ids):
        client.create_block(b, cfg, layer_index=i, seed=1234 + i, precision="bf16", frozen=True,
                            max_seq_len=a.prompt + a.new, max_batch_size=a.batch)
    print(f"created {a.blocks} frozen bf16 blocks in {time.perf_counter() - t0:.1f} s", flush=True)
    rng = np.random.default_rng(7)
    session = client.open_session(ids, a.batch, a.prompt + a.new).session_id
    times = []
    try:
        with client.infer_stream() as stream:
            x = rng.standard_normal((a.batch, a.prompt, 4096), dtype=np.float32)
            t0 = time.perf_counter()
            stream.step(session, x, dtype="bf16")
            prefill = time.perf_counter() - t0
            before = engine_seconds(a.metrics) if a.metrics else None
            for _ in range(a.new):
                x = rng.standard_normal((a.batch, 1, 4096), dtype=np.float32)
                t0 = time.perf_counter()
                out = stream.step(session, x, dtype="bf16")
                times.append(time.perf_counter() - t0)
                assert np.isfinite(out.hidden_states).all()
            after = engine_seconds(a.metrics) if a.metrics else None
    finally:
        client.close_session(session)
        for b in ids:
            client.delete_block(b)
    med = statistics.median(times)
    per_layer = med * 1e3 / a.blocks
    share = f", {100 * a.in_process_ms / per_layer:.1f}% of in process ({a.in_process_ms:.4f})" \
        if a.in_process_ms > 0 else ""
    print(f"grpc decode  batch {a.batch:3d}  {a.blocks} layers  prompt {a.prompt}  new {a.new}: "
          f"{per_layer:.4f} ms/layer/step (median step {med * 1e3:.3f} ms, {a.batch / med:.0f} tokens/s){share}  "
          f"prefill {prefill * 1e3:.1f} ms (first call)", flush=True)
    if after is not None and after[1] > before[1]:
        engine = (after[0] - before[0]) / (after[1] - before[1])
        mean = statistics.mean(times)
        print(f"  per decode step (means): client {mean * 1e3:.3f} ms, of which the engine {engine * 1e3:.3f} ms "
              f"({engine * 1e3 / a.blocks:.4f} ms/layer) and the client library, gRPC and service "
              f"{(mean - engine) * 1e3:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
