"""Replica groups and models across daemons from Python, with three CPU daemons on loopback:

- RemoteModel over two daemons (a pipeline) clips by the global norm exactly like one daemon
  holding the whole span with max_grad_norm (bitwise), and skips the step on every daemon when a
  gradient is non-finite.
- ReplicaGroup.form + RemoteModel: two replicas end bitwise identical (weights and moments), equal
  one daemon fed the whole batch to rounding, and each step all-reduces the gradients once (the
  Step reuses GradNorm's mean).
- bench/scale_replicas.py runs small against two daemons.
- A replicated stage runs its replicas' Forward and Backward calls at once, starts averaging its
  gradients while earlier stages run backward, and no_sync() defers that for accumulation.
- A group that cannot form (mismatched blocks) leaves no group behind on any member.
"""
import contextlib
import importlib.util
import io
import os
import threading
import unittest
import zlib

import torch

import blockd
import blockd.model
from blockd_testing import Daemon

CFG = blockd.BlockConfig(hidden_size=32, num_attention_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48,
                         rms_norm_eps=1e-6, rope_theta=10000.0, qk_norm=True)
HYPER = dict(lr=1e-2, weight_decay=0.01)


class GroupTestBase(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.daemons, cls.clients = [], []
        try:
            for _ in range(3):
                cls.daemons.append(Daemon(extra_args=["--collective_host=127.0.0.1"]).start())
                cls.clients.append(blockd.Client(cls.daemons[-1].target, timeout=120))
        except Exception:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        for c in cls.clients:
            c.close()
        for d in cls.daemons:
            d.stop()

    def setUp(self):
        self.gen = torch.Generator().manual_seed(zlib.crc32(self.id().encode()))

    def tearDown(self):
        for c in self.clients:
            for g in c.list_groups():
                c.leave_group(g.group_id)
            for b in c.list_blocks():
                c.delete_block(b.block_id)

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.gen)

    def state(self, client, block_id):
        return {kind: client.download_tensors(block_id, kind=kind, as_torch=True)
                for kind in ("weights", "adam_m", "adam_v")}

    def assertSameState(self, a, b, what):
        for kind in a:
            self.assertBitwise(a[kind], b[kind], f"{what}, {kind}")

    def assertMeanGradient(self, members, block_id, ref_client, ref_id):
        """The members' gradients (before the group Step averages them in) have the mean of
        `ref_id`'s, one daemon's on the whole batch: ||mean - ref|| <= 1e-5 ||ref|| per tensor."""
        grads = [m.download_tensors(block_id, kind="gradients", as_torch=True) for m in members]
        want = ref_client.download_tensors(ref_id, kind="gradients", as_torch=True)
        for name, w in want.items():
            mean = sum(g[name].double() for g in grads) / len(grads)
            err = (mean - w.double()).norm().item()
            self.assertLessEqual(err, 1e-5 * w.double().norm().item(), f"{block_id} {name}: mean gradient vs one daemon")

    def assertBitwise(self, a, b, what):
        self.assertEqual(list(a), list(b), what)
        for name in a:
            self.assertTrue(torch.equal(a[name], b[name]),
                            f"{what}: {name} differs by up to {(a[name] - b[name]).abs().max().item()}")


class ModelAcrossDaemonsTest(GroupTestBase):
    def test_pipeline_over_two_daemons_clips_like_one_daemon(self):
        c0, c1, _ = self.clients
        c0.create_block("a0", CFG, layer_index=0, seed=1)
        c1.create_block("b1", CFG, layer_index=1, seed=2)
        c0.create_block("r0", CFG, layer_index=0, seed=1)
        c0.create_block("r1", CFG, layer_index=1, seed=2)
        model = blockd.RemoteModel([blockd.RemoteSpan(c0, "a0"), blockd.RemoteSpan(c1, "b1")])
        ref = blockd.RemoteSpan(c0, ["r0", "r1"])
        opt = blockd.RemoteAdamW(ref, max_grad_norm=0.05, **HYPER)
        model_opt = blockd.RemoteAdamW(model, max_grad_norm=0.05, **HYPER)  # the last step goes through it
        for step in range(3):
            x, target = self.randn(2, 6, 32), self.randn(2, 6, 32)
            (model(x) * target).sum().backward()
            (ref(x) * target).sum().backward()
            if step < 2:
                result = model.step(max_grad_norm=0.05, **HYPER)
            else:
                model_opt.step()
                result = blockd.model.ModelStepResult(model_opt.grad_norm, model_opt.skipped,
                                                      model_opt.last_results[0].clip_coefficient, None)
            norm = opt.step()
            self.assertFalse(result.skipped)
            self.assertLess(result.clip_coefficient, 1.0, "the test must clip")
            self.assertEqual(result.grad_norm, norm, f"step {step}: global norm over two daemons vs one")
            self.assertEqual(result.clip_coefficient, opt.last_results[0].clip_coefficient)
            model.zero_grad()
            opt.zero_grad()
        self.assertSameState(self.state(c0, "a0"), self.state(c0, "r0"), "a0 on daemon 0 vs r0")
        self.assertSameState(self.state(c1, "b1"), self.state(c0, "r1"), "b1 on daemon 1 vs r1")

    def test_a_non_finite_gradient_skips_the_step_on_every_daemon(self):
        c0, c1, _ = self.clients
        c0.create_block("a0", CFG, layer_index=0, seed=1)
        c1.create_block("b1", CFG, layer_index=1, seed=2)
        model = blockd.RemoteModel([blockd.RemoteSpan(c0, "a0"), blockd.RemoteSpan(c1, "b1")])
        before = [self.state(c0, "a0"), self.state(c1, "b1")]
        # Daemon 0's gradients finite, daemon 1's overflow to inf (a grad_output of 3e38 is finite,
        # its products are not): each stage's backward on its own.
        h = model.stages[0](self.randn(2, 6, 32))
        (h * self.randn(2, 6, 32)).sum().backward()
        y = model.stages[1](h.detach())
        (y * torch.full((2, 6, 32), 3e38)).sum().backward()
        self.assertTrue(c0.grad_norm("a0").finite)
        self.assertFalse(c1.grad_norm("b1").finite)
        result = model.step(max_grad_norm=1.0, **HYPER)
        self.assertTrue(result.skipped)
        self.assertEqual(result.results, [], "no daemon may be asked to step")
        self.assertSameState(self.state(c0, "a0"), before[0], "a0 after a skipped step")
        self.assertSameState(self.state(c1, "b1"), before[1], "b1 after a skipped step")
        self.assertEqual(c0.get_block("a0").step, 0)
        self.assertEqual(c1.get_block("b1").step, 0)


class ReplicaGroupTest(GroupTestBase):
    def test_two_replicas_end_bitwise_identical_and_equal_one_daemon(self):
        c0, c1, c2 = self.clients
        ids = ["w0", "w1"]
        for rank, c in enumerate((c0, c1)):  # different seeds: the join makes them rank 0's
            for i, b in enumerate(ids):
                c.create_block(b, CFG, layer_index=i, seed=10 * rank + i)
        for i, b in enumerate(ids):
            c2.create_block(b, CFG, layer_index=i, seed=i)  # one daemon with rank 0's weights
        group = blockd.ReplicaGroup.form([c0, c1], "dp", ids, timeout_ms=60000)
        self.assertEqual([i.rank for i in group.infos], [0, 1])
        self.assertEqual({i.state for i in group.infos}, {"ready"})
        self.assertBitwise(self.state(c1, "w0")["weights"], self.state(c0, "w0")["weights"], "w0 after the join")
        model = blockd.RemoteModel(group)
        ref = blockd.RemoteSpan(c2, ids)
        opt = blockd.RemoteAdamW(ref, max_grad_norm=0.05, **HYPER)
        params = sum(c0.get_block(b).parameter_count for b in ids)
        for step in range(3):
            x, target = self.randn(4, 5, 32), self.randn(4, 5, 32)  # rows 0-1 to rank 0, 2-3 to rank 1
            bytes_before = c0.get_group("dp").collective_bytes
            (model(x) * target).sum().backward()  # the stage starts averaging as its backward ends
            (ref(x) * target).sum().backward()
            result = model.step(max_grad_norm=0.05, **HYPER)
            moved = c0.get_group("dp").collective_bytes - bytes_before
            norm = opt.step()
            self.assertFalse(result.skipped)
            self.assertLess(result.clip_coefficient, 1.0, "the test must clip")
            self.assertAlmostEqual(result.grad_norm, norm, delta=1e-5 * norm)
            # The overlapped GradNorm all-reduced the gradients; the Step reused its mean (only flags moved).
            self.assertGreaterEqual(moved, 4 * params)
            self.assertLess(moved, 4 * params + 1024, f"step {step}: the gradients were all-reduced twice")
            model.zero_grad()
            opt.zero_grad()
        for b in ids:
            s0, s1 = self.state(c0, b), self.state(c1, b)
            self.assertSameState(s0, s1, f"{b}, rank 0 vs rank 1")
            self.assertEqual(c1.get_block(b).step, 3)
            ref_w = self.state(c2, b)["weights"]
            for name, w in s0["weights"].items():
                err = ((w - ref_w[name]).abs() - (1e-6 + 1e-5 * ref_w[name].abs())).max().item()
                self.assertLessEqual(err, 0, f"{b} {name}: group vs one daemon on the whole batch")
        self.assertEqual([i.steps for i in group.info()], [3, 3])
        group.leave()
        self.assertEqual(c0.list_groups(), [])

    def test_replicas_run_their_forward_and_backward_at_once(self):
        c0, c1, _ = self.clients
        for c in (c0, c1):
            c.create_block("p0", CFG, seed=3)
        group = blockd.ReplicaGroup.form([c0, c1], "par", ["p0"], timeout_ms=60000)
        model = blockd.RemoteModel(group)
        # Each replica's Forward and Backward waits at a barrier for the other's: calls made one
        # after the other would break it (BrokenBarrierError) instead of passing.
        barrier = threading.Barrier(2, timeout=60)
        calls = []

        class MeetingClient:
            def __init__(self, client):
                self.client = client

            def __getattr__(self, name):
                attr = getattr(self.client, name)
                if name not in ("forward", "backward"):
                    return attr

                def meet(*args, **kwargs):
                    calls.append(name)
                    barrier.wait()
                    return attr(*args, **kwargs)
                return meet

        stage = model.stages[0]
        for span in stage.spans:
            span.client = MeetingClient(span.client)
        x, target = self.randn(4, 3, 32), self.randn(4, 3, 32)
        with torch.no_grad():
            plain = model(x)
        out = model(x)
        self.assertTrue(torch.equal(out, plain))
        (out * target).sum().backward()
        self.assertEqual(calls, ["forward"] * 4 + ["backward"] * 2)
        self.assertEqual(c0.get_group("par").world_size, 2)
        result = model.step(**HYPER)
        self.assertFalse(result.skipped)
        self.assertSameState(self.state(c0, "p0"), self.state(c1, "p0"), "p0 after a step")
        group.leave()

    def test_the_scaling_benchmark_measures_a_group_that_stays_in_step(self):
        # bench/scale_replicas.py, small, on two CPU daemons: it forms real groups of 1 and 2,
        # checks the replicas bitwise after its steps, and leaves no block or group behind.
        path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "scale_replicas.py")
        spec = importlib.util.spec_from_file_location("scale_replicas", path)
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        targets = ",".join(d.target for d in self.daemons[:2])
        with contextlib.redirect_stdout(io.StringIO()) as out:
            rows = bench.main([f"--targets={targets}", "--config=tiny", "--place=cpu", "--blocks=2", "--batch=2",
                               "--seq=8", "--iters=1"])
        self.assertEqual([(r["replicas"], r["overlap"]) for r in rows], [(1, "off"), (2, "off"), (1, "on"), (2, "on")])
        self.assertEqual({r["backend"] for r in rows}, {"gloo"})
        self.assertTrue(all(r["tokens"] > 0 for r in rows))
        self.assertIn("== replica scaling: 2 tiny blocks, 2x8 tokens per replica, averaging at the Step ==",
                      out.getvalue())
        self.assertIn("averaging during the Backward ==", out.getvalue())
        for c in self.clients[:2]:
            self.assertEqual(c.list_blocks(), [])
            self.assertEqual(c.list_groups(), [])
        with self.assertRaises(SystemExit):  # more replicas than daemons
            with contextlib.redirect_stderr(io.StringIO()):
                bench.parse_args([f"--targets={targets}", "--replicas=3"])

    def test_a_stage_averages_its_gradients_while_earlier_stages_run_backward(self):
        # Two replicated stages: A (group ga on c0, c1), then B (group gb on c1, c2). B's group
        # GradNorm must start while A's backward is still running: rank 0 of A's Backward waits at a
        # barrier for rank 0 of B's GradNorm, which breaks if B only averaged at step().
        c0, c1, c2 = self.clients
        for c in (c0, c1):
            c.create_block("oa", CFG, layer_index=0, seed=5)
        for c in (c1, c2):
            c.create_block("ob", CFG, layer_index=1, seed=6)
        c0.create_block("ra", CFG, layer_index=0, seed=5)
        c0.create_block("rb", CFG, layer_index=1, seed=6)
        ga = blockd.ReplicaGroup.form([c0, c1], "ga", ["oa"], timeout_ms=60000)
        gb = blockd.ReplicaGroup.form([c1, c2], "gb", ["ob"], timeout_ms=60000)
        model = blockd.RemoteModel([ga, gb])
        ref = blockd.RemoteSpan(c0, ["ra", "rb"])
        barrier = threading.Barrier(2, timeout=60)
        met = []

        class Meeting:
            def __init__(self, client, method):
                self.client, self.method = client, method

            def __getattr__(self, name):
                attr = getattr(self.client, name)
                if name != self.method:
                    return attr

                def meet(*args, **kwargs):
                    if not met.count(name):
                        met.append(name)
                        barrier.wait()
                    return attr(*args, **kwargs)
                return meet

        model.stages[0].spans[0].client = Meeting(c0, "backward")
        gb.clients[0] = Meeting(c1, "grad_norm")
        bytes_before = c1.get_group("gb").collective_bytes
        x, target = self.randn(4, 3, 32), self.randn(4, 3, 32)
        (model(x) * target).sum().backward()
        self.assertEqual(sorted(met), ["backward", "grad_norm"])
        (ref(x) * target).sum().backward()
        self.assertMeanGradient((c0, c1), "oa", c0, "ra")
        self.assertMeanGradient((c1, c2), "ob", c0, "rb")
        result = model.step(max_grad_norm=0.05, **HYPER)
        ref_norm = c0.step(["ra", "rb"], max_grad_norm=0.05, **HYPER).grad_norm
        self.assertAlmostEqual(result.grad_norm, ref_norm, delta=1e-5 * ref_norm)
        params = c1.get_block("ob").parameter_count
        moved = c1.get_group("gb").collective_bytes - bytes_before
        self.assertLess(moved, 4 * params + 1024, "the gradients were all-reduced twice")
        for block, members in (("oa", (c0, c1)), ("ob", (c1, c2))):
            self.assertSameState(self.state(members[0], block), self.state(members[1], block), block)
        ga.leave()
        gb.leave()

    def test_no_sync_accumulates_without_averaging_until_the_last_backward(self):
        c0, c1, c2 = self.clients
        for c in (c0, c1):
            c.create_block("n0", CFG, seed=8)
        c2.create_block("n0", CFG, seed=8)
        group = blockd.ReplicaGroup.form([c0, c1], "ns", ["n0"], timeout_ms=60000)
        model = blockd.RemoteModel(group)
        ref = blockd.RemoteSpan(c2, "n0")
        params = c0.get_block("n0").parameter_count
        batches = [(self.randn(2, 3, 32), self.randn(2, 3, 32)) for _ in range(3)]
        start = c0.get_group("ns").collective_bytes
        with model.no_sync():
            for x, target in batches[:2]:
                (model(x) * target).sum().backward()
        self.assertEqual(c0.get_group("ns").collective_bytes, start, "no_sync averaged the gradients")
        x, target = batches[2]
        (model(x) * target).sum().backward()  # the last micro-batch averages all three
        for x, target in batches:
            (ref(x) * target).sum().backward()
        self.assertMeanGradient((c0, c1), "n0", c2, "n0")
        model.step(**HYPER)
        moved = c0.get_group("ns").collective_bytes - start
        self.assertGreaterEqual(moved, 4 * params)
        self.assertLess(moved, 4 * params + 1024, "accumulated gradients were averaged more than once")
        self.assertSameState(self.state(c0, "n0"), self.state(c1, "n0"), "replicas")
        group.leave()

    def test_bad_group_calls_raise_clear_errors_and_change_nothing(self):
        c0, c1, _ = self.clients
        c0.create_block("h0", CFG, seed=1)
        with self.assertRaises(blockd.NotFoundError) as cm:
            c0.step([], group_id="nope")
        self.assertIn("no group nope", cm.exception.details)
        with self.assertRaises(blockd.NotFoundError):
            c0.leave_group("nope")
        with self.assertRaises(blockd.NotFoundError):
            c0.get_group("nope")
        with self.assertRaises(blockd.InvalidArgumentError) as cm:
            c0.join_group("bad id!", 0, 1, b"x", ["h0"])
        self.assertIn("group_id", cm.exception.details)
        collective_id, backend = c0.get_collective_id()
        self.assertEqual(backend, "gloo")
        with self.assertRaises(blockd.InvalidArgumentError) as cm:
            c0.join_group("g", 2, 2, collective_id, ["h0"])
        self.assertIn("rank = 2", cm.exception.details)
        with self.assertRaises(blockd.InvalidArgumentError):
            c0.get_collective_id("mpi")
        with self.assertRaises(ValueError):
            blockd.ReplicaGroup.form([], "g", ["h0"])
        with self.assertRaises(TypeError):
            blockd.RemoteModel([object()])
        # A group of one works, and GradNorm then Step over it match the plain calls' norm.
        group = blockd.ReplicaGroup.form([c0], "solo", ["h0"], timeout_ms=60000)
        model = blockd.RemoteModel(group)
        (model(self.randn(2, 4, 32)) * self.randn(2, 4, 32)).sum().backward()
        plain = c0.grad_norm(["h0"])
        self.assertEqual(group.grad_norm(), plain)
        with self.assertRaises(blockd.InvalidArgumentError) as cm:
            c0.grad_norm(["h0", "other"], group_id="solo")
        self.assertIn("holds [h0]", cm.exception.details)
        self.assertEqual(c0.list_groups()[0].group_id, "solo")
        self.assertEqual(c0.get_block("h0").step, 0)
        self.assertEqual(c1.list_groups(), [])

    def test_a_group_that_cannot_form_leaves_nothing_behind(self):
        c0, c1, _ = self.clients
        c0.create_block("m0", CFG, seed=1)
        c1.create_block("m0", blockd.BlockConfig(hidden_size=32, num_attention_heads=4, num_kv_heads=2, head_dim=8,
                                                 intermediate_size=64, qk_norm=True), seed=1)
        with self.assertRaises(blockd.FailedPreconditionError) as cm:
            blockd.ReplicaGroup.form([c0, c1], "bad", ["m0"], timeout_ms=60000)
        self.assertIn("intermediate", cm.exception.details)
        self.assertEqual(c0.list_groups(), [])
        self.assertEqual(c1.list_groups(), [])
        # The blocks are free to form a group after all.
        c1.delete_block("m0")
        c1.create_block("m0", CFG, seed=2)
        group = blockd.ReplicaGroup.form([c0, c1], "good", ["m0"], timeout_ms=60000)
        with self.assertRaises(ValueError):
            blockd.RemoteModel(group)(self.randn(0, 3, 32))
        group.leave()

    def test_fewer_rows_than_replicas_train_like_one_daemon(self):
        # Three rows over two replicas (2 + 1) and one row over two (rank 1 unfed): the group's mean
        # is still the whole batch's gradient, and generation's one-row forward works.
        c0, c1, c2 = self.clients
        for c in (c0, c1, c2):
            c.create_block("u0", CFG, seed=4)
        group = blockd.ReplicaGroup.form([c0, c1], "uneven", ["u0"], timeout_ms=60000)
        model = blockd.RemoteModel(group)
        ref = blockd.RemoteSpan(c2, "u0")
        for rows in (3, 1):
            x, target = self.randn(rows, 4, 32), self.randn(rows, 4, 32)
            (model(x) * target).sum().backward()
            (ref(x) * target).sum().backward()
            model.step(**HYPER)
            c2.step(["u0"], **HYPER)
            model.zero_grad()
            ref.zero_grad()
            with torch.no_grad():
                got, want = model(x[:1]), ref(x[:1])
            self.assertLessEqual((got - want).abs().max().item(), 1e-5 * want.abs().max().item(), f"{rows} rows")
        self.assertSameState(self.state(c0, "u0"), self.state(c1, "u0"), "replicas after uneven batches")
        want = self.state(c2, "u0")["weights"]
        for name, w in self.state(c0, "u0")["weights"].items():
            err = ((w - want[name]).abs() - (1e-6 + 1e-5 * want[name].abs())).max().item()
            self.assertLessEqual(err, 0, f"{name}: group vs one daemon")
        group.leave()


if __name__ == "__main__":
    unittest.main()
