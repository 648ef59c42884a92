"""A factory of bad input files for the bad-input battery and the fuzzer.

Every maker takes a valid adapter file (`good`) and a folder, writes one broken file into the folder and
returns its path. `FILE_CASES` lists them with the text their error must contain. The raw safetensors layout
(8-byte little-endian header length, JSON header, data) is written here by hand, without `safetensors`, so a
file can be broken in exactly one way.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Maker = Callable[[Path, Path], Path]

ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
"""A module every tiny SD1 U-Net has (block in0 / IN01)."""


# --- the raw layout --------------------------------------------------------------------------------


def split_file(path: Path) -> tuple[dict, bytes]:
    """(header dict, data bytes) of a valid safetensors file."""
    blob = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join_file(header: object, data: bytes = b"", *, raw_header: bytes | None = None, length: int | None = None) -> bytes:
    """Bytes of a safetensors file; `raw_header` replaces the JSON and `length` the stated header length."""
    body = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def tensor_names(header: dict) -> list[str]:
    """Tensor names in data order."""
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def tensor_bytes(tensors: dict[str, tuple[str, tuple[int, ...], bytes]], metadata: dict | None = None) -> bytes:
    """A safetensors file from name → (dtype, shape, raw bytes), laid out in the given order."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    data = b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return join_file(header, data)


def _write(folder: Path, name: str, content: bytes) -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


def _edit(edit: Callable[[dict, bytes], tuple[object, bytes]], name: str = "bad.safetensors") -> Maker:
    """A maker that edits the good file's (header, data)."""

    def make(good: Path, folder: Path) -> Path:
        header, data = split_file(good)
        new_header, new_data = edit(header, data)
        return _write(folder, name, join_file(new_header, new_data))

    return make


def _content(content: Callable[[Path], bytes], name: str = "bad.safetensors") -> Maker:
    return lambda good, folder: _write(folder, name, content(good))


# --- the edits ---------------------------------------------------------------------------------------


def _first(header: dict) -> dict:
    """The first tensor in data order that has a shape (not a 0-d alpha)."""
    return next(header[n] for n in tensor_names(header) if header[n]["shape"])


def _set_first(field: str, value: object):
    def edit(header: dict, data: bytes):
        _first(header)[field] = value
        return header, data

    return edit


def _overlap(header: dict, data: bytes):
    """The second tensor points at the first one's bytes (both have the same size in the tiny adapters)."""
    names = tensor_names(header)
    same = [n for n in names[1:] if _size(header[n]) == _size(header[names[0]])]
    header[same[0]]["data_offsets"] = list(header[names[0]]["data_offsets"])
    return header, data


def _size(entry: dict) -> int:
    return entry["data_offsets"][1] - entry["data_offsets"][0]


def _gap(header: dict, data: bytes):
    """8 unused bytes after the first tensor."""
    names = tensor_names(header)
    cut = header[names[0]]["data_offsets"][1]
    for n in names[1:]:
        header[n]["data_offsets"] = [o + 8 for o in header[n]["data_offsets"]]
    return header, data[:cut] + b"\0" * 8 + data[cut:]


def _beyond(header: dict, data: bytes):
    """The last tensor's range starts far past the end of the data."""
    last = header[tensor_names(header)[-1]]
    last["data_offsets"] = [o + 2**40 for o in last["data_offsets"]]
    return header, data


def _shape_mismatch(header: dict, data: bytes):
    entry = _first(header)
    entry["shape"] = [entry["shape"][0] + 1, *entry["shape"][1:]]
    return header, data


def _shape_boolean(header: dict, data: bytes):
    """A leading axis of size `true`: Python's json reads True, an int equal to 1 (safetensors refuses it)."""
    entry = _first(header)
    entry["shape"] = [True, *entry["shape"]]
    return header, data


def _full_model(good: Path) -> bytes:
    f32 = struct.pack("<4f", 1, 2, 3, 4)
    return tensor_bytes({
        "model.diffusion_model.input_blocks.0.0.weight": ("F32", (2, 2), f32),
        "first_stage_model.decoder.conv_in.bias": ("F32", (4,), f32),
    }, {"modelspec.architecture": "stable-diffusion-v1"})


def _pickle_bytes(good: Path) -> bytes:
    return pickle.dumps({"state_dict": {"a": [1.0, 2.0]}}, protocol=2)


def _zip_bytes(good: Path) -> bytes:
    """What `torch.save` writes (a zip holding a pickle)."""
    import torch

    buffer = io.BytesIO()
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, buffer)
    return buffer.getvalue()


@dataclass(frozen=True)
class BadFile:
    """One kind of broken file and the words its error must contain."""

    id: str
    make: Maker
    fragment: str


FILE_CASES: tuple[BadFile, ...] = (
    BadFile("empty", _content(lambda g: b""), "shorter than the 8-byte"),
    BadFile("under-8-bytes", _content(lambda g: b"\x10\x00\x00"), "shorter than the 8-byte"),
    BadFile("length-past-eof", _content(lambda g: join_file({}, b"", length=4096)), "past the end"),
    BadFile("header-not-json", _content(lambda g: join_file(None, raw_header=b"{\xff not json")), "not valid JSON"),
    BadFile("header-not-object", _content(lambda g: join_file([1, 2, 3])), "not a JSON object"),
    BadFile("header-too-large", _content(lambda g: join_file({}, length=2**40)), "over the"),
    BadFile("offsets-past-data", lambda g, f: _write(f, "bad.safetensors", g.read_bytes()[:-4]), "file holds"),
    BadFile("offsets-out-of-range", _edit(_beyond), "gap"),
    BadFile("offsets-overlap", _edit(_overlap), "overlaps"),
    BadFile("offsets-gap", _edit(_gap), "gap"),
    BadFile("data-not-covered", lambda g, f: _write(f, "bad.safetensors", g.read_bytes() + b"\0" * 8), "file holds"),
    BadFile("offsets-reversed", _edit(_set_first("data_offsets", [8, 0])), "bad data_offsets"),
    BadFile("unknown-dtype", _edit(_set_first("dtype", "F17")), "unknown dtype"),
    BadFile("dtype-not-a-string", _edit(_set_first("dtype", ["F32"])), "unknown dtype"),
    BadFile("shape-size-mismatch", _edit(_shape_mismatch), "needs"),
    BadFile("shape-negative", _edit(_set_first("shape", [-2, 4])), "not a list of sizes"),
    BadFile("shape-boolean", _edit(_shape_boolean), "not a list of sizes"),
    BadFile("offsets-boolean", _edit(_set_first("data_offsets", [False, True])), "bad data_offsets"),
    BadFile("metadata-not-strings", _edit(lambda h, d: ({**h, "__metadata__": {"ss_network_dim": 4}}, d)),
            "metadata must map strings"),
    BadFile("metadata-nested", _edit(lambda h, d: ({**h, "__metadata__": {"ss_tag_frequency": {"a": 1}}}, d)),
            "metadata must map strings"),
    BadFile("no-tensors", _content(lambda g: join_file({})), "empty file"),
    BadFile("full-model", _content(_full_model), "not an adapter"),
    BadFile("pickle-renamed", _content(_pickle_bytes), "pickle"),
    BadFile("torch-zip-renamed", _content(_zip_bytes), "pickle"),
    *(BadFile(f"pickle{s}", _content(_pickle_bytes, f"weights{s}"), "pickle") for s in (".ckpt", ".pt", ".bin")),
    BadFile("directory", lambda g, f: _mkdir(f / "folder.safetensors"), "directory"),
    BadFile("missing", lambda g, f: f / "missing.safetensors", "no such file"),
)
"""Broken files every command that reads an adapter must refuse with one clean line."""


def _mkdir(path: Path) -> Path:
    path.mkdir()
    (path / "inner.txt").write_text("not an adapter")
    return path


# --- modules that are broken inside a well-formed file ------------------------------------------------


def f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def module_file(folder: Path, params: dict[str, tuple[str, tuple[int, ...], bytes]], name="bad.safetensors",
                stem: str = ATTN, extra: dict | None = None) -> Path:
    """A file with one SD1 attention module `stem` (to_q: 32 → 32 in the tiny U-Net) holding `params`."""
    tensors = {f"{stem}.{p}": v for p, v in params.items()}
    tensors.update(extra or {})
    return _write(folder, name, tensor_bytes(tensors))


def down(rank: int = 2, fan_in: int = 32) -> tuple[str, tuple[int, ...], bytes]:
    return "F32", (rank, fan_in), f32(*[0.01 * (i % 7 - 3) for i in range(rank * fan_in)])


def up(rank: int = 2, out: int = 32) -> tuple[str, tuple[int, ...], bytes]:
    return "F32", (out, rank), f32(*[0.02 * (i % 5 - 2) for i in range(rank * out)])


# --- random corruption for the fuzzer --------------------------------------------------------------------


_JUNK_VALUES = (None, True, -1, 0, 1, 2**64, 1.5, "", "F32", "x" * 3, [], [1], [0, 0], [-1, 4], [2**70, 2**70 + 4],
                [True], [True, 32], [False, True], [0.0, 8.0],
                {}, {"a": 1}, [[1]], "BF16", "F8_E4M3", ["F32"], float("nan"))


def corrupt(good: bytes, rng: random.Random) -> bytes:
    """A randomly broken variant of a valid safetensors file: header edits, byte flips, cuts, bad lengths."""
    (n,) = struct.unpack("<Q", good[:8])
    header, data = json.loads(good[8 : 8 + n]), good[8 + n :]
    how = rng.randrange(9)
    if how == 0:  # flip a few random bytes anywhere (often inside the JSON)
        blob = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        return bytes(blob)
    if how == 1:  # cut the file
        return good[: rng.randrange(len(good))]
    if how == 2:  # a wrong header length
        length = rng.choice([0, 1, n - 1, n + 1, n + rng.randrange(1, 10_000), 2**63, rng.randrange(2**64)])
        return struct.pack("<Q", length) + good[8:]
    if how == 3:  # junk in one field of one tensor entry
        name = rng.choice(tensor_names(header))
        header[name][rng.choice(["dtype", "shape", "data_offsets", "extra"])] = rng.choice(_JUNK_VALUES)
    elif how == 4:  # an entry replaced or removed
        name = rng.choice(tensor_names(header))
        if rng.random() < 0.5:
            header[name] = rng.choice(_JUNK_VALUES)
        else:
            del header[name]
    elif how == 5:  # offsets nudged
        name = rng.choice(tensor_names(header))
        i = rng.randrange(2)
        header[name]["data_offsets"][i] += rng.choice([-8, -4, -2, -1, 1, 2, 4, 8, 2**33])
    elif how == 6:  # shape changed
        name = rng.choice(tensor_names(header))
        shape = header[name]["shape"]
        choice = rng.randrange(4)
        if choice == 0 and shape:
            shape[rng.randrange(len(shape))] = rng.choice([0, 1, 3, -1, 2**40])
        elif choice == 1:
            shape.append(rng.choice([1, 2]))
        elif choice == 2:
            header[name]["shape"] = []
        else:
            header[name]["dtype"] = rng.choice(["F16", "F64", "I8", "BOOL", "U64", "F8_E5M2", "Q4", "f32"])
    elif how == 7:  # metadata junk
        header["__metadata__"] = rng.choice([{"k": rng.choice(_JUNK_VALUES)}, rng.choice(_JUNK_VALUES), {"k": "v"}])
    else:  # the JSON text broken
        text = json.dumps(header)
        cut = rng.randrange(1, len(text))
        broken = rng.choice([text[:cut], text[:cut] + "}" + text[cut:], text.replace('"', "'", 1), "[" + text + "]",
                             text.replace(":", "=", 1), "\x00" * 8 + text])
        return join_file(None, data, raw_header=broken.encode("utf-8", "replace"))
    return join_file(header, data, raw_header=None)
