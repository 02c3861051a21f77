"""Hugging Face Llama / Qwen2 / Qwen3 checkpoints: decoder layers into blockd, the rest to the client.

    ids = import_hf(client, "/models/Qwen3-0.6B")          # one block per layer, weights loaded
    embed, norm, head = client_modules("/models/Qwen3-0.6B")  # torch modules for the client side

A checkpoint directory holds config.json and one or more *.safetensors shards (several shards come
with model.safetensors.index.json). Layer N's tensors are "model.layers.N.<name>" with the names of
a blockd block, so they load with no transposes; bf16 and fp16 weights travel as they are stored
and the server converts them to its fp32 master weights exactly.
"""
import glob
import json
import os
import re

import numpy as np

from blockd.config import HF_MODEL_TYPES, BlockConfig, UnsupportedConfigError, hf_num_layers
from blockd.errors import AlreadyExistsError, BlockdError, NotFoundError
from blockd.progress import Progress
from blockd.safetensors import SafetensorsFile

SUPPORTED_MODEL_TYPES = HF_MODEL_TYPES  # the name this module gave them before config.py owned them
_WIRE = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
# Buffers some older conversions saved that blocks recompute (RoPE inverse frequencies).
_RECOMPUTED = {"self_attn.rotary_emb.inv_freq"}


class CheckpointError(UnsupportedConfigError):
    """The checkpoint is malformed, or holds a model a blockd block cannot compute (its config.json
    refusals are BlockConfig.from_hf's, shared with blockctl)."""


class HFCheckpoint:
    """The config and tensors of a Hugging Face checkpoint directory."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        config_path = os.path.join(self.path, "config.json")
        if not os.path.isfile(config_path):
            raise CheckpointError(f"{self.path}: no config.json (expected a Hugging Face checkpoint directory)")
        with open(config_path) as f:
            config = json.load(f)
        # Multimodal wrappers keep the language model's fields in text_config, as blockctl reads them.
        self.config = config["text_config"] if isinstance(config.get("text_config"), dict) else config
        self._files = {}
        self._where = {}  # tensor name -> shard file name
        try:
            self._index()
        except BaseException:
            self.close()
            raise

    def _index(self):
        index_path = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no weight_map")
            for name, shard in weight_map.items():
                if os.path.basename(shard) != shard or not os.path.isfile(os.path.join(self.path, shard)):
                    raise CheckpointError(f"{index_path}: tensor {name} is in {shard!r}, which is not a file here")
                self._where[name] = shard
        else:
            shards = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.path, "*.safetensors")))
            if not shards:
                raise CheckpointError(f"{self.path}: no *.safetensors files")
            for shard in shards:
                for name in self._file(shard).keys():
                    if name in self._where:
                        raise CheckpointError(f"{self.path}: tensor {name} is in both {self._where[name]} and {shard}")
                    self._where[name] = shard

    # -- tensors ------------------------------------------------------------------------------
    def _file(self, shard):
        if shard not in self._files:
            self._files[shard] = SafetensorsFile(os.path.join(self.path, shard))
        return self._files[shard]

    def names(self):
        return list(self._where)

    def __contains__(self, name):
        return name in self._where

    def _shard_of(self, name):
        try:
            f = self._file(self._where[name])
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {name}") from None
        if name not in f:
            raise CheckpointError(f"{self.path}: the index puts {name} in {self._where[name]}, which lacks it")
        return f

    def raw(self, name):
        """(stored array, safetensors dtype); BF16 as uint16 bit patterns."""
        return self._shard_of(name).raw(name)

    def get(self, name):
        """A tensor as a float32 numpy array."""
        return self._shard_of(name).get(name)

    def nbytes(self, name):
        return self._shard_of(name).nbytes(name)

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the model ----------------------------------------------------------------------------
    @property
    def model_type(self):
        return self.config.get("model_type", "")

    @property
    def num_layers(self):
        try:
            return hf_num_layers(self.config)
        except UnsupportedConfigError as e:
            raise CheckpointError(str(e)) from None

    def block_config(self):
        """The BlockConfig of every layer; refuses what a blockd block cannot compute."""
        try:
            return BlockConfig.from_hf(self.config)
        except UnsupportedConfigError as e:
            raise CheckpointError(str(e)) from None

    def layer_tensors(self, layer, config=None):
        """{block tensor name: (stored array, wire dtype)} of one layer, checked against the config."""
        config = config or self.block_config()
        prefix = f"model.layers.{layer}."
        present = {n[len(prefix):] for n in self._where if n.startswith(prefix)} - _RECOMPUTED
        expected = config.param_shapes()
        extra = sorted(present - set(expected))
        if extra:
            raise CheckpointError(f"layer {layer} has tensors a blockd block cannot hold: {', '.join(extra)}")
        missing = [n for n in expected if n not in present]
        if missing:
            raise CheckpointError(f"layer {layer} lacks {', '.join(prefix + n for n in missing)}")
        out = {}
        for name, shape in expected.items():
            a, dtype = self.raw(prefix + name)
            if tuple(a.shape) != tuple(shape):
                raise CheckpointError(f"{prefix}{name} has shape {list(a.shape)}, config.json implies {list(shape)}")
            if dtype not in _WIRE:
                if dtype != "F64":
                    raise CheckpointError(f"{prefix}{name} has dtype {dtype}, expected BF16, F16, F32 or F64")
                a, dtype = a.astype(np.float32), "F32"
            out[name] = (a, _WIRE[dtype])
        return out


def default_prefix(path):
    """Block ids "<checkpoint dir name>/layer<N>", with characters blockd refuses replaced."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(os.path.abspath(path))) or "model"
    return f"{base[:100]}/layer"


def _parse_layers(layers, n):
    if layers is None:
        return list(range(n))
    if isinstance(layers, str):
        if ":" in layers:
            a, b = layers.split(":", 1)
            return list(range(int(a) if a else 0, int(b) if b else n))
        return [int(x) for x in layers.split(",")]
    return [int(x) for x in layers]


def import_hf(client, path, prefix=None, layers=None, precision=None, device=0, max_seq_len=0, max_batch_size=0,
              replace=False, progress=None, chunk_bytes=None, frozen=False, lora=None, timeout=None):
    """Creates one block per decoder layer of the checkpoint at `path` and loads its weights.

    Block ids are f"{prefix}{N}" (default prefix: default_prefix(path)); `layers` picks a subset
    ("0:12", "3,4" or a list). With replace=True blocks already holding those ids are deleted
    first; otherwise an existing id fails the import. Every layer is checked before the first
    block is created; if anything fails later, the blocks this call created are deleted again.
    progress: None (a bar when stderr is a terminal), True or False. frozen=True creates frozen
    blocks (weights only: serving, or a base that is not trained); lora=LoraConfig(...) adds LoRA
    adapters to every block (fine-tuning a frozen base: frozen=True, lora=...). Returns the block ids in
    layer order."""
    with HFCheckpoint(path) as ckpt:
        config = ckpt.block_config()
        chosen = _parse_layers(layers, ckpt.num_layers)
        for i in chosen:
            if not 0 <= i < ckpt.num_layers:
                raise CheckpointError(f"layer {i}: the checkpoint has layers 0..{ckpt.num_layers - 1}")
        prefix = default_prefix(path) if prefix is None else prefix
        # Check every layer before touching the server (the arrays are views of the mapped shards).
        plan = [(i, ckpt.layer_tensors(i, config)) for i in chosen]
        total = sum(a.nbytes for _, tensors in plan for a, _ in tensors.values())
        bar = Progress(total, f"import {os.path.basename(ckpt.path)}", unit="B",
                       enabled=None if progress is None else bool(progress))
        created = []
        try:
            for i, tensors in plan:
                block_id = f"{prefix}{i}"
                bar.set_postfix(block_id)
                if replace:
                    try:
                        client.delete_block(block_id, timeout=timeout)
                    except NotFoundError:
                        pass
                try:
                    client.create_block(block_id, config, layer_index=i, precision=precision, device=device,
                                        max_seq_len=max_seq_len, max_batch_size=max_batch_size, frozen=frozen,
                                        lora=lora, timeout=timeout)
                except AlreadyExistsError as e:
                    raise AlreadyExistsError(e.code, f"{e.details} (import with replace=True / --replace to "
                                                     f"overwrite it)", e.method) from None
                created.append(block_id)
                # One stream per block (the block changes only when the whole stream was good),
                # each tensor in its stored dtype.
                client.load_weights(block_id, [(n, arr, wire) for n, (arr, wire) in tensors.items()],
                                    chunk_bytes=chunk_bytes, timeout=timeout, on_chunk=bar.update)
        except BaseException:
            bar.close()
            for block_id in created:
                try:
                    client.delete_block(block_id, timeout=timeout)
                except BlockdError:
                    pass
            raise
        bar.close()
        return [f"{prefix}{i}" for i in chosen]


# -- the client side ---------------------------------------------------------------------------
def load_client_weights(path):
    """{"embed_tokens": [vocab, hidden], "norm": [hidden], "lm_head": [vocab, hidden]} as float32
    numpy arrays, and "tied": whether lm_head is the embedding (tie_word_embeddings)."""
    with HFCheckpoint(path) as ckpt:
        out = {"embed_tokens": ckpt.get("model.embed_tokens.weight"), "norm": ckpt.get("model.norm.weight")}
        if "lm_head.weight" in ckpt:
            out["lm_head"], out["tied"] = ckpt.get("lm_head.weight"), False
        elif ckpt.config.get("tie_word_embeddings", False):
            out["lm_head"], out["tied"] = out["embed_tokens"], True
        else:
            raise CheckpointError(f"{ckpt.path}: no lm_head.weight and tie_word_embeddings is not set")
        out["rms_norm_eps"] = float(ckpt.config.get("rms_norm_eps", 1e-6))
        return out


def client_modules(path, dtype=None):
    """(torch.nn.Embedding, blockd.RMSNorm, torch.nn.Linear) holding the checkpoint's embedding,
    final norm and LM head (float32 unless `dtype`). A tied head shares the embedding's weight."""
    import torch
    from blockd.span import RMSNorm
    w = load_client_weights(path)
    dtype = dtype or torch.float32
    embed = torch.nn.Embedding.from_pretrained(torch.from_numpy(w["embed_tokens"]).to(dtype), freeze=False)
    vocab, hidden = embed.weight.shape
    norm = RMSNorm(hidden, eps=w["rms_norm_eps"])
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(w["norm"]))
    norm.to(dtype)
    head = torch.nn.Linear(hidden, w["lm_head"].shape[0], bias=False)
    if w["tied"]:
        head.weight = embed.weight
    else:
        with torch.no_grad():
            head.weight = torch.nn.Parameter(torch.from_numpy(w["lm_head"]).to(dtype))
    return embed, norm, head


# Export lives in hf_export.py; blockd.hf.export_hf / export_peft are its names here too.
from blockd.hf_export import ExportError, export_hf, export_peft  # noqa: E402  (after HFCheckpoint, which it uses)
