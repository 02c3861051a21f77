"""Transport benchmark, the Python client's rows: bench_service's training step of a span (Forward
with keep_activations -> Backward -> Step, bf16 activations) from a PyTorch client whose
activations live on the daemon's GPU, through CUDA IPC (blockd --allow_shared_memory on the CUDA
backend), or (--transport=shared_memory) in host memory, through shared memory. bench_service
(C++) measures the other rows; run_checks.sh `transport` prints them together.

    python3 bench/transport_ipc.py --target=127.0.0.1:50051 [--blocks=8] [--iters=6] [--depth=1,3]
                                   [--transport=cuda_ipc|shared_memory|grpc]

Blocks are created as bench_service creates them (Qwen-like: hidden 1024, 16 heads, 8 kv heads,
head_dim 128, MLP 3072, QK-norm, bf16; batch 8 x 2048 tokens). Timing: 2 warm-up steps, then the
median over --iters; inputs rotated among 3 random sets made before timing. With --depth=N the
client keeps N micro-batches in flight (N threads, one Step after all N), as bench_service does; the
client takes one CUDA IPC region per call in flight.
"""
import argparse
import statistics
import threading
import time

import torch

import blockd


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--depth", default="1,3")
    p.add_argument("--transport", default="cuda_ipc")
    a = p.parse_args()
    B, S, d = 8, 2048, 1024
    cfg = blockd.BlockConfig(hidden_size=d, num_attention_heads=16, num_kv_heads=8, head_dim=128,
                             intermediate_size=3072, rms_norm_eps=1e-6, rope_theta=1e6, qk_norm=True)
    client = blockd.Client(a.target, timeout=300, transport=a.transport)
    ids = [f"ipc{b}" for b in range(a.blocks)]
    for b, block_id in enumerate(ids):
        client.create_block(block_id, cfg, layer_index=b, seed=100 + b, precision="bf16", max_seq_len=S,
                            max_batch_size=B)
    # CUDA tensors for CUDA IPC; host tensors for the other transports (shared_memory: a PyTorch
    # client on the daemon's host whose activations are in host memory).
    device = "cuda" if a.transport == "cuda_ipc" else "cpu"
    gen = torch.Generator(device=device).manual_seed(3)
    sets = [(torch.randn(B, S, d, device=device, generator=gen).to(torch.bfloat16),
             torch.randn(B, S, d, device=device, generator=gen).to(torch.bfloat16)) for _ in range(3)]
    errors = []

    def forward_backward(x, g):
        try:
            y, h = client.forward(ids, x, keep_activations=True)
            dx = client.backward(h, g)
            assert y.device == x.device and dx.device == x.device and dx.shape == x.shape
        except BaseException as e:  # noqa: B902 - raised again on the main thread
            errors.append(e)

    for depth in (int(v) for v in a.depth.split(",")):
        times, fb = [], []
        for it in range(a.iters + 2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            workers = [threading.Thread(target=forward_backward, args=sets[(it * depth + m) % 3])
                       for m in range(depth)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            if errors:
                raise errors[0]
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            client.step(ids, lr=1e-4, max_grad_norm=1.0)
            t2 = time.perf_counter()
            if it >= 2:
                times.append(t2 - t0)
                fb.append(t1 - t0)
        step = statistics.median(times)
        print(f"transport {a.transport} (Python client, {device} tensors) depth {depth}: step {step * 1e3:.2f} ms, "
              f"fwd+bwd {statistics.median(fb) * 1e3:.2f} ms, {depth * B * S / step:.0f} tokens/s", flush=True)
    for block_id in ids:
        client.delete_block(block_id)
    client.close()


if __name__ == "__main__":
    main()
