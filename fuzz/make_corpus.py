#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (committed; rerun only to change them).

    python3 fuzz/make_corpus.py      # rewrites fuzz/corpus/{safetensors,requests,sessions,shared_memory}

safetensors: small valid files (F32/BF16/F16, metadata, empty and scalar shapes, the layout blockd's
checkpoints use) and near misses (overlap, hole, trailing bytes, bad dtype, short header).
requests: byte strings for request_fuzzer's FuzzedDataProvider script, random but fixed.
sessions: the same for session_fuzzer (its scripts of session calls), with their own seed.
shared_memory: the same for shared_memory_fuzzer, with their own seed.
"""
import json
import os
import random
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def safetensors(tensors, metadata=None, pad=True, trailing=b""):
    header, data, offset = {}, b"", 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data + trailing


def raw_header(text, data=b""):
    h = text.encode()
    return struct.pack("<Q", len(h)) + h + data


def main():
    rng = random.Random(20261125)
    f32 = lambda n: struct.pack(f"<{n}f", *[rng.uniform(-1, 1) for _ in range(n)])
    b16 = lambda n: bytes(rng.getrandbits(8) for _ in range(2 * n))
    seeds = {
        "f32_matrix": safetensors([("w", "F32", [2, 3], f32(6))]),
        "bf16_and_f16": safetensors([("a", "BF16", [4], b16(4)), ("b", "F16", [2, 2], b16(4))]),
        "metadata": safetensors([("x", "F32", [1], f32(1))], {"format": "pt", "block_id": "b0"}),
        "empty_and_scalar": safetensors([("e", "F32", [0], b""), ("s", "F32", [], f32(1))]),
        "no_tensors": safetensors([], {"k": "v"}),
        "checkpoint_like": safetensors(
            [(f"{k}/input_layernorm.weight", "F32", [8], f32(8)) for k in ("weights", "adam_m", "adam_v")],
            {"block_id": "b0", "format": "blockd-checkpoint-v1"}),
        "unpadded": safetensors([("w", "F32", [3], f32(3))], pad=False),
        "trailing_bytes": safetensors([("w", "F32", [1], f32(1))], trailing=b"\0\0\0\0"),
        "overlap": raw_header('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                              '"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}', b"\0" * 6),
        "hole": raw_header('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8),
        "bad_dtype": raw_header('{"a":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}', b"\0" * 8),
        "huge_shape": raw_header('{"a":{"dtype":"F32","shape":[1099511627776,1099511627776],'
                                 '"data_offsets":[0,4]}}', b"\0" * 4),
        "duplicate_name": raw_header('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                                     '"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
        "short_header_len": struct.pack("<Q", 1000) + b"{}",
        "not_json": raw_header("{nope"),
    }
    out = os.path.join(HERE, "corpus", "safetensors")
    os.makedirs(out, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(out, name + ".safetensors"), "wb") as f:
            f.write(data)
    random_scripts("requests", rng)
    # Drawn after the others, so adding them changed no earlier seed.
    random_scripts("sessions", random.Random(20261129))
    # shared_memory_fuzzer's scripts (regions, slices, Forward through them), their own seed too.
    random_scripts("shared_memory", random.Random(20261130))


def random_scripts(corpus, rng):
    """Eight random byte strings of 64..8192 bytes for a FuzzedDataProvider-script target."""
    out = os.path.join(HERE, "corpus", corpus)
    os.makedirs(out, exist_ok=True)
    for i, size in enumerate([64, 128, 256, 512, 1024, 2048, 4096, 8192]):
        with open(os.path.join(out, f"random_{i}"), "wb") as f:
            f.write(bytes(rng.getrandbits(8) for _ in range(size)))

if __name__ == "__main__":
    main()
