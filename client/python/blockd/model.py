"""RemoteModel and ReplicaGroup: a model whose decoder layers live on several daemons, with one
optimizer step over all of it (ARCHITECTURE.md, "Replica groups and models across daemons").

    # Data parallelism: three daemons holding the same blocks average their gradients (Gloo).
    group = ReplicaGroup.form([c0, c1, c2], "dp0", ["layer0", "layer1"])   # JoinGroup on all at once
    # A pipeline: layers 0-1 replicated on c0..c2, layers 2-3 on daemon c3.
    model = RemoteModel([group, RemoteSpan(c3, ["layer2", "layer3"])])
    loss = head(model(embed(tokens))).loss; loss.backward()
    result = model.step(lr=1e-3, max_grad_norm=1.0)    # GradNorm everywhere, then Step with
    model.zero_grad()                                  # the global clip coefficient on each

`RemoteModel.step` clips by the global L2 norm over every daemon, as torch.nn.utils.clip_grad_norm_
over the whole model would: GradNorm on each stage (a replicated stage's is of its replicas' mean
gradients), the client sums them and sends `min(1, max_norm / (norm + 1e-6))` as
Step.clip_coefficient to each. If any gradient is non-finite no daemon steps. A replicated stage
splits each batch over its replicas (rows, as torch.tensor_split), runs the replicas' Forward and
Backward calls at once from its own threads, and scales the gradients it sends each replica so that
the group's mean is the gradient of the whole batch: the result equals one daemon holding the
stage, to rounding.
"""
import collections
import contextlib
import math
from concurrent import futures

import torch
from torch.autograd.function import once_differentiable

from blockd.client import GradNormResult
from blockd.errors import BlockdError
from blockd.span import RemoteSpan, backward_through, forward_keeping

ModelStepResult = collections.namedtuple("ModelStepResult", ["grad_norm", "skipped", "clip_coefficient", "results"])


def _at_once(pool, fn, count):
    """fn(i) for i < count on `pool`'s threads at once; the results in order, or, after every call
    has ended (so none still runs when the caller cleans up), the error that explains the others:
    a member's own refusal before the "other member(s) refused" or ABORTED it caused elsewhere."""
    calls = [pool.submit(fn, i) for i in range(count)]
    futures.wait(calls)
    errors = [f.exception() for f in calls if f.exception() is not None]
    if errors:
        errors.sort(key=lambda e: "other member" in str(e) or "ABORTED" in str(getattr(e, "code", "")))
        raise errors[0]
    return [f.result() for f in calls]


def _on_all(clients, fn):
    """fn(rank, client) on every client at once (group calls block until all members called)."""
    with futures.ThreadPoolExecutor(max_workers=len(clients), thread_name_prefix="blockd-group") as pool:
        return _at_once(pool, lambda r: fn(r, clients[r]), len(clients))


class ReplicaGroup:
    """`world_size` daemons (clients, rank order) holding the same blocks in a replica group.

    Every group call goes to all members at once from threads, as JoinGroup, GradNorm and Step of
    a group need."""

    def __init__(self, clients, group_id, block_ids, infos=None):
        self.clients = list(clients)
        self.group_id = group_id
        self.block_ids = [block_ids] if isinstance(block_ids, str) else list(block_ids)
        self.infos = infos  # the GroupInfos JoinGroup returned, in rank order

    @classmethod
    def form(cls, clients, group_id, block_ids, timeout_ms=0, backend="", timeout=None):
        """GetCollectiveId on clients[0] (rank 0), then JoinGroup on every client at once. Rank 0's
        weights and moments are broadcast to the others. If any member fails to join, the members
        that joined leave again, and the error of the member that caused it is raised."""
        clients = list(clients)
        if not clients:
            raise ValueError("ReplicaGroup.form needs at least one client")
        collective_id, _ = clients[0].get_collective_id(backend, timeout=timeout)
        joined = [False] * len(clients)

        def join(rank, client):
            info = client.join_group(group_id, rank, len(clients), collective_id, block_ids, timeout_ms=timeout_ms,
                                     timeout=timeout)
            joined[rank] = True
            return info

        try:
            infos = _on_all(clients, join)
        except BlockdError:
            for rank, client in enumerate(clients):
                if joined[rank]:
                    try:
                        client.leave_group(group_id)
                    except BlockdError:
                        pass  # the daemon is gone or the group already left: nothing to undo
            raise
        return cls(clients, group_id, block_ids, infos)

    @property
    def world_size(self):
        return len(self.clients)

    def spans(self, wire_dtype="fp32"):
        """One RemoteSpan over the group's blocks per member, in rank order."""
        return [RemoteSpan(c, self.block_ids, wire_dtype=wire_dtype) for c in self.clients]

    def grad_norm(self):
        """GradNormResult of the group's mean gradients (the same on every member). The group Step
        right after reuses the mean rather than all-reducing again."""
        return _on_all(self.clients, lambda r, c: c.grad_norm(group_id=self.group_id))[0]

    def step(self, **hyper):
        """A group Step on every member at once (client.step's keywords: lr, betas, eps,
        weight_decay, decay_norm_weights, max_grad_norm, clip_coefficient). Returns the members'
        StepResults; every replica then holds bitwise-identical weights and moments."""
        return _on_all(self.clients, lambda r, c: c.step((), group_id=self.group_id, **hyper))

    def zero_grad(self):
        _on_all(self.clients, lambda r, c: c.zero_grad(self.block_ids))

    def info(self):
        """Every member's GroupInfo, in rank order."""
        return _on_all(self.clients, lambda r, c: c.get_group(self.group_id))

    def leave(self):
        """LeaveGroup on every member (the blocks stay; they may join another group)."""
        _on_all(self.clients, lambda r, c: c.leave_group(self.group_id))


class _ReplicatedFunction(torch.autograd.Function):
    """The rows of x spread over a group's replicas, every replica's Forward and Backward in flight
    at once. The group averages its n replicas' weight gradients, so each replica is sent its rows'
    output gradient times n (the mean is then the whole batch's gradient) and its input gradient is
    scaled back by 1/n. With fewer rows than replicas, an unfed replica runs its first row with a
    zero output gradient: its weight gradients gain exact zeros, and it has gradients for the group
    Step, which every member needs."""

    @staticmethod
    def forward(ctx, anchor, x, stage, position_offset):
        parts = stage.split(x)
        fed = len(parts)
        parts += [x[:1]] * (len(stage.spans) - fed)
        opened = [None] * len(parts)

        def run(i):
            out, opened[i] = forward_keeping(stage.spans[i], parts[i], position_offset)
            return out

        try:
            outs = _at_once(stage.pool, run, len(parts))
        except BaseException:
            for activation in opened:  # the replicas that did run keep nothing
                if activation is not None:
                    activation.client.release_later(activation.take())
            raise
        ctx.stage, ctx.activations = stage, opened
        ctx.rows = [p.shape[0] for p in parts[:fed]]
        ctx.unfed = [outs[i] for i in range(fed, len(parts))]
        return torch.cat(outs[:fed], dim=0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        stage = ctx.stage
        n = float(len(stage.spans))
        grads = list(torch.split(grad_output, ctx.rows, dim=0))
        fed = len(grads)
        grads = [g * n for g in grads] + [torch.zeros_like(out) for out in ctx.unfed]
        # Averaging as it goes: each member's daemon starts all-reducing a block's gradients as
        # soon as its backward is done (a Gloo group; an NCCL group averages at grad_norm/step).
        group_id = stage.group.group_id if stage.overlap and stage.sync else ""
        grad_inputs = _at_once(
            stage.pool, lambda i: backward_through(stage.spans[i], ctx.activations[i], grads[i], group_id), len(grads))
        stage.after_backward()
        return None, torch.cat([g * (1.0 / n) for g in grad_inputs[:fed]], dim=0), None, None


class _ReplicatedStage(torch.nn.Module):
    """A ReplicaGroup as one stage: rows of a batch spread over the replicas, which run at once."""

    def __init__(self, group, wire_dtype):
        super().__init__()
        self.group = group
        self.spans = torch.nn.ModuleList(group.spans(wire_dtype))
        self.pool = futures.ThreadPoolExecutor(max_workers=len(self.spans), thread_name_prefix="blockd-replica")
        self._anchor = torch.empty(0, requires_grad=True)  # the remote weights always want gradients
        self.overlap = True   # average the gradients as soon as this stage's backward is done
        self.sync = True      # False inside RemoteModel.no_sync()
        self._reducer = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="blockd-reduce")
        self._backwards = 0   # backward passes through this stage so far
        self._pending = None  # (self._backwards when it started, Future of the group's GradNormResult)

    def split(self, x):
        """x's rows in as even parts as they go (torch.tensor_split), one per replica in rank
        order; with fewer rows than replicas the last replicas get none."""
        if x.shape[0] == 0:
            raise ValueError(f"an empty batch cannot be spread over the replicas of group {self.group.group_id}")
        return [p for p in torch.tensor_split(x, len(self.spans), dim=0) if p.shape[0] > 0]

    def forward(self, x, position_offset=0):
        if torch.is_grad_enabled():
            return _ReplicatedFunction.apply(self._anchor, x, self, position_offset)
        parts = self.split(x)
        return torch.cat(_at_once(self.pool, lambda i: self.spans[i](parts[i], position_offset), len(parts)),
                         dim=0)

    def after_backward(self):
        """The stage's gradients for this backward are in: start averaging them over the group
        (GradNorm, whose mean the group Step reuses) while the earlier stages' backward runs."""
        self._backwards += 1
        if self.overlap and self.sync:
            self._settle()
            self._pending = (self._backwards, self._reducer.submit(self.group.grad_norm))

    def _settle(self):
        """Waits for an averaging in flight (no other group call may overlap it); its result if
        no backward has added to the gradients since it started, else None."""
        if self._pending is None:
            return None
        started, future = self._pending
        self._pending = None
        try:
            result = future.result()
        except BlockdError:
            if started == self._backwards:
                raise
            return None  # stale anyway; a broken group says so at its next call
        return result if started == self._backwards else None

    def grad_norm(self):
        done = self._settle()
        return done if done is not None else self.group.grad_norm()

    def step(self, **hyper):
        self._settle()
        return self.group.step(**hyper)[0]

    def zero_grad_remote(self):
        try:
            self._settle()
        except BlockdError:
            pass  # the gradients are being cleared; the group's state shows at its next call
        self.group.zero_grad()


class _SpanStage(torch.nn.Module):
    def __init__(self, span):
        super().__init__()
        self.span = span

    def forward(self, x, position_offset=0):
        return self.span(x, position_offset)

    def grad_norm(self):
        return self.span.client.grad_norm(self.span.block_ids)

    def step(self, **hyper):
        return self.span.client.step(self.span.block_ids, **hyper)

    def zero_grad_remote(self):
        self.span.client.zero_grad(self.span.block_ids)


class RemoteModel(torch.nn.Module):
    """Stages run in order: each a RemoteSpan (blocks on one daemon) or a ReplicaGroup (the same
    blocks on several daemons, the batch's rows spread over them).

    overlap=True (as DDP): a replicated stage starts averaging its gradients over its group (a
    group GradNorm, whose mean the group Step reuses) as soon as its backward is done, while the
    earlier stages' backward and the local modules' still run. Accumulating micro-batches, run all
    but the last backward inside `with model.no_sync():` so that only the last one averages."""

    def __init__(self, stages, wire_dtype="fp32", overlap=True):
        super().__init__()
        if isinstance(stages, (RemoteSpan, ReplicaGroup)):
            stages = [stages]
        built = []
        for s in stages:
            if isinstance(s, RemoteSpan):
                built.append(_SpanStage(s))
            elif isinstance(s, ReplicaGroup):
                built.append(_ReplicatedStage(s, wire_dtype))
            else:
                raise TypeError(f"a RemoteModel stage is a RemoteSpan or a ReplicaGroup, not {type(s).__name__}")
        if not built:
            raise ValueError("RemoteModel needs at least one stage")
        for stage in built:
            if isinstance(stage, _ReplicatedStage):
                stage.overlap = bool(overlap)
        self.stages = torch.nn.ModuleList(built)

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside only accumulate gradients on each replica; the first backward
        after it (or the step) averages them. As DistributedDataParallel.no_sync."""
        replicated = [s for s in self.stages if isinstance(s, _ReplicatedStage)]
        before = [s.sync for s in replicated]
        for s in replicated:
            s.sync = False
        try:
            yield
        finally:
            for s, was in zip(replicated, before):
                s.sync = was

    def forward(self, x, position_offset=0):
        for stage in self.stages:
            x = stage(x, position_offset)
        return x

    def grad_norm(self):
        """GradNormResult over the whole model: the sum of squares of every stage's gradients (a
        replicated stage's mean gradients), and whether all are finite."""
        parts = [stage.grad_norm() for stage in self.stages]
        total = 0.0
        for p in parts:  # in stage order, as one daemon's Step sums its blocks: the same bits
            total += p.sum_of_squares
        return GradNormResult(total, all(p.finite for p in parts) and math.isfinite(total))

    @torch.no_grad()
    def step(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, decay_norm_weights=False,
             max_grad_norm=0.0):
        """One AdamW step of every stage, clipped by the global norm over all daemons when
        max_grad_norm > 0 (torch.nn.utils.clip_grad_norm_'s coefficient). Non-finite gradients
        anywhere: no daemon steps (skipped=True); zero_grad() as usual. Returns
        ModelStepResult(grad_norm before clipping, skipped, clip_coefficient, [StepResult per stage]).

        Not atomic across daemons: if a daemon fails mid-way, the stages stepped before it keep
        their step (restore a checkpoint to get back in line)."""
        if not max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm = {max_grad_norm}, expected >= 0 (0: no clipping)")
        norm = self.grad_norm()
        grad_norm = math.sqrt(norm.sum_of_squares) if norm.finite else math.inf
        if not norm.finite:
            return ModelStepResult(grad_norm, True, 0.0, [])
        coefficient = 0.0  # 0: not given, the daemons do not clip
        if max_grad_norm > 0:
            coefficient = min(1.0, max_grad_norm / (grad_norm + 1e-6))
        hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decay_norm_weights=decay_norm_weights,
                     clip_coefficient=coefficient)
        results = [stage.step(**hyper) for stage in self.stages]
        return ModelStepResult(grad_norm, any(r.skipped for r in results), coefficient, results)

    def zero_grad(self, set_to_none=True):
        """Clears the remote gradients of every stage (and the local ones of any submodules)."""
        super().zero_grad(set_to_none=set_to_none)
        for stage in self.stages:
            stage.zero_grad_remote()
