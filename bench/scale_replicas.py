"""Replica scaling: tokens/s of a training step (Forward with keep_activations, Backward, group
Step) of one span of blocks replicated over 1, 2, 4, ... daemons, each replica fed its own batch
(weak scaling, as DDP is used). The figures issues 13 and 15 ask for: two replicas' tokens/s over
one replica's, eight's over one's.

    python3 bench/scale_replicas.py --targets=127.0.0.1:51000,127.0.0.1:51001 [--replicas=1,2]
        [--blocks=8] [--batch=8] [--seq=2048] [--iters=6] [--config=qwen|tiny] [--place=gpu|cpu]
        [--collective=nccl|gloo|] [--transport=auto|grpc|shared_memory|cuda_ipc] [--overlap=off,on]

The daemons run with --collective_host and (for --place=gpu) --allow_shared_memory; run_checks.sh
`scale` starts one per GPU. --place=gpu puts replica r's blocks on device r and its activations in
CUDA tensors on cuda:r, which reach the daemon by CUDA IPC where it allows (--transport=cuda_ipc
insists on it); --place=cpu keeps blocks on device 0 and activations in host
memory (the CPU backend; CI runs it small). Each replica's Forward and Backward run on its own
thread, then one group Step (mean all-reduce, global clip, AdamW) on every member at once.
--overlap: "off" averages the gradients at the Step; "on" names the group in each Backward, so
each block's gradients are averaged while the earlier blocks' backward runs (on NCCL, beside it
on the GPU) and the Step reduces nothing again. Both by default, each with its own table.

Blocks are Qwen-like as in bench_service (hidden 1024, 16 heads, 8 kv heads, head_dim 128, MLP
3072, QK-norm, bf16) or, with --config=tiny, 32 wide in fp32. Timing: 2 warm-up steps, then the
median over --iters. After the timed steps every replica's weights are checked bitwise equal, so a
figure always comes from a group that really stayed in step. The table is printed last.
"""
import argparse
import statistics
import sys
import time
from concurrent import futures

import torch

import blockd

CONFIGS = {
    "qwen": (blockd.BlockConfig(hidden_size=1024, num_attention_heads=16, num_kv_heads=8, head_dim=128,
                                intermediate_size=3072, rms_norm_eps=1e-6, rope_theta=1e6, qk_norm=True), "bf16"),
    "tiny": (blockd.BlockConfig(hidden_size=32, num_attention_heads=4, num_kv_heads=2, head_dim=8,
                                intermediate_size=48, rms_norm_eps=1e-6, rope_theta=10000.0, qk_norm=True), "fp32"),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", required=True, help="daemons, comma-separated; replica r runs on the r-th")
    p.add_argument("--replicas", default="", help="group sizes to measure, e.g. 1,2,4,8 (default: 1, 2, 4, ... up to "
                                                  "the number of targets)")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="rows per replica")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--config", choices=sorted(CONFIGS), default="qwen")
    p.add_argument("--place", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--transport", default="auto", help="the client's transport: auto (CUDA IPC for CUDA tensors where "
                                                       "the daemon allows, else shared memory, else gRPC), grpc, "
                                                       "shared_memory or cuda_ipc")
    p.add_argument("--collective", default="", help="GetCollectiveId's backend ('' lets rank 0's daemon choose)")
    p.add_argument("--timeout_ms", type=int, default=120000, help="the group's collective timeout")
    p.add_argument("--overlap", default="off,on", help="off, on, or both: average at the Step or during the Backward")
    a = p.parse_args(argv)
    a.targets = [t for t in a.targets.split(",") if t]
    if a.replicas:
        a.replicas = [int(n) for n in a.replicas.split(",")]
    else:
        a.replicas = [n for n in (1, 2, 4, 8, 16) if n <= len(a.targets)]
    if not a.targets or max(a.replicas) > len(a.targets) or min(a.replicas) < 1:
        p.error(f"--replicas={a.replicas} needs that many --targets (given {len(a.targets)})")
    return a


class Replica:
    """One member: its client, its blocks and its inputs (made before timing)."""

    def __init__(self, rank, target, a, config, precision):
        self.rank = rank
        self.client = blockd.Client(target, timeout=600, transport=a.transport)
        self.device = rank if a.place == "gpu" else 0
        self.ids = [f"scale.b{i}" for i in range(a.blocks)]
        for i, block_id in enumerate(self.ids):
            # Every replica starts from different weights: the join must make them rank 0's.
            self.client.create_block(block_id, config, layer_index=i, seed=1000 * rank + i, precision=precision,
                                     device=self.device, max_seq_len=a.seq, max_batch_size=a.batch)
        where = f"cuda:{rank % max(1, torch.cuda.device_count())}" if a.place == "gpu" else "cpu"
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        gen = torch.Generator().manual_seed(7 + rank)
        d = config.hidden_size
        self.sets = [tuple(torch.randn(a.batch, a.seq, d, generator=gen).to(where, dtype) for _ in range(2))
                     for _ in range(2)]
        self.cuda = where if where.startswith("cuda") else None

    def forward_backward(self, it, group_id=""):
        x, g = self.sets[it % len(self.sets)]
        _, handle = self.client.forward(self.ids, x, keep_activations=True)
        dx = self.client.backward(handle, g, group_id=group_id)
        if self.cuda:
            torch.cuda.synchronize(self.cuda)
        assert dx.shape == x.shape

    def close(self):
        for block_id in self.ids:
            try:
                self.client.delete_block(block_id)
            except blockd.BlockdError:
                pass
        self.client.close()


def measure(a, n, config, precision, overlap):
    replicas = []
    try:
        for r in range(n):
            replicas.append(Replica(r, a.targets[r], a, config, precision))
        group = blockd.ReplicaGroup.form([p.client for p in replicas], f"scale{n}", replicas[0].ids,
                                         timeout_ms=a.timeout_ms, backend=a.collective)
        try:
            pool = futures.ThreadPoolExecutor(max_workers=n, thread_name_prefix="scale")
            steps, fbs = [], []
            for it in range(a.iters + 2):
                t0 = time.perf_counter()
                for f in [pool.submit(p.forward_backward, it, group.group_id if overlap else "") for p in replicas]:
                    f.result()
                t1 = time.perf_counter()
                results = group.step(lr=1e-4, max_grad_norm=1.0)
                t2 = time.perf_counter()
                assert not any(r.skipped for r in results), "a step was skipped: non-finite gradients"
                if it >= 2:
                    steps.append(t2 - t0)
                    fbs.append(t1 - t0)
            pool.shutdown()
            info = group.info()[0]
            # The replicas must have stayed in step: the first and last blocks, bitwise.
            for block_id in (replicas[0].ids[0], replicas[0].ids[-1]):
                want = replicas[0].client.download_tensors(block_id, as_torch=True)
                for p in replicas[1:]:
                    got = p.client.download_tensors(block_id, as_torch=True)
                    bad = [k for k in want if not torch.equal(want[k], got[k])]
                    assert not bad, f"replica {p.rank} differs from rank 0 in {block_id}: {bad}"
        finally:
            group.leave()
        return dict(replicas=n, overlap="on" if overlap else "off", backend=info.backend, transport=a.transport,
                    step=statistics.median(steps), fb=statistics.median(fbs),
                    tokens=n * a.batch * a.seq / statistics.median(steps))
    finally:
        for p in replicas:
            p.close()


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    config, precision = CONFIGS[a.config]
    modes = [m.strip() for m in a.overlap.split(",") if m.strip()]
    if not modes or any(m not in ("off", "on") for m in modes):
        raise SystemExit(f"--overlap={a.overlap}: expected off, on, or off,on")
    rows = []
    for mode in modes:
        for n in a.replicas:
            rows.append(measure(a, n, config, precision, mode == "on"))
            r = rows[-1]
            print(f"replicas {n} (overlap {mode}): step {r['step'] * 1e3:.2f} ms (forward+backward "
                  f"{r['fb'] * 1e3:.2f} ms), {r['tokens']:.0f} tokens/s, collective {r['backend']}, "
                  f"transport {r['transport']}", flush=True)
    for mode in modes:
        mine = [r for r in rows if r["overlap"] == mode]
        base = next((r["tokens"] for r in mine if r["replicas"] == 1), None)
        print(f"\n== replica scaling: {a.blocks} {a.config} blocks, {a.batch}x{a.seq} tokens per replica, "
              f"averaging {'during the Backward' if mode == 'on' else 'at the Step'} ==")
        print(f"{'replicas':>8} {'step ms':>9} {'fwd+bwd ms':>10} {'tokens/s':>12} {'vs 1':>6} {'efficiency':>10}")
        for r in mine:
            vs = r["tokens"] / base if base else float("nan")
            print(f"{r['replicas']:>8} {r['step'] * 1e3:>9.2f} {r['fb'] * 1e3:>10.2f} {r['tokens']:>12.0f} "
                  f"{vs:>6.2f} {vs / r['replicas']:>10.1%}")
    return rows


if __name__ == "__main__":
    main()
