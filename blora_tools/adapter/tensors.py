"""safetensors dtype names ↔ torch dtypes, and tensors ↔ raw little-endian bytes."""

from __future__ import annotations

import torch

__all__ = ["TORCH_DTYPE", "DTYPE_NAME", "decode", "encode"]

_TORCH_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "F64": "float64",
    "I64": "int64", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
# Feature detection, not version checks: only dtypes this torch has.
TORCH_DTYPE = {name: getattr(torch, attr) for name, attr in _TORCH_DTYPES.items() if hasattr(torch, attr)}
DTYPE_NAME = {dtype: name for name, dtype in TORCH_DTYPE.items()}


def decode(data: bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A writable tensor from stored bytes."""
    if not data:
        return torch.empty(shape, dtype=TORCH_DTYPE[dtype])
    return torch.frombuffer(bytearray(data), dtype=TORCH_DTYPE[dtype]).reshape(shape)


def encode(tensor: torch.Tensor) -> bytes:
    """The bytes safetensors stores for a tensor (contiguous, little-endian, CPU)."""
    t = tensor.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()
