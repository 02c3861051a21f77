#!/usr/bin/python3
"""Train a tiny byte-level causal LM whose transformer blocks live on blockd.

The embedding, final RMSNorm and LM head are local PyTorch; the 4 Qwen3-style decoder layers
(hidden 128, GQA 4/2 heads, QK-norm) are one RemoteSpan on a blockd server, trained with
RemoteAdamW. It trains on examples/data/coriolanus.txt, prints a progress bar (or log lines), saves
a PNG of the loss curve and greedily samples some text at the end.

    blockd --listen=127.0.0.1:50051 &
    PYTHONPATH=build/python /usr/bin/python3 examples/train_tiny_lm.py --target 127.0.0.1:50051 --steps 300

The pieces the way in needs are five lines:

    span = blockd.RemoteSpan.create(client, config, num_blocks=4, seed=0)   # blocks on the server
    model = TinyLM(span)                                                     # local embed/norm/head
    opt = blockd.RemoteAdamW(span, lr=3e-3)                                  # Step/ZeroGrad remotely
    loss = lm_loss(model, x, y); loss.backward()                             # Forward/Backward
    opt.step(); opt.zero_grad()
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import blockd
from blockd.progress import Progress

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 256  # bytes
NUM_LAYERS = 4
CONFIG = blockd.BlockConfig(hidden_size=128, num_attention_heads=4, num_kv_heads=2, head_dim=32,
                            intermediate_size=384, rms_norm_eps=1e-6, rope_theta=10000.0, qk_norm=True)


class TinyLM(nn.Module):
    """Local embedding -> `blocks` (a RemoteSpan, or any module mapping [b, s, h] to [b, s, h]) ->
    local final RMSNorm -> local LM head."""

    def __init__(self, blocks, hidden=CONFIG.hidden_size, vocab=VOCAB, eps=CONFIG.rms_norm_eps):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = blocks
        self.norm = blockd.RMSNorm(hidden, eps)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens):
        return self.head(self.norm(self.blocks(self.embed(tokens))))


def decay_groups(model, weight_decay):
    """AdamW param groups with blockd's rule: matrices decay, 1-D (norm) weights do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def warmup_cosine(steps, warmup):
    """LambdaLR factor: linear warmup, then cosine decay to 10%."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
    return factor


def load_bytes(path):
    with open(path, "rb") as f:
        return torch.tensor(list(f.read()), dtype=torch.long)


def sample_batches(data, batch, seq, generator):
    """Endless (x, y) batches of random windows; y is x shifted by one byte."""
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
        window = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def lm_loss(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def train_step(model, optimizers, schedulers, x, y):
    """One step: forward, backward, every optimizer steps and zeroes, every scheduler steps.
    Returns (loss, the first optimizer's step() result)."""
    loss = lm_loss(model, x, y)
    loss.backward()
    results = [opt.step() for opt in optimizers]
    for opt in optimizers:
        opt.zero_grad()
    for s in schedulers:
        s.step()
    return loss.item(), results[0]


@torch.no_grad()
def evaluate(model, data, batch, seq, batches=4, seed=1234):
    g = torch.Generator().manual_seed(seed)
    it = sample_batches(data, batch, seq, g)
    return sum(lm_loss(model, *next(it)).item() for _ in range(batches)) / batches


@torch.no_grad()
def generate(model, prompt, length, seq):
    """Greedy decoding without a KV cache: re-run the last `seq` bytes for each new byte."""
    tokens = list(prompt)
    for _ in range(length):
        ctx = torch.tensor([tokens[-seq:]], dtype=torch.long)
        tokens.append(int(model(ctx)[0, -1].argmax()))
    return bytes(tokens)


def smooth(values, half_width=5):
    """Centred moving average (no lag), for the plot."""
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half_width):i + half_width + 1]
        out.append(sum(window) / len(window))
    return out


def add_training_args(p):
    """The flags of where blockd is and how long to train (generate.py shares them)."""
    p.add_argument("--target", default=os.environ.get("BLOCKD_TARGET", "localhost:50051"),
                   help="blockd HOST:PORT ($BLOCKD_TARGET); train_tiny_lm also takes several, comma-separated: a "
                        "replica group, each batch's rows spread over the daemons")
    p.add_argument("--token", default=os.environ.get("BLOCKD_TOKEN"),
                   help="bearer token, if blockd wants one ($BLOCKD_TOKEN)")
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq", type=int, default=64, help="bytes per sequence")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_training_args(p)
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default=None,
                   help="the blocks' arithmetic (None: the backend's; the cpu backend has fp32 only)")
    p.add_argument("--wire", choices=["fp32", "bf16"], default=None,
                   help="activation dtype on the wire (None: bf16 with --precision bf16, else fp32)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate, remote and local")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of the matrices")
    p.add_argument("--warmup", type=int, default=30, help="linear warmup steps before the cosine decay")
    p.add_argument("--seed", type=int, default=0, help="seed of the blocks, the local modules and the batches")
    p.add_argument("--data", default=os.path.join(HERE, "data", "coriolanus.txt"), help="text to train on")
    p.add_argument("--plot", default="tiny_lm_loss.png", help="where to save the loss curve (PNG)")
    p.add_argument("--sample", type=int, default=300, help="bytes to generate at the end")
    p.add_argument("--prompt", default="MENENIUS:\n", help="start of the generated text")
    p.add_argument("--eval-every", type=int, default=50, help="steps between validation losses")
    return p.parse_args(argv)


def connect(target, token):
    """(client, GetServerInfo) or, when blockd cannot be reached or refuses us, None after saying
    what to do: a first run without a daemon should not end in a gRPC traceback."""
    client = blockd.Client(target, token=token, timeout=120)
    try:
        return client, client.server_info(timeout=15)
    except blockd.UnavailableError as e:
        print(f"train_tiny_lm: cannot reach blockd ({e.details})\n"
              f"is blockd running at {target}? Start one with `blockd --listen={target}` (or bash scripts/run.sh),\n"
              f"or point --target / $BLOCKD_TARGET at it.", file=sys.stderr)
    except blockd.DeadlineExceededError:
        print(f"train_tiny_lm: no answer from {target} within 15 s\nis blockd running at {target}?", file=sys.stderr)
    except blockd.UnauthenticatedError as e:
        print(f"train_tiny_lm: blockd at {target} wants a bearer token ({e.details}): pass --token or set "
              f"$BLOCKD_TOKEN", file=sys.stderr)
    client.close()
    return None


def make_blocks(clients, args):
    """The 4 layers on one daemon (a RemoteSpan), or on each of several daemons joined as a replica
    group (a RemoteModel that spreads each batch's rows over them, every step averaging their
    gradients). Returns (the module, what steps it: a RemoteSpan or RemoteModel, cleanup)."""
    prefix = f"tiny-lm-{os.getpid()}/layer"
    wire = args.wire or ("bf16" if args.precision == "bf16" else "fp32")
    spans = []
    try:
        for c in clients:
            spans.append(blockd.RemoteSpan.create(c, CONFIG, NUM_LAYERS, prefix=prefix, seed=args.seed,
                                                  precision=args.precision, max_seq_len=args.seq,
                                                  max_batch_size=args.batch, wire_dtype=wire))
        if len(spans) == 1:
            return spans[0], spans[0], spans[0].delete
        group = blockd.ReplicaGroup.form(clients, f"tiny-lm-{os.getpid()}", spans[0].block_ids, timeout_ms=120000)
    except BaseException:
        for span in spans:
            span.delete()
        raise
    model = blockd.RemoteModel(group, wire_dtype=wire)

    def cleanup():
        group.leave()
        for span in spans:
            span.delete()
    return model, model, cleanup


def main(argv=None):
    args = parse_args(argv)
    targets = [t for t in args.target.split(",") if t]
    clients, infos = [], []
    for target in targets:
        connected = connect(target, args.token)
        if connected is None:
            for c in clients:
                c.close()
            return 1
        clients.append(connected[0])
        infos.append(connected[1])
    info = infos[0]

    data = load_bytes(args.data)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    torch.manual_seed(args.seed)
    if len(targets) == 1:
        print(f"blockd {info.version} at {args.target}, backend {info.backend}; {len(data)} bytes of text")
    else:
        print(f"blockd {info.version} at {len(targets)} daemons as one replica group ({', '.join(targets)}), "
              f"backends {', '.join(i.backend for i in infos)}; {len(data)} bytes of text")

    blocks, remote, cleanup = make_blocks(clients, args)
    try:
        model = TinyLM(blocks)
        remote_opt = blockd.RemoteAdamW(remote, lr=args.lr, weight_decay=args.weight_decay)
        local_opt = torch.optim.AdamW(decay_groups(model, args.weight_decay), lr=args.lr)
        factor = warmup_cosine(args.steps, args.warmup)
        schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (remote_opt, local_opt)]
        batches = sample_batches(train_data, args.batch, args.seq, torch.Generator().manual_seed(args.seed))

        losses = []
        bar = Progress(args.steps, "train", unit="it")
        start = time.monotonic()
        for step in range(args.steps):
            loss, grad_norm = train_step(model, [remote_opt, local_opt], schedulers, *next(batches))
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(f"loss {loss:.3f}")
            last = step + 1 == args.steps
            if (step + 1) % args.eval_every == 0 or last:
                val = evaluate(model, val_data, args.batch, args.seq)
                tok_s = (step + 1) * args.batch * args.seq / (time.monotonic() - start)
                bar.write(f"step {step + 1:4d}/{args.steps}  loss {loss:.4f}  val {val:.4f}  "
                          f"grad norm {grad_norm:.3f}  lr {remote_opt.param_groups[0]['lr']:.2e}  {tok_s:.0f} tok/s")
        bar.close()
        print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f} (ln {VOCAB} = {math.log(VOCAB):.4f})")

        try:
            import plot_png
        except ImportError:
            sys.path.insert(0, HERE)
            import plot_png
        plot_png.save_line_plot(args.plot, {"train loss": losses, "smoothed": smooth(losses)},
                                title=f"tiny byte LM, {NUM_LAYERS} layers on blockd ({info.backend}"
                                      f"{f', {len(clients)} replicas' if len(clients) > 1 else ''})",
                                xlabel="step", ylabel="loss")
        print(f"loss curve saved to {args.plot}")

        text = generate(model, args.prompt.encode(), args.sample, args.seq)
        print("--- greedy sample ---")
        print(text.decode("utf-8", errors="replace"))
    finally:
        cleanup()
        for c in clients:
            c.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
