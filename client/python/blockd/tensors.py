"""Tensors on the wire: numpy arrays and torch tensors to and from `blockd.v1.Tensor` bytes.

Wire tensors are little-endian, row-major raw bytes in float32, bfloat16 or float16. numpy has no
bfloat16: float arrays are rounded to it (nearest even, as torch does), and a uint16 array given
with dtype="bf16" is taken as bfloat16 bit patterns.

    dtype, shape, data = encode(x, "bf16")          # x: np.ndarray or torch.Tensor
    dtype, shape, array = encode_array(x)            # the same as a numpy array (x's own when it can)
    y = decode(dtype, shape, data, like=x)           # same kind (numpy/torch) and dtype as x
"""
import sys

import numpy as np

from blockd.v1 import block_service_pb2 as pb

FLOAT32 = pb.DTYPE_FLOAT32
BFLOAT16 = pb.DTYPE_BFLOAT16
FLOAT16 = pb.DTYPE_FLOAT16

_NAMES = {
    "float32": FLOAT32, "fp32": FLOAT32, "f32": FLOAT32,
    "bfloat16": BFLOAT16, "bf16": BFLOAT16,
    "float16": FLOAT16, "fp16": FLOAT16, "f16": FLOAT16, "half": FLOAT16,
}
_ITEMSIZE = {FLOAT32: 4, BFLOAT16: 2, FLOAT16: 2}


def _torch():
    # A torch tensor can only exist once torch was imported, so never import it here.
    return sys.modules.get("torch")


def is_torch(x):
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def wire_dtype(d):
    """The wire DType for a name ("bf16"), a DType value, a numpy dtype or a torch dtype."""
    if d is None:
        return None
    if isinstance(d, str):
        try:
            return _NAMES[d.lower()]
        except KeyError:
            raise ValueError(f"dtype {d!r}: expected one of {sorted(_NAMES)}") from None
    if isinstance(d, int) and d in _ITEMSIZE:
        return d
    torch = _torch()
    if torch is not None and isinstance(d, torch.dtype):
        table = {torch.float32: FLOAT32, torch.bfloat16: BFLOAT16, torch.float16: FLOAT16}
        if d in table:
            return table[d]
        raise ValueError(f"dtype {d}: blockd carries float32, bfloat16 or float16")
    try:
        nd = np.dtype(d)
    except TypeError:
        raise ValueError(f"dtype {d!r}: expected float32, bfloat16 or float16") from None
    if nd == np.float32:
        return FLOAT32
    if nd == np.float16:
        return FLOAT16
    raise ValueError(f"dtype {nd}: blockd carries float32, bfloat16 or float16")


def dtype_name(d):
    return {FLOAT32: "float32", BFLOAT16: "bfloat16", FLOAT16: "float16"}.get(d, f"dtype {d}")


def itemsize(d):
    return _ITEMSIZE[d]


def float32_to_bfloat16_bits(a):
    """float32 array -> uint16 bfloat16 bit patterns, round to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(a, dtype="<f4").view("<u4")
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype("<u2")
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype("<u2")
    return rounded


def bfloat16_bits_to_float32(bits):
    """uint16 bfloat16 bit patterns -> float32 (exact)."""
    return (np.asarray(bits, dtype="<u2").astype("<u4") << np.uint32(16)).view("<f4")


def _numpy_of(x):
    """A host numpy view of x; a torch bfloat16 tensor comes back as its uint16 bit patterns."""
    if is_torch(x):
        torch = _torch()
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view("<u2"), BFLOAT16
        if t.dtype == torch.float64:
            t = t.float()
        return t.numpy(), None
    a = np.asarray(x)
    return a, None


def encode_array(x, dtype=None):
    """(wire dtype, shape, a C-contiguous numpy array holding x's wire bytes) for x in `dtype`
    (default: float32, or x's own 16-bit type): x's own memory, not a copy, when x already is in
    the wire format (a float32 array sent as float32, a torch bfloat16 tensor as bfloat16)."""
    a, native = _numpy_of(x)
    want = wire_dtype(dtype)
    if native == BFLOAT16:  # a torch bfloat16 tensor: its bits already are the wire format
        if want in (None, BFLOAT16):
            return BFLOAT16, tuple(a.shape), a
        a = bfloat16_bits_to_float32(a)
    if a.dtype == np.uint16:  # numpy's stand-in for bfloat16: bit patterns, sent as they are
        if want != BFLOAT16:
            raise ValueError("a uint16 array holds bfloat16 bit patterns: pass dtype='bf16'")
        return BFLOAT16, tuple(a.shape), np.ascontiguousarray(a, dtype="<u2")
    if want is None:
        want = FLOAT16 if a.dtype == np.float16 else FLOAT32
    if a.dtype.kind != "f":
        raise ValueError(f"tensor of dtype {a.dtype}: expected floating point values")
    if want == FLOAT32:
        return want, tuple(a.shape), np.ascontiguousarray(a, dtype="<f4")
    if want == FLOAT16:
        return want, tuple(a.shape), np.ascontiguousarray(a, dtype="<f2")
    return want, tuple(a.shape), float32_to_bfloat16_bits(a.astype(np.float32, copy=False))


def encode(x, dtype=None):
    """(wire dtype, shape, bytes) of x in `dtype` (default: float32, or x's own 16-bit type)."""
    d, shape, a = encode_array(x, dtype)
    return d, shape, a.tobytes()


def to_proto(x, dtype=None):
    """A blockd.v1.Tensor message holding x."""
    d, shape, data = encode(x, dtype)
    return pb.Tensor(dtype=d, shape=shape, data=data)


def decode(dtype, shape, data, like=None):
    """Wire bytes -> a float32 numpy array, or, when `like` is a torch tensor, a torch tensor with
    like's dtype and device."""
    shape = tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    if dtype not in _ITEMSIZE:
        raise ValueError(f"wire tensor of unknown dtype {dtype}")
    if len(data) != n * _ITEMSIZE[dtype]:
        raise ValueError(f"wire tensor {list(shape)} {dtype_name(dtype)} has {len(data)} bytes, "
                         f"expected {n * _ITEMSIZE[dtype]}")
    # Writable, so torch can share it: a bytearray, or a uint8 array (a reply read out of a region).
    buf = data if isinstance(data, (bytearray, np.ndarray)) else bytearray(data)
    if is_torch(like):
        torch = _torch()
        if dtype == BFLOAT16:
            t = torch.from_numpy(np.frombuffer(buf, dtype="<i2").reshape(shape)).view(torch.bfloat16)
        elif dtype == FLOAT16:
            t = torch.from_numpy(np.frombuffer(buf, dtype="<f2").reshape(shape))
        else:
            t = torch.from_numpy(np.frombuffer(buf, dtype="<f4").reshape(shape))
        return t.to(device=like.device, dtype=like.dtype)
    if dtype == BFLOAT16:
        return bfloat16_bits_to_float32(np.frombuffer(buf, dtype="<u2")).reshape(shape)
    if dtype == FLOAT16:
        return np.frombuffer(buf, dtype="<f2").astype(np.float32).reshape(shape)
    return np.frombuffer(buf, dtype="<f4").reshape(shape)


def from_proto(t, like=None):
    return decode(t.dtype, t.shape, t.data, like)
