"""Named examples of safetensors' header rules (the differential test covers them at scale): each header is
refused both by `read_header` and by `safetensors.safe_open`, or accepted by both."""

from __future__ import annotations

import struct

import pytest
from safetensors import safe_open

from blora_tools.adapter.header import MAX_HEADER_BYTES, read_header
from blora_tools.errors import AdapterFileError

_T = '"t":{"dtype":"F32","shape":%s,"data_offsets":[0,%d]}'


def _file(tmp_path, header: str, data: bytes = b"", length: int | None = None):
    raw = header.encode("utf-8", "surrogatepass")
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _safetensors_accepts(path) -> bool:
    try:
        with safe_open(str(path), framework="numpy"):
            return True
    except Exception:
        return False


@pytest.mark.parametrize(
    "header, data, fragment",
    [
        ("{" + _T % ("[%d,0]" % 2**70, 0) + "}", b"", "not a list of sizes"),
        ("{" + _T % ("[%d,4,0]" % 2**63, 0) + "}", b"", "overflows 64 bits"),
        ("{" + _T % ("[%d]" % 2**62, 0) + "}", b"", "overflows 64 bits"),
        ("{" + _T % ("[-0]", 0) + "}", b"", "not a list of sizes"),
        ("{" + _T % ("[1.0]", 4) + "}", b"\0" * 4, "not a list of sizes"),
        ('{"t":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, "'dtype' appears twice"),
        ('{"__metadata__":{},"__metadata__":{}}', b"", "__metadata__ twice"),
        ('{"__metadata__":[]}', b"", "metadata must map strings"),
        ('{"__metadata__":""}', b"", "metadata must map strings"),
        ('{"__metadata__":{"a":"1","a":2}}', b"", "metadata must map strings"),
        ('{"t":{"dtype":"F32","x":NaN,"shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, "not valid JSON"),
        ('{"t":{"dtype":"F32","x":1e400,"shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, "out of range"),
        ('{"t":{"dtype":"F32","x":1' + "0" * 5000 + ',"shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, "out of range"),
        ('{"t":{"dtype":"F32","x":"\\ud800","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, "lone surrogate"),
        ('{"t":{"dtype":"F32","x":' + "[" * 126 + "]" * 126 + ',"shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, "nested"),
        ('{"t":{"dtype":"F32","x":' + "[" * 100_000 + "]" * 100_000 + ',"shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, "nested"),
        ('{"t":{"dtype":"XX","shape":[1],"data_offsets":[0,1]},"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\0",
         "unknown dtype"),
        ("\ufeff{}", b"", "not valid JSON"),
        ("{}\0", b"", "not valid JSON"),
        ('{"t":{"dtype":"F32","shape":[0],"data_offsets":[%d,%d]}}' % (2**64, 2**64), b"", "bad data_offsets"),
    ],
    ids=["shape-2**70", "overflow-before-zero", "bytes-overflow", "minus-zero", "float-dim", "repeated-field",
         "repeated-metadata", "metadata-list", "metadata-string", "repeated-metadata-key-bad-first", "nan", "1e400",
         "5000-digit-int", "lone-surrogate", "depth-128", "depth-100000", "repeated-name-bad-first", "bom",
         "trailing-nul", "offset-2**64"],
)
def test_refused_like_safetensors(tmp_path, header, data, fragment):
    path = _file(tmp_path, header, data)
    with pytest.raises(AdapterFileError) as err:
        read_header(path)
    assert fragment in str(err.value) and str(path) in str(err.value)
    assert not _safetensors_accepts(path)


@pytest.mark.parametrize(
    "header, data",
    [
        ("{" + _T % ("[0,%d,4]" % 2**63, 0) + "}", b""),  # the 0 comes first: no overflow
        ("{" + _T % ("[%d,0]" % (2**64 - 1), 0) + "}", b""),
        ('{"__metadata__":null}', b""),
        ('{"__metadata__":{"a":"1","a":"2"}}', b""),
        ('{"t":{"dtype":"U8","shape":[1],"data_offsets":[1,2]},"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\0"),
        ('{"t":{"dtype":"F32","x":' + "[" * 125 + "]" * 125 + ',"shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
        ('{"t":{"dtype":"F32","x":{"a":1,"a":2},"x":1e-400,"shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
        (' \n{"\\ud83d\\ude00":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}\t\r\n ', b"\0" * 4),
    ],
    ids=["zero-first", "u64-max-dim", "metadata-null", "repeated-metadata-key", "repeated-name-last-wins",
         "depth-127", "unknown-fields", "whitespace-and-pairs"],
)
def test_accepted_like_safetensors(tmp_path, header, data):
    path = _file(tmp_path, header, data)
    read_header(path)
    assert _safetensors_accepts(path)


def test_header_size_limit_is_safetensors_own(tmp_path):
    assert MAX_HEADER_BYTES == 100_000_000
    path = _file(tmp_path, "{}", length=MAX_HEADER_BYTES + 1)
    with pytest.raises(AdapterFileError, match="over the 100000000-byte limit"):
        read_header(path)


def test_last_repeated_name_wins_like_safetensors(tmp_path):
    path = _file(tmp_path, '{"t":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},'
                           '"t":{"dtype":"I8","shape":[1],"data_offsets":[0,1]}}', b"\x07")
    header = read_header(path)
    with safe_open(str(path), framework="numpy") as f:
        assert f.get_slice("t").get_dtype() == "I8"
    assert header.tensors["t"].dtype == "I8" and header.tensors["t"].shape == (1,)
