"""Generation through inference sessions: the Python session calls, blockd.RemoteCausalLM.generate
with sessions against full recompute and against an independent local PyTorch model with its own
KV cache (torch_reference.py), beam search against a reference beam search written here, seeded
sampling, the streamer, and that no session outlives generate. Tiny Qwen3-like and Llama-like fp32
checkpoints are written in the Hugging Face layout and imported with import_hf."""
import os
import subprocess
import sys
import unittest

import torch

import blockd
from blockd import hf
from blockd_testing import Daemon, DaemonClientTest, relative_error
from hf_import_test import LLAMA, QWEN3, layer_shapes, make_checkpoint
from torch_reference import KvCache, ReferenceBlock, ReferenceSpan, RefRMSNorm

RTOL = 1e-5  # fp32 logits, relative to the largest


class ReferenceLM:
    """The checkpoint's whole model in local PyTorch, sharing no code with blockd."""

    def __init__(self, config, tensors):
        c = config
        dh = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        blocks = []
        for i in range(c["num_hidden_layers"]):
            b = ReferenceBlock(c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], dh,
                               c["intermediate_size"], c["rms_norm_eps"], c.get("rope_theta", 10000.0),
                               c["model_type"] == "qwen3")
            b.load_state_dict({n: tensors[f"model.layers.{i}.{n}"].float() for n in layer_shapes(c)})
            blocks.append(b)
        self.span = ReferenceSpan(blocks)
        self.embed = tensors["model.embed_tokens.weight"].float()
        self.norm = RefRMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.norm.weight.data.copy_(tensors["model.norm.weight"].float())
        self.head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"]).float()

    @torch.no_grad()
    def logits(self, tokens, offset=0, cache=None):
        """Logits of the last position of tokens [rows, n]."""
        h = self.span(self.embed[tokens], offset, cache)
        return self.norm(h[:, -1]) @ self.head.T

    @torch.no_grad()
    def greedy(self, prompt, steps):
        """(new tokens [rows, steps], the logits of each step), with a KV cache."""
        cache = KvCache(len(self.span.blocks))
        logits = self.logits(prompt, 0, cache)
        tokens, seen = [], []
        for _ in range(steps):
            seen.append(logits)
            tokens.append(logits.argmax(-1))
            logits = self.logits(tokens[-1][:, None], cache.length(), cache)
        return torch.stack(tokens, 1), seen

    @torch.no_grad()
    def beam_search(self, prompt, steps, beams, eos):
        """Hugging Face's beam search (length_penalty 1, early_stopping False) for one prompt [1, n],
        written plainly: full recompute, lists of (score, tokens)."""
        n = prompt.shape[1]
        running = [(0.0, prompt[0].tolist())]
        finished = []  # (normalised score, tokens)
        for step in range(steps):
            cands = []
            for beam, (score, toks) in enumerate(running):
                logp = torch.log_softmax(self.logits(torch.tensor([toks])), -1)[0]
                for t in range(logp.shape[0]):
                    cands.append((score + float(logp[t]), beam, t))
            cands.sort(key=lambda c: -c[0])
            cands = cands[:2 * beams]
            nxt = []
            for rank, (score, beam, t) in enumerate(cands):
                if t == eos:
                    if rank < beams:
                        finished.append((score / (step + 1), running[beam][1]))
                        finished = sorted(finished, key=lambda f: -f[0])[:beams]
                    continue
                nxt.append((score, running[beam][1] + [t]))
                if len(nxt) == beams:
                    break
            running = nxt
            if len(finished) == beams and finished[-1][0] >= cands[0][0] / (step + 1):
                break
        else:
            for score, toks in running:
                finished.append((score / (len(toks) - n), toks))
        best = max(finished, key=lambda f: f[0])[1]
        return best + [eos] if len(best) < n + steps else best



class GenerateTest(DaemonClientTest):
    client_timeout = 120

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        gen = torch.Generator().manual_seed(1212)
        cls.models = {}
        for name, config in (("qwen3", dict(QWEN3, vocab_size=64)), ("llama", dict(LLAMA, vocab_size=56))):
            d = os.path.join(cls.tmp.name, name)
            tensors = make_checkpoint(d, config, torch.float32, shards=1, gen=gen)
            hf.import_hf(cls.client, d, prefix=f"{name}/layer", progress=False)
            cls.models[name] = (d, config, tensors)
        cls.gen = gen

    def tearDown(self):
        self.assertEqual(self.client.list_sessions(), [], "a session outlived the test")

    def remote(self, name, **kwargs):
        d = self.models[name][0]
        return blockd.RemoteCausalLM.from_hf(d, self.client, prefix=f"{name}/layer", **kwargs)

    def prompt(self, name, rows=2, n=5):
        return torch.randint(0, self.models[name][1]["vocab_size"], (rows, n), generator=self.gen)

    def test_session_calls(self):
        ids = ["qwen3/layer0", "qwen3/layer1"]
        x = torch.randn(2, 7, QWEN3["hidden_size"], generator=self.gen)
        whole = self.client.forward(ids, x).output
        info = self.client.open_session(ids, batch_size=2, max_length=8)
        self.assertEqual((list(info.block_ids), info.batch_size, info.max_length, info.length), (ids, 2, 8, 0))
        self.assertEqual([s.session_id for s in self.client.list_sessions()], [info.session_id])
        sid = info.session_id
        try:
            a = self.client.infer_step(sid, x[:, :4])
            self.assertEqual(a.length, 4)
            with self.client.infer_stream() as stream:
                b = stream.step(sid, x[:, 4:6])
                c = stream.step(sid, x[:, 6:])
                self.assertEqual((b.length, c.length), (6, 7))
                got = torch.cat([a.hidden_states, b.hidden_states, c.hidden_states], 1)
                self.assertLess(relative_error(got, whole), RTOL)
                # A refused step ends the stream with the server's status, and says so again after.
                with self.assertRaisesRegex(blockd.InvalidArgumentError, "max_length") as e:
                    stream.step(sid, x[:, :2])
                self.assertEqual(e.exception.code.name, "OUT_OF_RANGE")
                with self.assertRaisesRegex(blockd.InvalidArgumentError, "max_length"):
                    stream.step(sid, x[:, :1])
            self.assertEqual(self.client.trim_session(sid, 4).length, 4)
            fork = self.client.fork_session(sid).session_id
            try:
                # The fork continues from the shared prefix as the original does.
                again = self.client.infer_step(fork, x[:, 4:6]).hidden_states
                self.assertTrue(torch.equal(again, b.hidden_states))
                # hypo_ids: both rows continue from row 1.
                step = self.client.infer_step(sid, x[[1, 1], 4:5], hypo_ids=[1, 1]).hidden_states
                self.assertTrue(torch.equal(step[0], step[1]))
                self.assertLess(relative_error(step[0], whole[1, 4:5]), RTOL)
                with self.assertRaisesRegex(blockd.InvalidArgumentError, "hidden|shape|expect"):
                    self.client.infer_step(sid, torch.randn(2, 1, 8))
            finally:
                self.client.close_session(fork)
        finally:
            self.client.close_session(sid)
        with self.assertRaises(blockd.NotFoundError):
            self.client.infer_step(sid, x[:, :1])

    def test_greedy_sessions_equal_full_recompute_and_a_local_kv_cache(self):
        for name in ("qwen3", "llama"):
            with self.subTest(name):
                model = self.remote(name)
                prompt = self.prompt(name)
                out = model.generate(prompt, max_new_tokens=10, return_dict_in_generate=True, output_logits=True)
                full = model.generate(prompt, max_new_tokens=10, use_cache=False, return_dict_in_generate=True,
                                      output_logits=True)
                self.assertEqual(out.sequences.tolist(), full.sequences.tolist())
                ref_tokens, ref_logits = ReferenceLM(*self.models[name][1:]).greedy(prompt, 10)
                self.assertEqual(out.sequences[:, 5:].tolist(), ref_tokens.tolist())
                self.assertEqual(len(out.logits), 10)
                for step, (got, want) in enumerate(zip(out.logits, ref_logits)):
                    err = relative_error(got, want)
                    self.assertLess(err, RTOL, f"{name} step {step}: logits differ from the reference by {err:.2e}")
                for step, (got, want) in enumerate(zip(full.logits, ref_logits)):
                    self.assertLess(relative_error(got, want), RTOL, f"{name} full recompute, step {step}")

    def test_a_model_across_two_daemons_with_unary_steps(self):
        d, config, _ = self.models["llama"]
        with Daemon() as other:
            with blockd.Client(other.target, timeout=120) as c2:
                hf.import_hf(c2, d, prefix="far/layer", layers="1:2", progress=False)
                model = blockd.RemoteCausalLM.from_hf(
                    d, None, block_ids=[(self.client, ["llama/layer0"]), (other.target, ["far/layer1"])],
                    use_stream=False)
                try:
                    prompt = self.prompt("llama", rows=3, n=4)
                    got = model.generate(prompt, max_new_tokens=6)
                    want = self.remote("llama").generate(prompt, max_new_tokens=6)
                    self.assertEqual(got.tolist(), want.tolist())
                    self.assertEqual(c2.list_sessions(), [])
                finally:
                    model.close()

    def test_beam_search_equals_a_reference_beam_search(self):
        for name in ("qwen3", "llama"):
            with self.subTest(name):
                model = self.remote(name)
                ref = ReferenceLM(*self.models[name][1:])
                prompt = self.prompt(name, rows=2, n=4)
                # An eos that greedy decoding reaches, so that beams finish early.
                eos = int(model.generate(prompt[:1], max_new_tokens=3)[0, -1])
                for use_cache in (True, False):
                    got = model.generate(prompt, max_new_tokens=7, num_beams=3, eos_token_id=eos, pad_token_id=0,
                                         use_cache=use_cache)
                    want = [ref.beam_search(prompt[i:i + 1], 7, 3, eos) for i in range(2)]
                    width = max(len(w) for w in want)
                    want = [w + [0] * (width - len(w)) for w in want]
                    self.assertEqual(got.tolist(), want, f"{name} use_cache={use_cache}")
                # Without an eos every beam runs to the end.
                got = model.generate(prompt, max_new_tokens=5, num_beams=2)
                self.assertEqual(got.shape, (2, 9))
                self.assertEqual(got.tolist(), [ref.beam_search(prompt[i:i + 1], 5, 2, -1) for i in range(2)])

    def test_seeded_sampling_is_reproducible(self):
        model = self.remote("qwen3")
        prompt = self.prompt("qwen3", rows=3)

        def sample(seed, **kw):
            return model.generate(prompt, max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                                  generator=torch.Generator().manual_seed(seed), **kw)

        first = sample(7)
        self.assertEqual(first.tolist(), sample(7).tolist())
        self.assertEqual(first.tolist(), sample(7, use_cache=False).tolist())
        greedy = model.generate(prompt, max_new_tokens=12)
        self.assertNotEqual(first.tolist(), greedy.tolist(), "temperature 0.8 sampled the greedy tokens 36 times")
        top1 = model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=1, generator=torch.Generator())
        self.assertEqual(top1.tolist(), greedy.tolist())

    def test_streamer_sees_every_token_and_eos_pads(self):
        model = self.remote("llama")
        prompt = self.prompt("llama", rows=2, n=3)
        seen = []
        streamer = blockd.TokenStreamer(seen.append)
        free = model.generate(prompt, max_new_tokens=8)
        eos = int(free[0, 5])  # row 0 stops at its first eos, by its third new token
        stop = free[0, 3:].tolist().index(eos) + 1
        out = model.generate(prompt, max_new_tokens=8, eos_token_id=eos, pad_token_id=1, streamer=streamer)
        self.assertTrue(streamer.ended)
        self.assertEqual(seen, out[:, 3:].T.tolist())
        self.assertEqual(list(streamer), seen)
        row0 = out[0, 3:].tolist()
        self.assertEqual(row0[:stop], free[0, 3:3 + stop].tolist())
        self.assertTrue(all(t == 1 for t in row0[stop:]), row0)

        class Recorder:  # Hugging Face's streamer interface: the prompt first, then each step
            def __init__(self):
                self.puts, self.ends = [], 0

            def put(self, value):
                self.puts.append(value.tolist())

            def end(self):
                self.ends += 1

        r = Recorder()
        out = model.generate(prompt[:1], max_new_tokens=4, streamer=r)
        self.assertEqual(r.puts, [prompt[:1].tolist()] + [[t] for t in out[0, 3:].tolist()])
        self.assertEqual(r.ends, 1)

    def test_sessions_are_closed_when_generate_fails(self):
        model = self.remote("qwen3")
        prompt = self.prompt("qwen3")

        def boom(tokens):
            if len(seen) == 2:
                raise RuntimeError("the streamer failed")
            seen.append(tokens)

        seen = []
        with self.assertRaisesRegex(RuntimeError, "the streamer failed"):
            model.generate(prompt, max_new_tokens=6, streamer=blockd.TokenStreamer(boom))
        self.assertEqual(self.client.list_sessions(), [])
        # The second span's session cannot open: the first one's is closed again.
        broken = blockd.RemoteCausalLM(model.embed, [(self.client, ["qwen3/layer0"]), (self.client, ["no/such"])],
                                       model.norm, model.head)
        with self.assertRaisesRegex(blockd.NotFoundError, "no/such"):
            broken.generate(prompt, max_new_tokens=3)
        self.assertEqual(self.client.list_sessions(), [])
        # A max_length the server refuses fails at OpenSession; nothing stays open.
        with self.assertRaises(blockd.BlockdError):
            model.generate(torch.zeros(1, 2, dtype=torch.long), max_new_tokens=1 << 30)

    def test_blockctl_generate_equals_python_greedy(self):
        d = self.models["llama"][0]
        prompt = self.prompt("llama", rows=1, n=4)
        want = self.remote("llama").generate(prompt, max_new_tokens=7)[0, 4:].tolist()
        blockctl = os.environ.get("BLOCKCTL_BINARY", "blockctl")
        cmd = [blockctl, "--target", self.daemon.target, "generate", "llama/layer0,llama/layer1", "--hf", d,
               "--prompt-ids", ",".join(str(t) for t in prompt[0].tolist()), "--max-new-tokens", "7"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual([int(t) for t in r.stdout.split()], want)
        self.assertIn("tokens/s", r.stderr)
        # The same tokens from a client that busy-waits for each step's answer.
        r = subprocess.run(cmd[:3] + ["--busy_wait"] + cmd[3:], capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual([int(t) for t in r.stdout.split()], want)
        # The token after which it stops is printed, and nothing after it.
        r = subprocess.run(cmd + ["--eos-id", str(want[2])], capture_output=True, text=True, timeout=120)
        self.assertEqual([int(t) for t in r.stdout.split()], want[:want.index(want[2]) + 1], r.stderr)
        r = subprocess.run(cmd[:-4] + ["--prompt-ids", "1,56"], capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 1)
        self.assertIn("token 56 is not below", r.stderr)
        r = subprocess.run(cmd[:4] + ["generate", "llama/layer0,nope", "--hf", d, "--prompt-ids", "1"],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 1)
        self.assertIn("NOT_FOUND", r.stderr)

    def test_the_example_generates_with_and_without_the_cache(self):
        example = os.path.join(os.environ.get("BLOCKD_EXAMPLES", "../../examples"), "generate.py")
        r = subprocess.run([sys.executable, example, "--target", self.daemon.target, "--steps", "2", "--batch", "2",
                            "--seq", "16", "--new-tokens", "12"], capture_output=True, text=True, timeout=240)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertRegex(r.stdout, r"KV cache \(sessions\): +[0-9.]+ tokens/s")
        self.assertRegex(r.stdout, r"full recompute: +[0-9.]+ tokens/s")
        self.assertIn("same 12 bytes both ways: yes", r.stdout)

    def test_argument_refusals(self):
        model = self.remote("qwen3")
        prompt = self.prompt("qwen3", rows=1)
        cases = [({"max_new_tokens": -1}, "max_new_tokens"), ({"num_beams": 0}, "num_beams"),
                 ({"do_sample": True, "temperature": 0}, "temperature"),
                 ({"do_sample": True, "top_p": 1.5}, "top_p"), ({"do_sample": True, "num_beams": 2}, "beam"),
                 ({"num_beams": 2, "streamer": blockd.TokenStreamer()}, "streamer")]
        for kwargs, message in cases:
            with self.subTest(message), self.assertRaisesRegex(ValueError, message):
                model.generate(prompt, **kwargs)
        with self.assertRaisesRegex(ValueError, r"input_ids: expected \[batch, prompt\]"):
            model.generate(torch.zeros(1, 0, dtype=torch.long))
        with self.assertRaisesRegex(ValueError, "has 3 decoder layers, the spans name 2"):
            blockd.RemoteCausalLM.from_hf(self.models["qwen3"][0], self.client, block_ids=["a", "b"])
        self.assertEqual(model.generate(prompt, max_new_tokens=0).tolist(), prompt.tolist())


if __name__ == "__main__":
    unittest.main()
