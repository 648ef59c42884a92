"""Arithmetic on stored tensor bytes with numpy, no torch: the NaN/Inf test, a factor times a float, a scalar.

The commands that only copy, scale one factor and write alphas (prune, reweight, convert) run without importing
torch, which costs them more than their work. Every result is bit for bit what the torch route wrote
(`tests/adapter/test_floats.py` compares them), by its rules:

- a factor is scaled in float32 (`tensor.float() * ratio`: F64 is rounded to float32 first), the float
  multiplier rounded to float32 first, and the product written back in the tensor's dtype, rounded to
  nearest-even (overflow to ±Inf);
- a scalar (an alpha) is made from float64 and reaches F16/BF16 through float32, as torch's casts do;
- BF16, which numpy lacks, is the high half of a float32: widened by a shift, rounded by integer arithmetic.
  A NaN stays a NaN of the same sign (torch's own NaN bits vary between its vector and scalar loops).

Float8 and integer dtypes are converted by torch, imported only then.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from blora_tools.adapter.header import DTYPE_BYTES

__all__ = ["finite_bytes", "scaled_bytes", "scaled_float32", "scalar_bytes", "stored_value"]

_EXPONENT_BITS = {"F16": 0x7C00, "BF16": 0x7F80, "F32": 0x7F800000, "F64": 0x7FF0000000000000,
                  "F8_E5M2": 0x7C, "F8_E4M3": 0x7F}
"""Float dtypes → mask: a value is NaN/Inf when all its mask bits are set (E4M3 has no Inf: NaN only)."""

_NUMPY_FLOATS = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}
"""Dtypes numpy holds as they are stored (BF16 is handled as the high half of a float32)."""

_CHUNK_BYTES = 1 << 19
"""The NaN/Inf test works through a tensor in pieces this size, so its temporary stays in the CPU's cache."""

RowRanges = Sequence[tuple[int, int, float]]
"""(first, end, weight) ranges of one axis (`ops.rows.RowWeights`)."""


def _bits(data: bytes, dtype: str) -> np.ndarray:
    """Stored bytes as unsigned integers of the dtype's width (little-endian, as safetensors stores them)."""
    return np.frombuffer(data, dtype=f"<u{DTYPE_BYTES[dtype]}")


def finite_bytes(data: bytes, dtype: str) -> bool:
    """Whether stored tensor bytes hold no NaN/Inf (integer and bool dtypes always do)."""
    if dtype not in _EXPONENT_BITS or not data:
        return True
    bits = _bits(data, dtype)
    mask = bits.dtype.type(_EXPONENT_BITS[dtype])
    step = _CHUNK_BYTES // bits.itemsize
    buffer = np.empty(min(step, bits.size), dtype=bits.dtype)
    for start in range(0, bits.size, step):
        masked = np.bitwise_and(bits[start : start + step], mask, out=buffer[: min(step, bits.size - start)])
        # Masked values never exceed the mask, so "any equals the mask" is "the largest equals it".
        if masked.max() == mask:
            return False
    return True


def _widened(data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of the stored values (F64 rounded to nearest float32, as `Tensor.float()`)."""
    if dtype == "BF16":
        return (_bits(data, dtype).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if dtype in _NUMPY_FLOATS:
        with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32 becomes ±Inf, as in torch
            return np.frombuffer(data, dtype=_NUMPY_FLOATS[dtype]).astype(np.float32, copy=False).reshape(shape)
    from blora_tools.adapter.tensors import decode

    return decode(data, dtype, shape).float().numpy()


def _narrowed(values: np.ndarray, dtype: str) -> bytes:
    """The stored bytes of float32 or float64 `values` cast to `dtype` (F16/BF16 through float32)."""
    if dtype in ("F16", "BF16"):
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to ±Inf, as in torch
            values = values.astype(np.float32, copy=False)
    if dtype == "BF16":
        values = values.reshape(-1)
        bits = values.view(np.uint32)
        rounded = (bits >> 16) & 1  # round to nearest, ties to even (the kept half's lowest bit); overflow → Inf
        rounded += 0x7FFF
        rounded += bits
        rounded >>= 16
        nan = np.isnan(values)
        if nan.any():
            rounded[nan] = (bits[nan] >> 16) | 0x40  # a quiet NaN of the same sign
        return rounded.astype("<u2").tobytes()
    if dtype in _NUMPY_FLOATS:
        with np.errstate(over="ignore", invalid="ignore"):
            return values.astype(_NUMPY_FLOATS[dtype], copy=False).tobytes()
    import torch

    from blora_tools.adapter.tensors import TORCH_DTYPE, encode

    return encode(torch.from_numpy(values).to(TORCH_DTYPE[dtype]))


def scaled_bytes(
    data: bytes, dtype: str, shape: tuple[int, ...], ratio: float, rows: RowRanges = (), axis: int = 0
) -> bytes:
    """A stored tensor times `ratio`, each range of `axis` in `rows` then also times its weight (a weight of 1
    leaves its range as `ratio` made it), in float32 and written back in `dtype`."""
    return scaled_float32(_widened(data, dtype, shape), dtype, ratio, rows, axis)


def scaled_float32(values: np.ndarray, dtype: str, ratio: float, rows: RowRanges = (), axis: int = 0) -> bytes:
    """`scaled_bytes` of float32 values not (yet) stored, e.g. a factor made on read: rounded once, to `dtype`.
    `values` is not changed."""
    with np.errstate(over="ignore", invalid="ignore"):
        values = values * np.float32(ratio)
        for start, stop, weight in rows:
            if weight != 1.0:
                part = [slice(None)] * values.ndim
                part[axis] = slice(start, stop)
                values[tuple(part)] *= np.float32(weight)
    return _narrowed(values, dtype)


def scalar_bytes(value: float, dtype: str) -> bytes:
    """The stored bytes of a 0-d tensor of `dtype` made from the float64 `value`."""
    return _narrowed(np.array(value, dtype=np.float64), dtype)


def stored_value(value: float, dtype: str) -> float:
    """`value` as it reads back from a 0-d tensor of `dtype`."""
    data = scalar_bytes(value, dtype)
    if dtype == "F64":
        return float(np.frombuffer(data, dtype="<f8")[0])
    if dtype == "BF16" or dtype in _NUMPY_FLOATS:
        return float(_widened(data, dtype, ()))
    from blora_tools.adapter.tensors import decode

    return float(decode(data, dtype, ()).double())
