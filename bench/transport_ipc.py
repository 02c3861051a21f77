"""Transport benchmark, the CUDA IPC row: bench_service's training step of a span (Forward with
keep_activations -> Backward -> Step, bf16 activations) from a PyTorch client whose activations
live on the daemon's GPU, through CUDA IPC (blockd --allow_shared_memory on the CUDA backend).
bench_service (C++) measures the other transports; run_checks.sh `transport` prints them together.

    python3 bench/transport_ipc.py --target=127.0.0.1:50051 [--blocks=8] [--iters=6] [--transport=cuda_ipc]

Blocks are created as bench_service creates them (Qwen-like: hidden 1024, 16 heads, 8 kv heads,
head_dim 128, MLP 3072, QK-norm, bf16; batch 8 x 2048 tokens). Timing: 2 warm-up steps, then the
median over --iters; inputs rotated among 3 random sets made before timing.
"""
import argparse
import statistics
import time

import torch

import blockd


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--iters", type=int, default=6)
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
    gen = torch.Generator(device="cuda").manual_seed(3)
    sets = [(torch.randn(B, S, d, device="cuda", generator=gen).to(torch.bfloat16),
             torch.randn(B, S, d, device="cuda", generator=gen).to(torch.bfloat16)) for _ in range(3)]
    times, fb = [], []
    for it in range(a.iters + 2):
        x, g = sets[it % 3]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        y, h = client.forward(ids, x, keep_activations=True)
        dx = client.backward(h, g)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        client.step(ids, lr=1e-4, max_grad_norm=1.0)
        t2 = time.perf_counter()
        assert y.is_cuda and dx.is_cuda and dx.shape == x.shape
        if it >= 2:
            times.append(t2 - t0)
            fb.append(t1 - t0)
    step = statistics.median(times)
    print(f"transport {a.transport} (Python client, CUDA tensors): step {step * 1e3:.2f} ms, "
          f"fwd+bwd {statistics.median(fb) * 1e3:.2f} ms, {B * S / step:.0f} tokens/s")
    for block_id in ids:
        client.delete_block(block_id)
    client.close()


if __name__ == "__main__":
    main()
