"""A small safetensors reader (the format of Hugging Face checkpoints), numpy only.

The file is an 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
then the tensor bytes (offsets relative to the end of the header). The file is memory-mapped, so
a tensor is read only when asked for.

    with SafetensorsFile("model-00001-of-00002.safetensors") as f:
        for name in f.keys():
            w = f.get(name)              # float32 numpy array (bf16/f16 converted exactly)
            bits, dtype = f.raw(name)    # stored values; BF16 as uint16 bit patterns

    write_safetensors("out.safetensors", [("w", "BF16", bits)], {"format": "pt"})  # arrays as stored
"""
import json
import mmap
import os
import struct

import numpy as np

from blockd.tensors import bfloat16_bits_to_float32

# safetensors dtype -> numpy storage dtype (bfloat16 as its uint16 bit patterns).
_NUMPY = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}
_MAX_HEADER = 100 << 20


class SafetensorsError(ValueError):
    pass


class SafetensorsFile:
    def __init__(self, path):
        self.path = str(path)
        self._file = open(self.path, "rb")
        try:
            self._parse()
        except Exception:
            self._file.close()
            raise

    def _parse(self):
        head = self._file.read(8)
        if len(head) != 8:
            raise SafetensorsError(f"{self.path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise SafetensorsError(f"{self.path}: header of {n} bytes, at most {_MAX_HEADER} expected")
        raw = self._file.read(n)
        if len(raw) != n:
            raise SafetensorsError(f"{self.path}: header says {n} bytes, the file has {len(raw)}")
        try:
            header = json.loads(raw)
        except ValueError as e:
            raise SafetensorsError(f"{self.path}: header is not JSON: {e}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._file.seek(0, 2)
        data_len = self._file.tell() - self._data_start
        self._entries = {}
        for name, e in header.items():
            try:
                dtype, shape, (begin, end) = e["dtype"], [int(s) for s in e["shape"]], e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: tensor {name}: malformed header entry {e!r}") from None
            if dtype not in _NUMPY:
                raise SafetensorsError(f"{self.path}: tensor {name} has dtype {dtype}, expected one of {sorted(_NUMPY)}")
            numel = 1
            for s in shape:
                numel *= s
            size = numel * np.dtype(_NUMPY[dtype]).itemsize
            if not (0 <= begin <= end <= data_len) or end - begin != size:
                raise SafetensorsError(f"{self.path}: tensor {name} {dtype}{shape} has data_offsets [{begin}, {end}], "
                                       f"expected {size} bytes inside the {data_len}-byte data section")
            self._entries[name] = (dtype, tuple(shape), begin, end)
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if data_len > 0 else b""

    def keys(self):
        return list(self._entries)

    def __contains__(self, name):
        return name in self._entries

    def info(self, name):
        """(dtype, shape) of a tensor, e.g. ("BF16", (64, 64))."""
        dtype, shape, _, _ = self._entry(name)
        return dtype, shape

    def nbytes(self, name):
        _, _, begin, end = self._entry(name)
        return end - begin

    def _entry(self, name):
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor {name!r}") from None

    def raw(self, name):
        """(array of the stored values, dtype); BF16 comes as uint16 bit patterns. The array is a
        read-only view of the mapped file."""
        dtype, shape, begin, end = self._entry(name)
        a = np.frombuffer(self._map, dtype=_NUMPY[dtype], count=(end - begin) // np.dtype(_NUMPY[dtype]).itemsize,
                          offset=self._data_start + begin)
        return a.reshape(shape), dtype

    def get(self, name):
        """The tensor as a float32 numpy array (a copy)."""
        a, dtype = self.raw(name)
        if dtype == "BF16":
            return bfloat16_bits_to_float32(a).reshape(a.shape)
        return a.astype(np.float32)

    def close(self):
        if isinstance(self._map, mmap.mmap):
            try:
                self._map.close()
            except BufferError:
                pass  # arrays from raw() still view the map; it closes when they are gone
        self._map = b""
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_safetensors(path, tensors, metadata=None):
    """Writes [(name, safetensors dtype, array)] in that order (BF16 arrays as uint16 bit patterns)
    with string `metadata`, the header padded to 8 bytes with spaces as the safetensors library
    does, and fsyncs the file. Refuses an array whose numpy dtype is not the one `dtype` stores."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays = []
    for name, dtype, a in tensors:
        if dtype not in _NUMPY:
            raise SafetensorsError(f"tensor {name}: dtype {dtype}, expected one of {sorted(_NUMPY)}")
        a = np.asarray(a)
        if a.dtype != np.dtype(_NUMPY[dtype]):
            raise SafetensorsError(f"tensor {name}: a {a.dtype} array cannot be stored as {dtype} "
                                   f"(expected {np.dtype(_NUMPY[dtype])})")
        if name in header:
            raise SafetensorsError(f"tensor {name} given twice")
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(np.ascontiguousarray(a))
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for a in arrays:
            f.write(a.tobytes())
        f.flush()
        os.fsync(f.fileno())
