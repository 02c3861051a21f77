"""RemoteAdamW: torch.optim-shaped AdamW whose state lives on blockd.

    opt = RemoteAdamW(span, lr=3e-4, weight_decay=0.1, max_grad_norm=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    for batch in data:
        loss = model(batch); loss.backward()
        grad_norm = opt.step()              # Step on the server with each group's lr/betas/eps/...
        opt.zero_grad(); sched.step()

Each param group names blocks instead of tensors ({'span': RemoteSpan} or {'block_ids': [...],
'client': Client}) and carries lr, betas, eps, weight_decay, max_grad_norm, decay_norm_weights.
Groups of one client with equal hyperparameters go out as one Step, so max_grad_norm clips by the
global norm over all of their blocks. The moments stay on the server (SaveCheckpoint keeps them);
state_dict() carries only the hyperparameters.

A RemoteModel (blocks on several daemons, stages possibly replica groups) is one param group of
its own: step() is RemoteModel.step with the group's hyperparameters (global clipping over every
daemon), so schedulers drive it like any optimizer: `RemoteAdamW(model, lr=3e-4, max_grad_norm=1)`.
"""
import math

import torch

from blockd.model import RemoteModel
from blockd.span import RemoteSpan

_HYPER = ("lr", "betas", "eps", "weight_decay", "max_grad_norm", "decay_norm_weights")


class RemoteAdamW(torch.optim.Optimizer):
    def __init__(self, spans, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, max_grad_norm=0.0,
                 decay_norm_weights=False):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                        decay_norm_weights=decay_norm_weights)
        self._check(defaults)
        if isinstance(spans, (RemoteSpan, RemoteModel, dict)):
            spans = [spans]
        groups = [self._group_of(s) for s in spans]
        if not groups:
            raise ValueError("RemoteAdamW got no spans")
        self.grad_norm = None     # the global norm reported by the last step()
        self.skipped = False      # whether the last step() was skipped for non-finite gradients
        self.last_results = []    # the StepResults of the last step()
        super().__init__(groups, defaults)

    @staticmethod
    def _check(h):
        if not (h["lr"] >= 0 and math.isfinite(h["lr"])):
            raise ValueError(f"lr = {h['lr']}, expected a finite number >= 0")
        b1, b2 = h["betas"]
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas = {h['betas']}, expected numbers in [0, 1)")
        if not h["eps"] > 0:
            raise ValueError(f"eps = {h['eps']}, expected > 0")
        if not h["weight_decay"] >= 0:
            raise ValueError(f"weight_decay = {h['weight_decay']}, expected >= 0")
        if not h["max_grad_norm"] >= 0:
            raise ValueError(f"max_grad_norm = {h['max_grad_norm']}, expected >= 0 (0: no clipping)")

    @staticmethod
    def _group_of(s):
        if isinstance(s, RemoteSpan):
            s = {"span": s}
        if isinstance(s, RemoteModel):
            s = {"model": s}
        g = dict(s)
        if g.get("model") is not None:
            g.update(block_ids=[], client=None, params=[torch.empty(0)])
            return g
        span = g.pop("span", None)
        if span is not None:
            g.setdefault("block_ids", list(span.block_ids))
            g.setdefault("client", span.client)
        if not g.get("block_ids") or g.get("client") is None:
            raise ValueError("a RemoteAdamW param group needs a 'span', or 'block_ids' and a 'client'")
        g["block_ids"] = list(g["block_ids"])
        # torch.optim.Optimizer wants tensors; an empty leaf stands in for the remote weights.
        g["params"] = [torch.empty(0)]
        return g

    def add_param_group(self, param_group):
        if "client" not in param_group:
            param_group = self._group_of(param_group)
        seen = {(id(g["client"]), b) for g in self.param_groups for b in g["block_ids"]}
        for b in param_group["block_ids"]:
            if (id(param_group["client"]), b) in seen:
                raise ValueError(f"block {b} is in more than one RemoteAdamW param group")
            seen.add((id(param_group["client"]), b))
        super().add_param_group(param_group)
        self._check(self.param_groups[-1])

    def _calls(self):
        """[(client, block_ids, hyper)]: one Step per client and set of hyperparameters."""
        calls = {}
        for g in self.param_groups:
            hyper = tuple((k, tuple(g[k]) if k == "betas" else g[k]) for k in _HYPER)
            key = (id(g["client"]), hyper)
            if key not in calls:
                calls[key] = (g["client"], [], dict(hyper))
            calls[key][1].extend(g["block_ids"])
        return list(calls.values())

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step of every group's blocks. Returns the global gradient norm before
        clipping (over all the blocks stepped); the closure's loss, if any, is in `last_loss`."""
        self.last_loss = None
        if closure is not None:
            with torch.enable_grad():
                self.last_loss = closure()
        models = [g for g in self.param_groups if g.get("model") is not None]
        if models:
            if len(self.param_groups) != 1:
                raise ValueError("a RemoteModel steps all of its stages at once: make it the optimizer's only param group")
            g = models[0]
            r = g["model"].step(**{k: g[k] for k in _HYPER})
            self.last_results, self.skipped, self.grad_norm = r.results, r.skipped, r.grad_norm
            return self.grad_norm
        calls = self._calls()
        if len(calls) > 1 and any(h["max_grad_norm"] > 0 for _, _, h in calls):
            raise ValueError("max_grad_norm clips by one global norm, but these param groups differ in client or "
                             "hyperparameters and need separate Steps; give them equal settings or clip per group")
        results = [client.step(ids, **h) for client, ids, h in calls]
        self.last_results = results
        self.skipped = any(r.skipped for r in results)
        self.grad_norm = math.sqrt(sum(r.grad_norm ** 2 for r in results))
        return self.grad_norm

    def zero_grad(self, set_to_none=True):
        """ZeroGrad on the server for every group's blocks."""
        by_client = {}
        for g in self.param_groups:
            if g.get("model") is not None:
                g["model"].zero_grad()
                continue
            by_client.setdefault(id(g["client"]), (g["client"], []))[1].extend(g["block_ids"])
        for client, ids in by_client.values():
            client.zero_grad(ids)

    def state_dict(self):
        sd = super().state_dict()
        for g in sd["param_groups"]:
            g.pop("client", None)
            g.pop("model", None)
        return sd

    def load_state_dict(self, state_dict):
        remotes = [(g["client"], g.get("model")) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, (c, m) in zip(self.param_groups, remotes):
            g["client"] = c
            if m is not None:
                g["model"] = m
