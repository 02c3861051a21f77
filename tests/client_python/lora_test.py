"""LoRA adapters through the Python client against a real blockd (CPU backend), checked against an
independent PyTorch reference of PEFT's math (LoraLinear below: PEFT's LoraLayer.forward without
dropout, result = base(x) + lora_B(lora_A(x)) * alpha / r): forward, input and adapter gradients in
float64, memory of a frozen base with adapters, RemoteAdamW stepping the adapters only (base bitwise
unchanged), 30 steps of the example's tiny LM with LoRA on a frozen base agreeing with local PyTorch
(loss within 1e-4 relative, fp32), refusals of bad configs, and the create / import-hf flags."""
import math
import os
import subprocess
import sys
import unittest

import torch
import torch.nn.functional as F
from torch import nn

import blockd
from blockd_testing import Daemon
from client_test import ClientTestBase
from torch_reference import ReferenceBlock, ReferenceSpan

sys.path.insert(0, os.environ.get("BLOCKD_EXAMPLES")
                or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples"))
import train_tiny_lm as example  # noqa: E402

CFG = blockd.BlockConfig(hidden_size=32, num_attention_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48,
                         rms_norm_eps=1e-6, rope_theta=10000.0, qk_norm=True)


class LoraLinear(nn.Module):
    """PEFT's LoRA around one nn.Linear, with blockd's (and PEFT's merged) tensor names: weight
    (and bias) of the base, lora_A.weight [r, in], lora_B.weight [out, r]."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        self.scaling = alpha / rank

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(x)) * self.scaling


def reference_block(cfg, lora, weights, frozen=True, dtype=torch.float32):
    """A ReferenceBlock with `lora`'s targets wrapped in LoraLinear, loaded with `weights` (blockd's
    names); with frozen=True only the adapters require grad."""
    b = ReferenceBlock(cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim,
                       cfg.intermediate_size, cfg.rms_norm_eps, cfg.rope_theta, cfg.qk_norm)
    for parent in (b.self_attn, b.mlp):
        for name, module in list(parent.named_children()):
            if name in lora.target_modules:
                setattr(parent, name, LoraLinear(module, lora.rank, lora.alpha))
    b.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
    b.to(dtype)
    for name, p in b.named_parameters():
        p.requires_grad_(not frozen or "lora_" in name)
    return b


def close(test, got, want, what):
    scale = want.abs().max().item()
    err = (got.double() - want.double()).abs().max().item()
    test.assertLess(err, 1e-5 * scale + 1e-6, f"{what}: max error {err:.3g}, scale {scale:.3g}")


class LoraSpanTest(ClientTestBase):
    def test_forward_and_gradients_match_pefts_math_in_float64(self):
        lora = blockd.LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
        for frozen in (True, False):
            span = blockd.RemoteSpan.create(self.client, CFG, 2, prefix=f"fw{int(frozen)}/", seed=3, max_batch_size=4,
                                            max_seq_len=16, frozen=frozen, lora=lora)
            # PEFT starts B at zero, which hides every path through A: load random adapters.
            for b in span.block_ids:
                self.client.load_weights(b, {name: (torch.rand(shape, generator=self.gen) * 2 - 1) / math.sqrt(shape[-1])
                                             for name, shape in lora.param_shapes(CFG).items()})
            ref = ReferenceSpan([reference_block(CFG, lora, w, frozen, torch.float64) for w in span.download()])
            x = torch.randn(3, 7, CFG.hidden_size, generator=self.gen)
            w = torch.randn(3, 7, CFG.hidden_size, generator=self.gen)
            xr, xl = x.clone().requires_grad_(), x.double().requires_grad_()
            yr, yl = span(xr), ref(xl)
            close(self, yr, yl, "output")
            (yr * w).sum().backward()
            (yl * w.double()).sum().backward()
            close(self, xr.grad, xl.grad, "input gradient")
            for block_id, block in zip(span.block_ids, ref.blocks):
                grads = self.client.download_tensors(block_id, kind="gradients", as_torch=True)
                trained = {n: p for n, p in block.named_parameters() if p.requires_grad}
                self.assertEqual(sorted(grads), sorted(trained))
                for name, p in trained.items():
                    close(self, grads[name], p.grad, f"{block_id} d {name}")
                if frozen:
                    self.assertEqual(sorted(grads), sorted(lora.param_shapes(CFG)))

    def test_frozen_base_holds_weights_and_adapters_and_adamw_steps_only_the_adapters(self):
        lora = blockd.LoraConfig(rank=4, alpha=16)  # all seven projections
        span = blockd.RemoteSpan.create(self.client, CFG, 2, prefix="mem/", seed=5, max_batch_size=4, max_seq_len=8,
                                        frozen=True, lora=lora)
        base = sum(math.prod(s) for s in CFG.param_shapes().values())
        adapters = sum(math.prod(s) for s in lora.param_shapes(CFG).values())
        for b in span.block_ids:
            info = self.client.get_block(b)
            self.assertTrue(info.frozen)
            self.assertEqual(info.lora.rank, 4)
            self.assertEqual(list(info.lora.target_modules), list(blockd.config.LORA_TARGETS))
            self.assertEqual(info.parameter_count, base + adapters)
            # fp32 base weights; adapters with gradients and both moments
            self.assertEqual(info.memory_bytes, 4 * base + 16 * adapters)
        before = span.download()
        opt = blockd.RemoteAdamW(span, lr=1e-2, weight_decay=0.1)
        for _ in range(3):
            span(torch.randn(2, 8, CFG.hidden_size, generator=self.gen)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        after = span.download()
        for b, w0, w1 in zip(span.block_ids, before, after):
            self.assertEqual(self.client.get_block(b).step, 3)
            for name in CFG.param_shapes():
                self.assertTrue(torch.equal(w0[name], w1[name]), f"{b} base {name} changed")
            for name in lora.param_shapes(CFG):
                self.assertFalse(torch.equal(w0[name], w1[name]), f"{b} adapter {name} did not move")
            with self.assertRaisesRegex(blockd.FailedPreconditionError, "is frozen"):
                self.client.download_tensors(b, kind="adam_m", names=["mlp.up_proj.weight"])

    def test_bad_configs_are_refused_and_leave_nothing(self):
        cases = [
            (dict(rank=0, alpha=8), "lora.rank = 0, expected 1..16"),
            (dict(rank=99, alpha=8, target_modules=["q_proj"]), "lora.rank = 99, expected 1..32"),
            (dict(rank=4, alpha=0), "lora.alpha = 0, expected a finite number > 0"),
            (dict(rank=4, alpha=float("nan")), "lora.alpha = nan"),
            (dict(rank=4, alpha=8, target_modules=[]), "lora.target_modules is empty"),
            (dict(rank=4, alpha=8, target_modules=["q_proj", "lm_head"]), 'lora.target_modules\\[1\\] = "lm_head"'),
            (dict(rank=4, alpha=8, target_modules=["k_proj", "k_proj"]), "names k_proj twice"),
        ]
        for fields, message in cases:
            with self.assertRaisesRegex(blockd.InvalidArgumentError, message):
                self.client.create_block("bad", CFG, seed=1, frozen=True, lora=blockd.LoraConfig(**fields))
        self.assertEqual(self.client.list_blocks(), [])


class LoraAgreementTest(unittest.TestCase):
    STEPS, BATCH, SEQ = 30, 4, 32
    LR, WEIGHT_DECAY, WARMUP, RTOL = 3e-3, 0.1, 5, 1e-4

    def test_30_steps_of_lora_on_a_frozen_base_agree_with_pytorch(self):
        torch.manual_seed(0)  # the local embedding / norm / head
        cfg = example.CONFIG
        lora = blockd.LoraConfig(rank=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"])
        # The CPU backend in CI; on the GPU host BLOCKD_BACKEND=cuda (run_checks.sh lora), fp32 either way.
        with Daemon(backend=os.environ.get("BLOCKD_BACKEND", "cpu")) as d, \
                blockd.Client(d.target, timeout=120) as client:
            span = blockd.RemoteSpan.create(client, cfg, example.NUM_LAYERS, prefix="lora/layer", seed=17,
                                            precision="fp32", max_seq_len=self.SEQ, max_batch_size=self.BATCH,
                                            frozen=True, lora=lora)
            remote = example.TinyLM(span)
            start = span.download()
            local = example.TinyLM(ReferenceSpan([reference_block(cfg, lora, w) for w in start]))
            for part in ("embed", "norm", "head"):
                getattr(local, part).load_state_dict(getattr(remote, part).state_dict())

            factor = example.warmup_cosine(self.STEPS, self.WARMUP)
            remote_opt = blockd.RemoteAdamW(span, lr=self.LR, weight_decay=self.WEIGHT_DECAY)
            remote_local_opt = torch.optim.AdamW(example.decay_groups(remote, self.WEIGHT_DECAY), lr=self.LR)
            local_opt = torch.optim.AdamW(example.decay_groups(local, self.WEIGHT_DECAY), lr=self.LR)
            remote_sched = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (remote_opt, remote_local_opt)]
            local_sched = torch.optim.lr_scheduler.LambdaLR(local_opt, factor)

            data = example.load_bytes(os.path.join(os.path.dirname(example.__file__), "data", "coriolanus.txt"))
            batches = example.sample_batches(data, self.BATCH, self.SEQ, torch.Generator().manual_seed(3))
            adapters = [p for n, p in local.blocks.named_parameters() if p.requires_grad]
            self.assertEqual(len(adapters), example.NUM_LAYERS * 14)
            losses = []
            for step in range(self.STEPS):
                x, y = next(batches)
                remote_loss, remote_norm = example.train_step(remote, [remote_opt, remote_local_opt], remote_sched,
                                                              x, y)
                loss = example.lm_loss(local, x, y)
                loss.backward()
                local_norm = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in adapters))
                local_opt.step()
                local_opt.zero_grad()
                local_sched.step()
                rel = abs(remote_loss - loss.item()) / abs(loss.item())
                rel_norm = abs(remote_norm - local_norm) / local_norm
                losses.append(remote_loss)
                self.assertLess(rel, self.RTOL, f"step {step}: loss through blockd {remote_loss!r}, in PyTorch "
                                                f"{loss.item()!r} (relative difference {rel:.3g})")
                self.assertLess(rel_norm, self.RTOL, f"step {step}: adapters' grad norm from Step {remote_norm!r}, "
                                                     f"in PyTorch {local_norm!r} (relative difference {rel_norm:.3g})")
            # The base never moved; the adapters learned (B left zero).
            for w0, w1 in zip(start, span.download()):
                for name in cfg.param_shapes():
                    self.assertTrue(torch.equal(w0[name], w1[name]), name)
                self.assertGreater(w1["self_attn.q_proj.lora_B.weight"].abs().max().item(), 0)
            self.assertLess(sum(losses[-5:]) / 5, losses[0] - 0.5)
            print(f"\nLoRA 30-step agreement: first loss {losses[0]:.6f}, last {losses[-1]:.6f}", file=sys.stderr)


class LoraCliTest(ClientTestBase):
    def blockctl(self, *args):
        return subprocess.run([os.environ.get("BLOCKCTL_BINARY", "blockctl"), f"--target={self.daemon.target}",
                               *args], capture_output=True, text=True, timeout=60)

    def test_blockctl_create_flags(self):
        r = self.blockctl("create", "c0", "--hidden_size=32", "--num_attention_heads=4", "--num_kv_heads=2",
                          "--intermediate_size=48", "--seed=1", "--frozen", "--lora-rank=4", "--lora-alpha=8",
                          "--lora-targets=v_proj,q_proj")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("lora        rank 4, alpha 8 on q_proj v_proj", r.stdout)
        info = self.client.get_block("c0")
        self.assertEqual((info.lora.rank, info.lora.alpha, list(info.lora.target_modules)), (4, 8, ["q_proj", "v_proj"]))
        r = self.blockctl("create", "c1", "--hidden_size=32", "--num_attention_heads=4", "--intermediate_size=48",
                          "--seed=1", "--lora-rank=4")
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("--lora_rank needs --lora_alpha", r.stderr)
        r = self.blockctl("create", "c1", "--hidden_size=32", "--num_attention_heads=4", "--intermediate_size=48",
                          "--seed=1", "--lora-rank=4", "--lora-alpha=8", "--lora-targets=q_proj,mlp")
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn('lora.target_modules[1] = "mlp", expected one of q_proj', r.stderr)
        self.assertEqual([b.block_id for b in self.client.list_blocks()], ["c0"])

    def test_python_cli_flags_reach_import_hf(self):
        from blockd import __main__ as cli
        seen = {}

        def fake_import_hf(client, path, **kwargs):
            seen.update(kwargs)
            return []

        import blockd.hf
        real = blockd.hf.import_hf
        blockd.hf.import_hf = fake_import_hf
        try:
            cli.main(["import-hf", "/nowhere", f"--target={self.daemon.target}", "--frozen", "--lora-rank=16",
                      "--lora-alpha=32", "--lora-targets=q_proj,v_proj"])
        finally:
            blockd.hf.import_hf = real
        self.assertEqual(seen["lora"], blockd.LoraConfig(rank=16, alpha=32, target_modules=("q_proj", "v_proj")))
        self.assertTrue(seen["frozen"])


if __name__ == "__main__":
    unittest.main()
