"""RemoteCausalLM: text generation with a model's decoder layers on blockd, through inference sessions.

    model = blockd.RemoteCausalLM.from_hf("/models/Qwen3-0.6B", "localhost:50051")  # after import_hf
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=32)               # greedy
    out = model.generate(ids, max_new_tokens=32, do_sample=True, temperature=0.8, top_p=0.9,
                         generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=32, num_beams=4, eos_token_id=2)
    model.generate(ids, max_new_tokens=32, streamer=blockd.TokenStreamer(print))   # tokens as they come

The embedding, final RMSNorm and LM head are local torch modules; the decoder layers are one or
more spans on one or more daemons, run in order. With use_cache (the default) generate opens one
session per span (OpenSession: the whole KV cache reserved up front), runs the prompt as one step
(prefill), then one step per new token on one Infer stream per span; beam search reorders the
cached rows with hypo_ids. use_cache=False recomputes the whole sequence with Forward at every
step: the reference that sessions are tested against and the speed they are measured against.
The sessions are closed when generate returns or raises.

generate's arguments and result follow Hugging Face transformers' GenerationMixin.generate: the
same names and defaults (top_k=50 when sampling), the same order of logits warpers (temperature,
top-k, top-p), finished rows padded with pad_token_id (default: the first eos id), beam search with
length_penalty and early_stopping, and a streamer with put()/end() (HF's TextStreamer works).
"""
import collections

import torch
import torch.nn.functional as F
from torch import nn

from blockd.client import Client
from blockd.errors import BlockdError, NotFoundError

GenerateOutput = collections.namedtuple("GenerateOutput", ["sequences", "logits"])


class TokenStreamer:
    """A streamer for generate(): calls on_tokens(list of new token ids, one per row) at each step,
    and also iterates them (run generate in another thread and `for tokens in streamer`).
    put()/end() are Hugging Face's streamer interface; put() first receives the prompt, which is
    skipped unless skip_prompt=False."""

    def __init__(self, on_tokens=None, skip_prompt=True):
        import queue
        self.on_tokens = on_tokens
        self.skip_prompt = skip_prompt
        self.tokens = []  # every step's new tokens, one list per step
        self._queue = queue.SimpleQueue()
        self._prompt_seen = False
        self.ended = False

    def put(self, value):
        rows = value.tolist() if isinstance(value, torch.Tensor) else list(value)
        if not self._prompt_seen:
            self._prompt_seen = True
            if self.skip_prompt:
                return
        self.tokens.append(rows)
        if self.on_tokens is not None:
            self.on_tokens(rows)
        self._queue.put(rows)

    def end(self):
        self.ended = True
        self._queue.put(None)

    def __iter__(self):
        return iter(self._queue.get, None)


class _Stage:
    """One span of the model: a client and its blocks' ids, in order."""

    def __init__(self, client, block_ids, owns_client):
        self.client, self.block_ids, self.owns_client = client, list(block_ids), owns_client

    def __repr__(self):
        return f"{self.client.target}:{self.block_ids}"


def _stages(spans, client_kwargs):
    out = []
    for item in spans:
        if hasattr(item, "client") and hasattr(item, "block_ids"):  # a RemoteSpan
            out.append(_Stage(item.client, item.block_ids, False))
            continue
        try:
            where, block_ids = item
        except (TypeError, ValueError):
            raise TypeError(f"spans: expected RemoteSpan or (target or Client, block_ids) items, got {item!r}") from None
        if isinstance(block_ids, str):
            block_ids = [block_ids]
        if not block_ids:
            raise ValueError(f"spans: the span on {where!r} names no blocks")
        if isinstance(where, Client):
            out.append(_Stage(where, block_ids, False))
        else:
            out.append(_Stage(Client(where, **client_kwargs), block_ids, True))
    if not out:
        raise ValueError("RemoteCausalLM needs at least one span of blocks")
    return out


class _SessionRunner:
    """Next-token logits through one session per span; step() appends the new tokens to the caches."""

    def __init__(self, model, rows, max_length, use_stream):
        self.model = model
        self.opened = []  # (stage, session_id, stream or None)
        try:
            for stage in model.stages:
                info = stage.client.open_session(stage.block_ids, rows, max_length)
                stream = stage.client.infer_stream() if use_stream else None
                self.opened.append((stage, info.session_id, stream))
        except BaseException:
            self.close(quiet=True)
            raise

    def __call__(self, tokens, hypo_ids):
        h = self.model.embed(tokens)
        for stage, session_id, stream in self.opened:
            step = stream.step if stream is not None else stage.client.infer_step
            h = step(session_id, h, hypo_ids=hypo_ids, dtype=self.model.wire_dtype).hidden_states
        return self.model.logits(h[:, -1])

    def close(self, quiet=False):
        """Closes every session opened; raises the first failure unless quiet (generate already
        raising). A session already gone (expired, its block deleted) is not a failure."""
        first = None
        for stage, session_id, stream in self.opened:
            try:
                if stream is not None:
                    stream.close()
                stage.client.close_session(session_id)
            except NotFoundError:
                pass
            except BlockdError as e:
                first = first or e
        self.opened = []
        if first is not None and not quiet:
            raise first


class _RecomputeRunner:
    """Next-token logits by Forward of the whole sequence (no cache)."""

    def __init__(self, model):
        self.model = model
        self.tokens = None

    def __call__(self, tokens, hypo_ids):
        if self.tokens is None:
            self.tokens = tokens
        else:
            if hypo_ids is not None:
                self.tokens = self.tokens[torch.as_tensor(hypo_ids, dtype=torch.long)]
            self.tokens = torch.cat([self.tokens, tokens], dim=1)
        return self.model.logits(self.model.hidden_states(self.tokens)[:, -1])

    def close(self, quiet=False):
        pass


def _as_eos_list(eos_token_id):
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(e) for e in eos_token_id]


def _warp(logits, temperature, top_k, top_p):
    """Hugging Face's sampling warpers, in its order: temperature, top-k, top-p (at least one token kept)."""
    scores = logits / temperature if temperature != 1.0 else logits
    if top_k:
        k = min(top_k, scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, sorted_indices, remove), -float("inf"))
    return scores


class _BeamHypotheses:
    """The num_beams best finished hypotheses of one prompt (Hugging Face's BeamHypotheses)."""

    def __init__(self, num_beams, length_penalty, early_stopping):
        self.num_beams, self.length_penalty, self.early_stopping = num_beams, length_penalty, early_stopping
        self.beams = []  # (score, tokens)
        self.worst_score = 1e9

    def add(self, tokens, sum_logprobs, generated_len):
        score = sum_logprobs / (generated_len ** self.length_penalty)
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, tokens))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs, generated_len):
        if len(self.beams) < self.num_beams:
            return False
        if self.early_stopping:
            return True
        return self.worst_score >= best_sum_logprobs / generated_len ** self.length_penalty


class RemoteCausalLM(nn.Module):
    """A causal LM: local `embed` (nn.Embedding), the decoder layers as `spans` on blockd daemons,
    local `norm` and `head`. spans: a list of RemoteSpan or (target or Client, [block ids]), run in
    order; targets given as strings get their own Client (client_kwargs: token, tls, timeout, ...),
    closed by close(). wire_dtype: "fp32" or "bf16" hidden states on the wire. use_stream: the
    steps of a session go on one Infer stream (else one InferStep call each)."""

    def __init__(self, embed, spans, norm, head, wire_dtype="fp32", use_stream=True, client_kwargs=None):
        super().__init__()
        self.embed, self.norm, self.head = embed, norm, head
        self.stages = _stages(spans, dict(client_kwargs or {}))
        self.wire_dtype = wire_dtype
        self.use_stream = use_stream

    @classmethod
    def from_hf(cls, path, target, block_ids=None, prefix=None, dtype=None, **kwargs):
        """The model of a Hugging Face checkpoint directory whose layers were imported with
        blockd.hf.import_hf (or `blockctl import-hf`): embedding, final norm and LM head read from
        the checkpoint here, the layers the blocks f"{prefix}{N}" (import_hf's default prefix
        unless given) on `target` (a "host:port" or a Client). Or pass `block_ids`: the ids in
        layer order on `target`, or a list of (target, ids) spans for a model across daemons."""
        from blockd import hf
        with hf.HFCheckpoint(path) as ckpt:
            num_layers = ckpt.num_layers
        if block_ids is None:
            prefix = hf.default_prefix(path) if prefix is None else prefix
            block_ids = [f"{prefix}{i}" for i in range(num_layers)]
        spans = block_ids if block_ids and not isinstance(block_ids[0], str) else [(target, block_ids)]
        count = sum(len([ids] if isinstance(ids, str) else ids) for _, ids in spans)
        if count != num_layers:
            raise ValueError(f"{path} has {num_layers} decoder layers, the spans name {count} blocks")
        embed, norm, head = hf.client_modules(path, dtype=dtype)
        return cls(embed, spans, norm, head, **kwargs)

    def close(self):
        """Closes the clients this model opened."""
        for stage in self.stages:
            if stage.owns_client:
                stage.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the model ----------------------------------------------------------------------------
    @torch.no_grad()
    def hidden_states(self, input_ids):
        """The last layer's hidden states of input_ids [batch, seq], by Forward (no cache)."""
        h = self.embed(input_ids)
        for stage in self.stages:
            h = stage.client.forward(stage.block_ids, h, dtype=self.wire_dtype).output
        return h

    @torch.no_grad()
    def logits(self, hidden):
        return self.head(self.norm(hidden)).float()

    def forward(self, input_ids):
        """Logits [batch, seq, vocab] of input_ids, by Forward of the whole sequence."""
        return self.logits(self.hidden_states(input_ids))

    # -- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens=20, do_sample=False, temperature=1.0, top_k=50, top_p=1.0,
                 num_beams=1, eos_token_id=None, pad_token_id=None, streamer=None, use_cache=True,
                 generator=None, length_penalty=1.0, early_stopping=False, return_dict_in_generate=False,
                 output_logits=False):
        """Continues input_ids [batch, prompt] (a LongTensor or a list of ids) by up to
        max_new_tokens tokens each: greedy, sampling (do_sample; temperature, top_k, top_p;
        `generator` makes it reproducible) or beam search (num_beams > 1). A row stops at any
        token of eos_token_id (an id or a list) and is padded with pad_token_id after it; generation
        stops when every row has. streamer: put(tokens)/end() (see TokenStreamer), not with beams.
        Returns the sequences [batch, prompt + new] or, with return_dict_in_generate,
        GenerateOutput(sequences, logits: one [rows, vocab] tensor per step when output_logits)."""
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids: expected [batch, prompt] with batch, prompt >= 1, got {list(input_ids.shape)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens = {max_new_tokens!r}: expected an int >= 0")
        if not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams = {num_beams!r}: expected an int >= 1")
        if do_sample:
            if not temperature > 0:
                raise ValueError(f"temperature = {temperature!r}: expected > 0 when sampling")
            if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
                raise ValueError(f"top_k = {top_k!r}: expected an int >= 0 (0 or None: no top-k)")
            if top_p is not None and not 0 < top_p <= 1:
                raise ValueError(f"top_p = {top_p!r}: expected 0 < top_p <= 1")
            if num_beams > 1:
                raise ValueError("do_sample with num_beams > 1 (beam sampling) is not supported: sample or search")
        if streamer is not None and num_beams > 1:
            raise ValueError("a streamer cannot follow beam search (the best beam is known only at the end)")
        eos = _as_eos_list(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        if max_new_tokens == 0:
            seqs = input_ids.clone()
            return GenerateOutput(seqs, ()) if return_dict_in_generate else seqs
        rows = input_ids.shape[0] * num_beams
        # The last token is never fed back: the cache holds the prompt and max_new_tokens - 1 tokens.
        max_length = input_ids.shape[1] + max_new_tokens - 1
        runner = (_SessionRunner(self, rows, max_length, self.use_stream) if use_cache else _RecomputeRunner(self))
        raw_logits = []
        try:
            if num_beams == 1:
                seqs = self._sample(runner, input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, eos, pad,
                                    streamer, generator, raw_logits)
            else:
                seqs = self._beam_search(runner, input_ids, max_new_tokens, num_beams, eos, pad, length_penalty,
                                         early_stopping, raw_logits)
        except BaseException:
            runner.close(quiet=True)
            raise
        runner.close()
        if streamer is not None:
            streamer.end()
        if return_dict_in_generate:
            return GenerateOutput(seqs, tuple(raw_logits) if output_logits else ())
        return seqs

    def _sample(self, runner, input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, eos, pad, streamer,
                generator, raw_logits):
        if streamer is not None:
            streamer.put(input_ids.cpu())
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool)
        eos_t = torch.tensor(eos, dtype=torch.long)
        new = []
        logits = runner(input_ids, None)
        for step in range(max_new_tokens):
            raw_logits.append(logits)
            if do_sample:
                probs = F.softmax(_warp(logits, temperature, top_k, top_p), dim=-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                token = logits.argmax(dim=-1)
            if eos:
                token = torch.where(unfinished, token, torch.full_like(token, pad))
            new.append(token)
            if streamer is not None:
                streamer.put(token)
            if eos:
                unfinished &= ~torch.isin(token, eos_t)
            if step + 1 == max_new_tokens or not unfinished.any():
                break
            logits = runner(token[:, None], None)
        return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)

    def _beam_search(self, runner, input_ids, max_new_tokens, num_beams, eos, pad, length_penalty, early_stopping,
                     raw_logits):
        """Hugging Face's beam search: per prompt, the 2·num_beams best continuations of all beams;
        an eos among the first num_beams finishes a hypothesis, the others continue."""
        batch, prompt_len = input_ids.shape
        seqs = input_ids.repeat_interleave(num_beams, dim=0)
        beam_scores = torch.zeros(batch, num_beams, dtype=torch.float32)
        beam_scores[:, 1:] = -1e9  # the beams start identical: continue only the first
        beam_scores = beam_scores.view(-1)
        hyps = [_BeamHypotheses(num_beams, length_penalty, early_stopping) for _ in range(batch)]
        done = [False] * batch
        logits = runner(seqs, None)
        for step in range(max_new_tokens):
            raw_logits.append(logits)
            vocab = logits.shape[-1]
            scores = F.log_softmax(logits, dim=-1) + beam_scores[:, None]
            top_scores, top_idx = torch.topk(scores.view(batch, num_beams * vocab), max(2, 1 + len(eos)) * num_beams,
                                             dim=1, largest=True, sorted=True)
            src, tokens = top_idx // vocab, top_idx % vocab
            next_scores, next_tokens, next_rows = [], [], []
            generated_len = step + 1  # counting the token chosen now
            for b in range(batch):
                if done[b]:
                    next_scores += [0.0] * num_beams
                    next_tokens += [pad] * num_beams
                    next_rows += [b * num_beams] * num_beams
                    continue
                kept = 0
                for rank in range(top_idx.shape[1]):
                    row, token, score = b * num_beams + int(src[b, rank]), int(tokens[b, rank]), float(top_scores[b, rank])
                    if token in eos:
                        if rank < num_beams:
                            hyps[b].add(seqs[row].clone(), score, generated_len)
                        continue
                    next_scores.append(score)
                    next_tokens.append(token)
                    next_rows.append(row)
                    kept += 1
                    if kept == num_beams:
                        break
                done[b] = hyps[b].is_done(float(top_scores[b].max()), generated_len)
            beam_scores = torch.tensor(next_scores, dtype=torch.float32)
            hypo_ids = torch.tensor(next_rows, dtype=torch.long)
            token = torch.tensor(next_tokens, dtype=torch.long)
            seqs = torch.cat([seqs[hypo_ids], token[:, None]], dim=1)
            if all(done) or step + 1 == max_new_tokens:
                break
            logits = runner(token[:, None], hypo_ids.tolist())
        for b in range(batch):
            if not done[b]:
                for i in range(num_beams):
                    row = b * num_beams + i
                    hyps[b].add(seqs[row].clone(), float(beam_scores[row]), seqs.shape[1] - prompt_len)
        best = [max(h.beams, key=lambda sb: sb[0])[1] for h in hyps]
        longest = max(len(t) for t in best)
        width = min(longest + 1, prompt_len + max_new_tokens) if eos else longest
        out = torch.full((batch, width), pad, dtype=torch.long)
        for b, t in enumerate(best):
            out[b, :len(t)] = t
            if len(t) < width and eos:
                out[b, len(t)] = eos[0]
        return out
