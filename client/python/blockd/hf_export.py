"""Trained blocks back to Hugging Face: a checkpoint of the layers (export_hf) or a PEFT adapter
(export_peft). `blockctl export-hf` / `export-peft` (client/blockctl_export.cc) do the same in C++,
with the same checks, names and files.

    export_hf(client, ids, "/out/tuned", base="/models/Qwen3-0.6B")   # a complete model transformers loads
    export_hf(client, ids, "/out/layers")                              # the layers only (the index says so)
    export_hf(client, ids, "/out/merged", base=..., merge=True)        # LoRA folded into the weights
    export_peft(client, ids, "/out/adapter", base_model_name_or_path="Qwen/Qwen3-0.6B")

Block k of `block_ids` becomes layer first_layer + k ("model.layers.{i}.<block tensor name>"). Every
block must hold the same config; it maps to LlamaForCausalLM (neither QK-norm nor biases),
Qwen2ForCausalLM (q/k/v biases) or Qwen3ForCausalLM (QK-norm). With `base` (the checkpoint the
blocks came from), its config.json is kept (torch_dtype set to the export's) and every tensor the
blocks do not replace (embed_tokens, norm, lm_head, layers not exported) is copied as stored.
Weights are downloaded in fp32 (the master weights) and written in `dtype`: the blocks' own
(bf16 for BF16 blocks, else fp32) unless given, rounded to nearest even as the server does.
"""
import json
import os
import re

import numpy as np

from blockd.config import BlockConfig
from blockd.errors import NotFoundError
from blockd.safetensors import write_safetensors
from blockd.tensors import float32_to_bfloat16_bits
from blockd.v1 import block_service_pb2 as pb

_DTYPES = {"fp32": ("F32", "float32"), "float32": ("F32", "float32"),
           "bf16": ("BF16", "bfloat16"), "bfloat16": ("BF16", "bfloat16")}
_LORA = re.compile(r"^(.*)\.lora_([AB])\.weight$")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_MAX_SHARD_BYTES = 5 * 1000 ** 3  # transformers' save_pretrained default, "5GB"
INDEX = "model.safetensors.index.json"


class ExportError(ValueError):
    """Blocks that do not make one Hugging Face model, or an output directory in the way."""


# -- the blocks ---------------------------------------------------------------------------------
def _lora_of(info):
    """(rank, alpha, target_modules) from BlockInfo.lora when the server's proto carries it and the
    block has adapters, else None."""
    if "lora" not in info.DESCRIPTOR.fields_by_name or not info.HasField("lora"):
        return None
    lora = info.lora
    if lora.rank <= 0:
        return None
    return int(lora.rank), float(lora.alpha), tuple(lora.target_modules)


def _describe(config):
    return ", ".join(f"{k}={v}" for k, v in vars(config).items())


def blocks_of(client, block_ids, timeout=None):
    """(BlockInfos, their one BlockConfig): every block exists, has its weights, appears once, and
    all share one config (a model's layers)."""
    block_ids = list(block_ids)
    if not block_ids:
        raise ExportError("no block ids given: expected the blocks of the layers to export, in layer order")
    seen = set()
    for b in block_ids:
        if b in seen:
            raise ExportError(f"block {b} is named twice: each block is one layer")
        seen.add(b)
    infos = []
    for b in block_ids:
        try:
            infos.append(client.get_block(b, timeout=timeout))
        except NotFoundError as e:
            raise NotFoundError(e.code, f"{e.details} (export names existing blocks, in layer order)",
                                e.method) from None
    config = BlockConfig.from_proto(infos[0].config)
    for info in infos[1:]:
        other = BlockConfig.from_proto(info.config)
        if other != config:
            diff = [f"{k} {getattr(other, k)!r} vs {getattr(config, k)!r}" for k in vars(config)
                    if getattr(other, k) != getattr(config, k)]
            raise ExportError(f"block {info.block_id} has another config than block {infos[0].block_id} "
                              f"({'; '.join(diff)}): the layers of one model share one config")
        if _lora_of(info) != _lora_of(infos[0]):
            raise ExportError(f"block {info.block_id} has LoRA {_lora_of(info)}, block {infos[0].block_id} has "
                              f"{_lora_of(infos[0])}: export blocks with one adapter config")
    for info in infos:
        if not info.weights_loaded:
            raise ExportError(f"block {info.block_id} lacks weights ({', '.join(info.missing_weights)}): "
                              f"load them before exporting")
    return infos, config


def export_dtype(infos, dtype=None):
    """("F32"|"BF16", torch_dtype name): `dtype` ("fp32"/"bf16"), else the blocks' own."""
    if dtype is not None:
        try:
            return _DTYPES[str(dtype).lower()]
        except KeyError:
            raise ExportError(f"dtype {dtype!r}: expected bf16 or fp32") from None
    own = {i.block_id: ("bf16" if i.precision == pb.PRECISION_BF16 else "fp32") for i in infos}
    if len(set(own.values())) > 1:
        raise ExportError(f"the blocks mix precisions ({', '.join(f'{b} {d}' for b, d in own.items())}): "
                          f"choose the export's with dtype=bf16|fp32 (--dtype)")
    return _DTYPES[next(iter(own.values()))]


def hf_architecture(config):
    """(model_type, architecture) of a block config."""
    if config.qk_norm and config.attention_bias:
        raise ExportError("the blocks have both QK-norm and q/k/v biases: no Hugging Face Llama, Qwen2 or Qwen3 "
                          "model has both")
    if config.qk_norm:
        return "qwen3", "Qwen3ForCausalLM"
    if config.attention_bias:
        return "qwen2", "Qwen2ForCausalLM"
    return "llama", "LlamaForCausalLM"


def hf_rope_scaling(rope):
    """Hugging Face's rope_scaling dict of a RopeScaling (None for plain RoPE)."""
    if rope.is_default:
        return None
    out = {"rope_type": rope.rope_type, "factor": rope.factor}
    if rope.rope_type == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                   original_max_position_embeddings=rope.original_max_position_embeddings)
    elif rope.rope_type == "yarn":
        out.update(original_max_position_embeddings=rope.original_max_position_embeddings,
                   attention_factor=rope.attention_factor, beta_fast=rope.beta_fast, beta_slow=rope.beta_slow)
    return out


def hf_config(config, num_layers, torch_dtype, max_position_embeddings):
    """config.json of a model whose decoder layers are blocks of `config` (no vocabulary: the
    embedding and head are not the blocks')."""
    model_type, arch = hf_architecture(config)
    rope = config.rope_scaling
    if rope.rope_type in ("llama3", "yarn"):
        # HF's yarn derives its factor from max_position_embeddings / original when both are set.
        max_position_embeddings = int(round(rope.factor * rope.original_max_position_embeddings))
    out = {
        "architectures": [arch], "model_type": model_type, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": num_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta, "rope_scaling": hf_rope_scaling(rope),
        "max_position_embeddings": max_position_embeddings, "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
    }
    if model_type in ("llama", "qwen3"):
        out.update(attention_bias=False)
    if model_type == "llama":
        out.update(mlp_bias=False)
    else:
        out.update(use_sliding_window=False)
    return out


# -- tensors ------------------------------------------------------------------------------------
def split_lora(tensors):
    """({base name: array}, {module: {"A": array, "B": array}}) of one block's downloaded tensors."""
    base, lora = {}, {}
    for name, a in tensors.items():
        m = _LORA.match(name)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = a
        else:
            base[name] = a
    for module, ab in lora.items():
        if set(ab) != {"A", "B"}:
            raise ExportError(f"adapter of {module} has lora_{''.join(ab)} only: expected lora_A and lora_B")
    return base, lora


def merge_lora(base, lora, scale):
    """W + scale · (B @ A) for every adapted module, in fp32 as PEFT's merge computes it."""
    out = dict(base)
    for module, ab in lora.items():
        w = base.get(f"{module}.weight")
        a, b = ab["A"].astype(np.float32), ab["B"].astype(np.float32)
        if w is None or b.shape[0] != w.shape[0] or a.shape[1] != w.shape[1] or a.shape[0] != b.shape[1]:
            raise ExportError(f"adapter of {module}: lora_A {list(a.shape)}, lora_B {list(b.shape)} do not fit "
                              f"{module}.weight {None if w is None else list(w.shape)}")
        out[f"{module}.weight"] = (w.astype(np.float32) + (b @ a) * np.float32(scale)).astype(np.float32)
    return out


def encode(a, st_dtype):
    """A float32 array as `st_dtype` ("F32" or "BF16", its uint16 bit patterns)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    return float32_to_bfloat16_bits(a).reshape(a.shape) if st_dtype == "BF16" else a


def _lora_params(infos, lora_by_block, lora_alpha):
    """(rank, alpha, target_modules) of the blocks' adapters: BlockInfo.lora, else the tensors'
    shapes and names with `lora_alpha`."""
    told = _lora_of(infos[0])
    if told is not None:
        return told
    ranks = {ab["A"].shape[0] for lora in lora_by_block for ab in lora.values()}
    if len(ranks) != 1:
        raise ExportError(f"the adapters have ranks {sorted(ranks)}: expected one rank")
    if lora_alpha is None:
        raise ExportError("the blocks do not say their LoRA alpha (BlockInfo.lora): pass lora_alpha (--lora_alpha)")
    modules = sorted({m.rsplit(".", 1)[-1] for lora in lora_by_block for m in lora}, key=_target_order)
    return ranks.pop(), float(lora_alpha), tuple(modules)


def _target_order(m):
    return LORA_TARGETS.index(m) if m in LORA_TARGETS else len(LORA_TARGETS)


# -- the output directory -----------------------------------------------------------------------
def prepare_dir(path, force):
    """Creates `path` or checks it is empty; with force, a non-empty one is written into (the files
    an export writes are replaced; stale model-*-of-*.safetensors shards removed)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ExportError(f"{path} exists and is not a directory")
    if os.path.isdir(path):
        entries = os.listdir(path)
        if entries and not force:
            raise ExportError(f"{path} exists and is not empty ({len(entries)} entries): expected a new or empty "
                              f"directory (force=True / --force writes into it)")
        for e in entries:
            if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors|model\.safetensors(\.index\.json)?", e):
                os.remove(os.path.join(path, e))
        return False
    os.makedirs(path)
    return True


def _undo(path, written, created):
    """A failed export leaves nothing of its own behind: the files it wrote, the directory it made."""
    for f in written:
        try:
            os.remove(os.path.join(path, f))
        except OSError:
            pass
    if created:
        try:
            os.rmdir(path)
        except OSError:
            pass


def _layer_key(name):
    """Hugging Face's order: the embedding, the layers by index (block order inside), the rest."""
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)))
    return (0,) if name.startswith("model.embed_tokens.") else (2,)


def shard_plan(entries, max_shard_bytes):
    """Cuts [(name, nbytes, source)] (in order) into shards of at most max_shard_bytes (a tensor
    larger than that gets a shard of its own)."""
    if max_shard_bytes <= 0:
        raise ExportError(f"max_shard_bytes = {max_shard_bytes}: expected > 0")
    shards, size = [[]], 0
    for e in entries:
        if shards[-1] and size + e[1] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e[1]
    return shards


def export_hf(client, block_ids, path, base=None, dtype=None, first_layer=0, merge=False, lora_alpha=None,
              force=False, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES, timeout=None):
    """Writes the blocks as a Hugging Face checkpoint in `path` (module docstring): config.json,
    model-0000k-of-0000n.safetensors and model.safetensors.index.json. merge=True folds LoRA
    adapters into the weights (W + alpha/rank · B A, fp32, then cast); without it adapters are left
    out (export_peft writes them). Returns {"files": [...], "complete": bool, "layers": [...]}."""
    from blockd.hf import HFCheckpoint, CheckpointError
    infos, config = blocks_of(client, block_ids, timeout)
    st_dtype, torch_dtype = export_dtype(infos, dtype)
    if first_layer < 0:
        raise ExportError(f"first_layer = {first_layer}: expected >= 0")
    layers = [first_layer + k for k in range(len(infos))]
    shapes = config.param_shapes()
    itemsize = 2 if st_dtype == "BF16" else 4
    entries = []  # (hf name, bytes, source): ("block", k, name) or ("base", name)
    for k, i in enumerate(layers):
        for name, shape in shapes.items():
            entries.append((f"model.layers.{i}.{name}", int(np.prod(shape)) * itemsize, ("block", k, name)))
    ckpt = None
    try:
        if base is not None:
            ckpt = HFCheckpoint(base)
            try:
                base_config = ckpt.block_config()
            except CheckpointError as e:
                raise ExportError(f"base {base}: {e}") from None
            if base_config != config:
                raise ExportError(f"base {base} has layers of another config ({_describe(base_config)}) than the "
                                  f"blocks ({_describe(config)})")
            if layers[-1] >= ckpt.num_layers:
                raise ExportError(f"layers {layers[0]}..{layers[-1]} do not fit base {base}, which has layers "
                                  f"0..{ckpt.num_layers - 1} (first_layer / --first_layer sets the first)")
            exported = {f"model.layers.{i}." for i in layers}
            for name in sorted(ckpt.names()):  # by name inside a layer and among the rest, as blockctl
                m = re.match(r"^model\.layers\.\d+\.", name)
                if m and m.group(0) in exported:
                    continue  # the blocks replace it (or it is RoPE's recomputed buffer)
                entries.append((name, ckpt.nbytes(name), ("base", name)))
            with open(os.path.join(ckpt.path, "config.json")) as f:
                config_json = json.load(f)
            for c in (config_json, config_json.get("text_config")):
                if isinstance(c, dict):  # transformers 5 writes "dtype", older versions "torch_dtype"
                    c["torch_dtype"] = torch_dtype
                    if "dtype" in c:
                        c["dtype"] = torch_dtype
        else:
            max_seq = max(int(i.max_seq_len) for i in infos) or 4096
            config_json = hf_config(config, layers[-1] + 1, torch_dtype, max_seq)
        entries.sort(key=lambda e: _layer_key(e[0]))  # stable: block order inside a layer
        shards = shard_plan(entries, max_shard_bytes)
        created = prepare_dir(path, force)
        written = []
        try:
            _write_shards(client, infos, shards, path, st_dtype, ckpt, merge, lora_alpha, timeout, written)
            weight_map = {e[0]: f for f, shard in zip(written, shards) for e in shard}
            complete = base is not None
            metadata = {"total_size": sum(e[1] for e in entries),
                        "blockd_export": ("complete model: the blocks' layers and the base checkpoint's other tensors"
                                          if complete else "layers only: no embed_tokens, norm or lm_head "
                                          "(export with a base checkpoint, --base DIR, for a loadable model)"),
                        "blockd_layers": f"{layers[0]}..{layers[-1]} from blocks {', '.join(block_ids)}"}
            if not merge and any(_lora_of(i) for i in infos):
                metadata["blockd_adapters"] = "not merged: the base weights only (export-peft writes the adapters)"
            for name, obj in (("config.json", config_json), (INDEX, {"metadata": metadata, "weight_map": weight_map})):
                with open(os.path.join(path, name), "w") as f:
                    json.dump(obj, f, indent=2)
                    f.write("\n")
                written.append(name)
        except BaseException:
            _undo(path, written, created)
            raise
        return {"files": written, "complete": base is not None, "layers": layers}
    finally:
        if ckpt is not None:
            ckpt.close()


def _write_shards(client, infos, shards, path, st_dtype, ckpt, merge, lora_alpha, timeout, files):
    """Writes the shard files (appending each to `files` before writing it, so a failure can remove
    it), downloading each block once (the entries are in layer order)."""
    cache = {}  # block position -> its tensors, only the block being written

    def block_tensors(k):
        if k not in cache:
            cache.clear()
            got = client.download_tensors(infos[k].block_id, "weights", dtype="float32", timeout=timeout)
            base, lora = split_lora(got)
            if merge:
                if not lora:
                    raise ExportError(f"block {infos[k].block_id} has no LoRA adapters to merge")
                rank, alpha, _ = _lora_params(infos, [lora], lora_alpha)
                base = merge_lora(base, lora, alpha / rank)
            cache[k] = base
        return cache[k]

    for s, shard in enumerate(shards):
        name = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = []
        for hf_name, _, source in shard:
            if source[0] == "block":
                tensors.append((hf_name, st_dtype, encode(block_tensors(source[1])[source[2]], st_dtype)))
            else:
                a, d = ckpt.raw(source[1])
                tensors.append((hf_name, d, a))
        files.append(name)
        write_safetensors(os.path.join(path, name), tensors, {"format": "pt"})


# -- PEFT adapters ------------------------------------------------------------------------------
def peft_tensors(layers_lora, st_dtype="F32"):
    """[(PEFT name, dtype, array)] of {layer index: {module: {"A", "B"}}}: PEFT's names for a
    causal LM, base_model.model.model.layers.{i}.{module}.lora_{A,B}.weight."""
    out = []
    for i in sorted(layers_lora):
        for module in sorted(layers_lora[i], key=lambda m: _target_order(m.rsplit(".", 1)[-1])):
            for part in ("A", "B"):
                out.append((f"base_model.model.model.layers.{i}.{module}.lora_{part}.weight", st_dtype,
                            encode(layers_lora[i][module][part], st_dtype)))
    return out


def peft_config(rank, alpha, target_modules, layers, base_model_name_or_path=""):
    """adapter_config.json of a LoRA adapter on `layers` (PEFT's LoraConfig fields)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank), "lora_alpha": alpha,
        "target_modules": list(target_modules), "base_model_name_or_path": base_model_name_or_path or None,
        "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0, "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "layers_to_transform": list(layers), "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "revision": None,
    }


def export_peft(client, block_ids, path, base_model_name_or_path="", first_layer=0, dtype="fp32",
                lora_alpha=None, force=False, timeout=None):
    """Writes the blocks' LoRA adapters as a PEFT adapter in `path`: adapter_model.safetensors and
    adapter_config.json (block k is layer first_layer + k). Every block needs the same adapted
    modules. Returns {"files": [...], "r": rank, "lora_alpha": alpha, "target_modules": [...]}."""
    infos, config = blocks_of(client, block_ids, timeout)
    st_dtype, _ = export_dtype(infos, dtype or "fp32")
    if first_layer < 0:
        raise ExportError(f"first_layer = {first_layer}: expected >= 0")
    layers = [first_layer + k for k in range(len(infos))]
    shapes = config.param_shapes()
    by_layer = {}
    for k, info in enumerate(infos):
        _, lora = split_lora(client.download_tensors(info.block_id, "weights", dtype="float32", timeout=timeout))
        if not lora:
            raise ExportError(f"block {info.block_id} has no LoRA adapters (tensors named *.lora_A.weight): "
                              f"create it with a lora config")
        for module, ab in lora.items():
            out, inp = shapes[f"{module}.weight"] if f"{module}.weight" in shapes else (None, None)
            if out is None or ab["A"].shape[1] != inp or ab["B"].shape[0] != out or ab["A"].shape[0] != ab["B"].shape[1]:
                raise ExportError(f"block {info.block_id}: adapter of {module} has lora_A {list(ab['A'].shape)}, "
                                  f"lora_B {list(ab['B'].shape)}, expected [r, {inp}] and [{out}, r]")
        if by_layer and set(lora) != set(next(iter(by_layer.values()))):
            raise ExportError(f"block {info.block_id} adapts {sorted(lora)}, block {infos[0].block_id} adapts "
                              f"{sorted(next(iter(by_layer.values())))}: one adapter config for all layers")
        by_layer[layers[k]] = lora
    rank, alpha, targets = _lora_params(infos, list(by_layer.values()), lora_alpha)
    cfg = peft_config(rank, alpha, targets, layers, base_model_name_or_path)
    created = prepare_dir(path, force)
    written = []
    try:
        write_safetensors(os.path.join(path, "adapter_model.safetensors"), peft_tensors(by_layer, st_dtype),
                          {"format": "pt"})
        written.append("adapter_model.safetensors")
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")
        written.append("adapter_config.json")
    except BaseException:
        _undo(path, written, created)
        raise
    return {"files": written, "r": rank, "lora_alpha": alpha, "target_modules": list(targets)}
