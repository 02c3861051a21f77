#!/usr/bin/python3
"""Generate text from the tiny byte-level LM of train_tiny_lm.py with blockd's KV cache.

It trains the model of train_tiny_lm.py (local embedding, norm and head; 4 decoder layers as one
RemoteSpan on blockd) for --steps steps, then generates --new-tokens bytes twice from the same
prompt with blockd.RemoteCausalLM: with inference sessions (the prompt is one step, then one step
per byte, the keys and values cached on the server) and by full recompute (Forward of the whole
sequence for every byte), and prints both texts and their tokens/s.

    blockd --listen=127.0.0.1:50051 &
    PYTHONPATH=build/python /usr/bin/python3 examples/generate.py --target 127.0.0.1:50051 --steps 300

The generation itself is three lines:

    lm = blockd.RemoteCausalLM(model.embed, [span], model.norm, model.head)
    ids = lm.generate(prompt_ids, max_new_tokens=200)                   # KV-cache sessions
    ids = lm.generate(prompt_ids, max_new_tokens=200, use_cache=False)  # full recompute
"""
import argparse
import os
import sys
import time

import torch

import blockd

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import train_tiny_lm as tiny  # noqa: E402  (the model, the data and the training step)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tiny.add_training_args(p)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the blocks, the local modules and the batches")
    p.add_argument("--data", default=os.path.join(HERE, "data", "coriolanus.txt"), help="text to train on")
    p.add_argument("--prompt", default="MENENIUS:\n", help="start of the generated text")
    p.add_argument("--new-tokens", type=int, default=200, help="bytes to generate")
    p.add_argument("--sample", action="store_true", help="sample (--temperature, --top-k) instead of greedy")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest bytes")
    return p.parse_args(argv)


def timed_generate(lm, prompt, args, use_cache):
    """(new bytes, tokens/s) of one generation; a sampled one draws from a generator seeded alike."""
    start = time.monotonic()
    out = lm.generate(prompt, max_new_tokens=args.new_tokens, do_sample=args.sample, temperature=args.temperature,
                      top_k=args.top_k, generator=torch.Generator().manual_seed(args.seed), use_cache=use_cache)
    seconds = time.monotonic() - start
    new = out[0, prompt.shape[1]:]
    return bytes(new.tolist()), len(new) / seconds


def main(argv=None):
    args = parse_args(argv)
    connected = tiny.connect(args.target, args.token)
    if connected is None:
        return 1
    client, info = connected
    data = tiny.load_bytes(args.data)
    torch.manual_seed(args.seed)
    prompt = torch.tensor([list(args.prompt.encode())], dtype=torch.long)
    longest = max(args.seq, prompt.shape[1] + args.new_tokens)
    print(f"blockd {info.version} at {args.target}, backend {info.backend}")
    span = blockd.RemoteSpan.create(client, tiny.CONFIG, tiny.NUM_LAYERS, prefix=f"tiny-gen-{os.getpid()}/layer",
                                    seed=args.seed, max_seq_len=longest, max_batch_size=args.batch)
    try:
        model = tiny.TinyLM(span)
        remote_opt = blockd.RemoteAdamW(span, lr=args.lr)
        local_opt = torch.optim.AdamW(tiny.decay_groups(model, 0.1), lr=args.lr)
        batches = tiny.sample_batches(data, args.batch, args.seq, torch.Generator().manual_seed(args.seed))
        loss = float("nan")
        for step in range(args.steps):
            loss, _ = tiny.train_step(model, [remote_opt, local_opt], [], *next(batches))
            if (step + 1) % 50 == 0 or step + 1 == args.steps:
                print(f"train step {step + 1}/{args.steps}  loss {loss:.4f}")

        lm = blockd.RemoteCausalLM(model.embed, [span], model.norm, model.head)
        cached, cached_rate = timed_generate(lm, prompt, args, use_cache=True)
        full, full_rate = timed_generate(lm, prompt, args, use_cache=False)
        print(f"--- {'sampled' if args.sample else 'greedy'} with the KV cache (inference sessions) ---")
        print((args.prompt.encode() + cached).decode("utf-8", errors="replace"))
        print("--- tokens/s ---")
        print(f"KV cache (sessions): {cached_rate:8.1f} tokens/s")
        print(f"full recompute:      {full_rate:8.1f} tokens/s  (the cache is {cached_rate / full_rate:.1f}x faster)")
        print(f"same {len(cached)} bytes both ways: {'yes' if cached == full else 'no'}")
    finally:
        span.delete()
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
