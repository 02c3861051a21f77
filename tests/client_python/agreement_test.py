"""The example's tiny LM (examples/train_tiny_lm.py) trained 30 steps two ways from the same
initial weights: its 4 layers as a RemoteSpan on blockd (PRECISION_FP32, RemoteAdamW), and as
independent PyTorch blocks (torch_reference.py) with torch.optim.AdamW. Every step's loss must
agree within 1e-4 relative, and so must the blocks' gradient norm that Step reports."""
import contextlib
import io
import math
import os
import sys
import tempfile
import unittest

import torch

import blockd
from blockd.v1 import block_service_pb2 as pb
from blockd_testing import Daemon
from torch_reference import ReferenceBlock, ReferenceSpan

sys.path.insert(0, os.environ.get("BLOCKD_EXAMPLES")
                or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples"))
import train_tiny_lm as example  # noqa: E402

STEPS, BATCH, SEQ = 30, 4, 32
LR, WEIGHT_DECAY, WARMUP = 3e-3, 0.1, 5
RTOL = 1e-4


def relative(a, b):
    return abs(a - b) / abs(b)


class AgreementTest(unittest.TestCase):
    def test_30_steps_through_blockd_agree_with_pytorch(self):
        torch.manual_seed(0)  # the local embedding / norm / head
        cfg = example.CONFIG
        with Daemon() as d, blockd.Client(d.target, timeout=120) as client:
            span = blockd.RemoteSpan.create(client, cfg, example.NUM_LAYERS, prefix="agree/layer", seed=17,
                                            precision="fp32", max_seq_len=SEQ, max_batch_size=BATCH)
            for b in span.block_ids:
                self.assertEqual(client.get_block(b).precision, pb.PRECISION_FP32)
            remote = example.TinyLM(span)

            # The same model in plain PyTorch, from the seeded weights blockd made.
            blocks = []
            for weights in span.download():
                self.assertGreater(weights["mlp.up_proj.weight"].std().item(), 0.01)  # seeded, not zeros
                b = ReferenceBlock(cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim,
                                   cfg.intermediate_size, cfg.rms_norm_eps, cfg.rope_theta, cfg.qk_norm)
                b.load_state_dict(weights)
                blocks.append(b)
            local = example.TinyLM(ReferenceSpan(blocks))
            for part in ("embed", "norm", "head"):
                getattr(local, part).load_state_dict(getattr(remote, part).state_dict())

            factor = example.warmup_cosine(STEPS, WARMUP)
            remote_opt = blockd.RemoteAdamW(span, lr=LR, weight_decay=WEIGHT_DECAY)
            remote_local_opt = torch.optim.AdamW(example.decay_groups(remote, WEIGHT_DECAY), lr=LR)
            local_opt = torch.optim.AdamW(example.decay_groups(local, WEIGHT_DECAY), lr=LR)
            remote_sched = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (remote_opt, remote_local_opt)]
            local_sched = [torch.optim.lr_scheduler.LambdaLR(local_opt, factor)]

            data = example.load_bytes(os.path.join(os.path.dirname(example.__file__), "data", "coriolanus.txt"))
            batches = example.sample_batches(data, BATCH, SEQ, torch.Generator().manual_seed(3))
            block_params = list(local.blocks.parameters())
            losses, worst, worst_norm = [], 0.0, 0.0
            for step in range(STEPS):
                x, y = next(batches)
                remote_loss, remote_norm = example.train_step(remote, [remote_opt, remote_local_opt], remote_sched,
                                                              x, y)
                loss = example.lm_loss(local, x, y)
                loss.backward()
                local_norm = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in block_params))
                local_opt.step()
                local_opt.zero_grad()
                local_sched[0].step()
                local_loss = loss.item()

                rel = relative(remote_loss, local_loss)
                rel_norm = relative(remote_norm, local_norm)
                worst, worst_norm = max(worst, rel), max(worst_norm, rel_norm)
                losses.append((remote_loss, local_loss))
                self.assertLess(rel, RTOL, f"step {step}: loss through blockd {remote_loss!r}, in PyTorch "
                                           f"{local_loss!r} (relative difference {rel:.3g})")
                self.assertLess(rel_norm, RTOL, f"step {step}: blocks' grad norm from Step {remote_norm!r}, in "
                                                f"PyTorch {local_norm!r} (relative difference {rel_norm:.3g})")
            self.assertEqual(client.get_block(span.block_ids[0]).step, STEPS)
            # It learned: the last steps' loss is well below the first (ln 256 = 5.55 at the start).
            self.assertLess(sum(l for l, _ in losses[-5:]) / 5, losses[0][0] - 1.0)
            print(f"\n30-step agreement: first loss {losses[0][0]:.6f}, last {losses[-1][0]:.6f}; max relative "
                  f"difference {worst:.3g} (loss), {worst_norm:.3g} (blocks' grad norm)", file=sys.stderr)


    def test_the_example_runs_end_to_end(self):
        with Daemon() as d, tempfile.TemporaryDirectory() as tmp:
            plot = os.path.join(tmp, "loss.png")
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                example.main(["--target", d.target, "--steps", "4", "--batch", "2", "--seq", "16", "--sample", "8",
                              "--eval-every", "2", "--plot", plot])
            text = out.getvalue()
            self.assertIn("step    4/4", text)
            self.assertIn("loss: first", text)
            self.assertIn("--- greedy sample ---\nMENENIUS:\n", text)
            with open(plot, "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
            with blockd.Client(d.target) as c:
                self.assertEqual(c.list_blocks(), [])  # the example deletes its blocks

    def test_the_example_trains_over_a_replica_group_like_one_daemon(self):
        # --target with two daemons: the layers on both, joined as a replica group, each batch's
        # rows spread over them. The losses it reports equal those of one daemon to rounding.
        args = ["--steps", "6", "--batch", "4", "--seq", "16", "--sample", "8", "--eval-every", "3"]

        def losses(text):
            return [float(line.split("loss ")[1].split()[0]) for line in text.splitlines() if line.startswith("step ")]
        with Daemon(extra_args=["--collective_host=127.0.0.1"]) as d0, \
                Daemon(extra_args=["--collective_host=127.0.0.1"]) as d1, tempfile.TemporaryDirectory() as tmp:
            runs = {}
            for name, target in (("one", d0.target), ("group", f"{d0.target},{d1.target}")):
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    self.assertEqual(example.main(["--target", target, "--plot", os.path.join(tmp, f"{name}.png")]
                                                  + args), 0)
                runs[name] = out.getvalue()
            self.assertIn("at 2 daemons as one replica group", runs["group"])
            self.assertIn("--- greedy sample ---\nMENENIUS:\n", runs["group"])
            one, group = losses(runs["one"]), losses(runs["group"])
            self.assertEqual(len(one), 2)
            for a, b in zip(one, group):
                self.assertAlmostEqual(a, b, delta=2e-4, msg=f"one daemon {one}, replica group {group}")
            for d in (d0, d1):
                with blockd.Client(d.target) as c:
                    self.assertEqual(c.list_blocks(), [])  # blocks deleted, group left
                    self.assertEqual(c.list_groups(), [])


if __name__ == "__main__":
    unittest.main()
