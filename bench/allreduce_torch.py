"""torch.distributed's NCCL all-reduce (AVG, fp32) over every visible GPU, one process per GPU, at
the sizes bench_allreduce measures: the baseline for the NCCL provider's bus bandwidth (issue 15).
Prints the same columns. Keeps NVLink multicast off (NCCL_NVLS_ENABLE=0) as the GPU hosts require.
    python3 bench/allreduce_torch.py [--max_mb 1024] [--iters 20]
"""
import argparse
import os
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def worker(rank, world, port, max_mb, iters, queue):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    buf = torch.zeros((max_mb << 20) // 4, dtype=torch.float32, device="cuda")
    size = 1 << 20
    while size <= max_mb << 20:
        x = buf[: size // 4]
        for _ in range(3):
            dist.all_reduce(x, op=dist.ReduceOp.AVG)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x, op=dist.ReduceOp.AVG)
            torch.cuda.synchronize()  # as the provider does: each call waited for
        t = (time.perf_counter() - t0) / iters
        times = torch.tensor([t], device="cuda")
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        if rank == 0:
            queue.put((size, times.item()))
        size *= 4
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--max_mb", type=int, default=1024)
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args()
    world = torch.cuda.device_count()
    print(f"# torch {torch.__version__}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, "
          f"{world} GPU(s), torch.distributed all_reduce (AVG, fp32)")
    print(f"{'bytes':<10} {'time_us':<12} {'algbw_GB/s':<12} busbw_GB/s")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, 29500 + os.getpid() % 1000, a.max_mb, a.iters, queue))
             for r in range(world)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join()
    while not queue.empty():
        size, t = queue.get()
        algbw = size / t / 1e9
        print(f"{size:<10} {t * 1e6:<12.1f} {algbw:<12.2f} {algbw * 2 * (world - 1) / world:.2f}")
    return 0 if all(pr.exitcode == 0 for pr in procs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
