"""Header validation: every malformed header is an AdapterFileError naming the file."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from blora_tools.adapter.header import read_header
from blora_tools.errors import AdapterFileError


def _raw(tmp_path, header: object, data: bytes = b"", name="x.safetensors", raw_header: bytes | None = None):
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def _bytes(tmp_path, content: bytes):
    path = tmp_path / "raw.safetensors"
    path.write_bytes(content)
    return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_valid_file_roundtrip(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(3, 2), "b": torch.ones(1, dtype=torch.float16)}, path, metadata={"k": "v"})
    h = read_header(path)
    assert h.metadata == {"k": "v"}
    assert h.tensors["a"].shape == (3, 2) and h.tensors["a"].dtype == "F32" and h.tensors["b"].nbytes == 2


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda p: _bytes(p, b""), "shorter than the 8-byte"),
        (lambda p: _bytes(p, b"abc"), "shorter than the 8-byte"),
        (lambda p: _bytes(p, struct.pack("<Q", 1000) + b"{}"), "past the end"),
        (lambda p: _raw(p, None, raw_header=b"{not json"), "not valid JSON"),
        (lambda p: _raw(p, [1, 2]), "not a JSON object"),
        (lambda p: _raw(p, {"__metadata__": {"a": 1}}), "metadata must map strings"),
        (lambda p: _raw(p, {"t": _entry(dtype="F99")}, b"\0" * 8), "unknown dtype 'F99'"),
        (lambda p: _raw(p, {"t": _entry(shape=(3,))}, b"\0" * 8), "needs 12 bytes"),
        (lambda p: _raw(p, {"t": _entry(shape=(4,), offsets=(0, 16))}, b"\0" * 8), "holds 8"),
        (lambda p: _raw(p, {"t": _entry(offsets=(8, 0))}, b"\0" * 8), "bad data_offsets"),
        (lambda p: _raw(p, {"t": _entry(), "u": _entry(offsets=(4, 12))}, b"\0" * 12), "overlaps"),
        (lambda p: _raw(p, {"t": _entry(offsets=(4, 12))}, b"\0" * 12), "gap"),
        (lambda p: _raw(p, {"t": _entry(shape=("a",))}, b"\0" * 8), "not a list of sizes"),
        (lambda p: _raw(p, {"t": 5}), "not an object"),
    ],
    ids=["empty", "short", "length-past-end", "not-json", "not-object", "metadata-not-str", "dtype",
         "shape-size", "offset-range", "offsets-reversed", "overlap", "gap", "shape-type", "entry-type"],
)
def test_bad_headers(tmp_path, make, fragment):
    path = make(tmp_path)
    with pytest.raises(AdapterFileError) as err:
        read_header(path)
    assert fragment in str(err.value) and str(path) in str(err.value)


def test_header_too_large(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", 200 * 1024 * 1024) + b"{}")
    with pytest.raises(AdapterFileError, match="over the"):
        read_header(path)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_suffixes_are_refused_without_reading(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04whatever")
    with pytest.raises(AdapterFileError) as err:
        read_header(path)
    assert "pickle" in str(err.value) and "save_file" in str(err.value)


@pytest.mark.parametrize("magic", [b"\x80\x02}q\x00(X", b"PK\x03\x04\x14\x00\x00\x00"])
def test_renamed_pickle_is_refused(tmp_path, magic):
    path = tmp_path / "renamed.safetensors"
    path.write_bytes(magic + b"\0" * 64)
    with pytest.raises(AdapterFileError, match="pickle"):
        read_header(path)


def test_missing_and_directory(tmp_path):
    with pytest.raises(AdapterFileError, match="no such file"):
        read_header(tmp_path / "nope.safetensors")
    with pytest.raises(AdapterFileError, match="directory"):
        read_header(tmp_path)


def test_header_length_starting_with_pickle_magic_byte_is_not_pickle(tmp_path):
    """Regression: a header 0x280 bytes long starts with b'\\x80\\x02', pickle's magic; it is still safetensors."""
    entry = {"t": _entry()}
    body = json.dumps(entry).encode()
    body += b" " * (0x280 - len(body))
    path = _raw(tmp_path, None, b"\0" * 8, raw_header=body)
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert read_header(path).tensors["t"].shape == (2,)
