"""adapter.floats: the numpy route on stored bytes equals the torch route bit for bit (NaNs: NaN at the same
places), for every bit pattern of the 16-bit floats and random and edge values of F32/F64; the NaN/Inf test
agrees with torch.isfinite everywhere, chunk boundaries included."""

from __future__ import annotations

import math

import pytest
import torch
from adapters import same_floats, torch_scalar_bytes, torch_scaled, torch_scaled_bytes

from blora_tools.adapter import floats
from blora_tools.adapter.floats import finite_bytes, scalar_bytes, scaled_bytes, scaled_float32, stored_value
from blora_tools.adapter.tensors import TORCH_DTYPE, encode

FLOATS = ["F16", "BF16", "F32", "F64"]
FLOAT8 = [name for name in ("F8_E4M3", "F8_E5M2") if name in TORCH_DTYPE]
RATIOS = [0.5, 0.3, 1.7, 0.0, -1.0, 1.0, 1.5, 3.0, 1e30, 1e-40]
"""The weights of the brief and: 1.5 and 3 (products with more mantissa bits than the dtype: rounding ties),
1e30 (overflow to Inf), 1e-40 (a multiplier that is subnormal in float32)."""


def _edges(dtype: torch.dtype) -> torch.Tensor:
    """±0, subnormals, the normal range's ends, ±max, ±Inf, NaN, and values one ulp above 1, in `dtype`."""
    info = torch.finfo(dtype)
    sub = info.smallest_normal * info.eps  # the smallest subnormal
    values = [0.0, -0.0, sub, -sub, 3 * sub, info.smallest_normal - sub, info.smallest_normal, info.max, -info.max,
              info.max / 1.6, float("inf"), float("-inf"), float("nan"), 1 + info.eps, 1 + 3 * info.eps, 0.1, -2.5]
    return torch.tensor(values, dtype=torch.float64).to(dtype)


def _values(name: str) -> torch.Tensor:
    """Every bit pattern of a 16/8-bit float; for F32/F64 the edges, random bit patterns and random normals."""
    dtype = TORCH_DTYPE[name]
    width = torch.finfo(dtype).bits
    if width <= 16:
        every = torch.arange(2**width, dtype=torch.int32)
        return every.to(torch.uint8 if width == 8 else torch.int16).view(dtype)
    gen = torch.Generator().manual_seed(0)
    patterns = torch.randint(-(2 ** (width - 1)), 2 ** (width - 1) - 1, (20000,), generator=gen, dtype=torch.int64)
    patterns = patterns.to(torch.int32).view(torch.float32) if width == 32 else patterns.view(torch.float64)
    normals = torch.randn(20000, generator=gen, dtype=torch.float64).to(dtype)
    return torch.cat([_edges(dtype), patterns, normals])


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", FLOATS + FLOAT8)
def test_scaled_bytes_equal_the_torch_route(name, ratio):
    values = _values(name)
    data, shape = encode(values), (values.numel(),)
    assert same_floats(scaled_bytes(data, name, shape, ratio), torch_scaled_bytes(data, name, shape, ratio), name)


@pytest.mark.parametrize("ratio", [1.0, 0.3])
@pytest.mark.parametrize("name", FLOATS + FLOAT8)
def test_float32_values_round_as_torch_rounds_them(name, ratio):
    """Float32 values made on read (every low half: the ties 0x8000 above even and odd bf16 values, one either
    side of them, and NaNs whose rounding would carry into the sign) written in each dtype."""
    gen = torch.Generator().manual_seed(2)
    high = torch.randint(0, 2**16, (4000,), generator=gen, dtype=torch.int64) << 16
    low = torch.tensor([0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int64)
    bits = (high[:, None] | low[None, :]).flatten()
    bits = torch.cat([bits, torch.tensor([0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x7F7FFFFF, 0x7F7F8000])])
    values = torch.cat([bits.to(torch.int32).view(torch.float32), _values("F32")])
    ours = scaled_float32(values.numpy(), name, ratio)
    assert same_floats(ours, torch_scaled(values, name, ratio), name)


@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_bfloat16_and_half_ties_round_to_even(name):
    """Products exactly halfway between two stored values: the even one is written (as torch writes it)."""
    dtype = TORCH_DTYPE[name]
    one_ulp = torch.finfo(dtype).eps
    odd = torch.tensor([1 + one_ulp, 1 + 3 * one_ulp, -(1 + one_ulp)], dtype=torch.float64).to(dtype)
    # × 1.5 puts every odd mantissa exactly halfway: 1.5 + 1.5 ulp → 1.5 + 2 ulp (even); 1.5 + 4.5 ulp → + 4 ulp
    written = torch.frombuffer(bytearray(scaled_bytes(encode(odd), name, (3,), 1.5)), dtype=dtype).double()
    assert written.tolist() == [1.5 + 2 * one_ulp, 1.5 + 4 * one_ulp, -(1.5 + 2 * one_ulp)]


@pytest.mark.parametrize("name", FLOATS + ["F8_E5M2"])
@pytest.mark.parametrize("shape, axis", [((12, 5), 0), ((3, 12, 1, 1), 1)])
@pytest.mark.parametrize("ratio", [1.0, 1.7, 0.3])
def test_scaled_rows_equal_the_torch_route(name, shape, axis, ratio):
    if name not in TORCH_DTYPE:
        pytest.skip(f"this torch has no {name}")
    rows = ((0, 4, 0.5), (4, 8, 1.0), (8, 12, 0.0))
    gen = torch.Generator().manual_seed(1)
    data = encode(torch.randn(shape, generator=gen, dtype=torch.float64).to(TORCH_DTYPE[name]))
    ours = scaled_bytes(data, name, shape, ratio, rows, axis)
    assert same_floats(ours, torch_scaled_bytes(data, name, shape, ratio, rows, axis), name)
    back = torch.frombuffer(bytearray(ours), dtype=TORCH_DTYPE[name]).reshape(shape).narrow(axis, 8, 4)
    assert not back.float().any()  # weight 0 rows are zero


@pytest.mark.parametrize("name", ["I64", "I16"])
def test_integer_tensors_keep_the_torch_route(name):
    data = encode(torch.tensor([3, -7, 100, 0], dtype=TORCH_DTYPE[name]))
    assert scaled_bytes(data, name, (4,), 0.3) == torch_scaled_bytes(data, name, (4,), 0.3)


def test_empty_tensors():
    for name in FLOATS:
        assert scaled_bytes(b"", name, (0, 3), 0.5) == b""


SCALARS = [1.0, 4.0, 0.3, 128.0, 1e-8, 1e-45, 65504.0, 65520.0, 3.4e38, 1e39, -0.0, 2.0**-149 * 0.5,
           1 + 2**-11 + 2**-40,  # F16 via float32: the tie 1 + 2**-11 then even (1), where direct rounding gives 1.001
           1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-24, 1 + 3 * 2**-24, float("inf"), float("nan")]


@pytest.mark.parametrize("name", FLOATS + FLOAT8)
def test_scalars_equal_the_torch_route(name):
    for value in SCALARS:
        ours, theirs = scalar_bytes(value, name), torch_scalar_bytes(value, name)
        assert same_floats(ours, theirs, name), (value, ours, theirs)
        stored = stored_value(value, name)
        expected = float(torch.tensor(value, dtype=torch.float64).to(TORCH_DTYPE[name]).double())
        assert stored == expected or (math.isnan(stored) and math.isnan(expected)), (value, stored, expected)


@pytest.mark.parametrize("name", ["I64", "I32"])
def test_integer_scalars_keep_the_torch_route(name):
    for value in (1.0, 4.0, 128.0, 0.3):
        assert scalar_bytes(value, name) == torch_scalar_bytes(value, name)
        assert stored_value(value, name) == float(int(value))


@pytest.mark.parametrize("name", FLOATS + FLOAT8)
def test_finite_bytes_agrees_with_isfinite_on_every_value(name):
    values = _values(name)
    finite = torch.isfinite(values.double())
    assert finite_bytes(encode(values[finite]), name)
    for special in values[~finite][:50]:
        assert not finite_bytes(encode(special.reshape(1)), name), special


@pytest.mark.parametrize("name", FLOATS + FLOAT8)
def test_finite_bytes_finds_one_nan_or_inf_anywhere(name):
    """At the start, middle and end, on both sides of every boundary between the pieces it checks in turn."""
    dtype = TORCH_DTYPE[name]
    step = floats._CHUNK_BYTES // torch.finfo(dtype).bits * 8
    size = 3 * step + 7  # a short last piece
    clean = torch.linspace(-2, 2, size, dtype=torch.float64).to(dtype)
    assert finite_bytes(encode(clean), name)
    specials = [float("nan"), float("-nan")] + ([] if name == "F8_E4M3" else [float("inf"), float("-inf")])
    places = [0, 1, step - 1, step, step + 1, 2 * step, size // 2, 3 * step, size - 2, size - 1]
    for special in specials:
        for place in places:
            poisoned = clean.clone()
            poisoned[place] = special
            assert not finite_bytes(encode(poisoned), name), (special, place)


def test_finite_bytes_of_other_dtypes_and_empty_tensors():
    assert finite_bytes(encode(torch.tensor([1, 2, -3], dtype=torch.int64)), "I64")
    assert finite_bytes(encode(torch.tensor([True, False])), "BOOL")
    assert finite_bytes(encode(torch.tensor([255], dtype=torch.uint8)), "U8")  # all bits set, but not a float
    for name in FLOATS + FLOAT8:
        assert finite_bytes(b"", name)
