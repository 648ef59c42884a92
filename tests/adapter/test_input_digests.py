"""Input hashes for `blora_history` taken from the bytes a command copies: one read of each input where its copies
run in file order, a whole-file hash otherwise; either way the history holds the file's own sha256 (hashlib over
the file, computed here), the output bytes do not depend on the route, and a failed write leaves no thread or
open file behind."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from adapters import make_adapter
from safetensors import safe_open
from safetensors.torch import load_file, save

from blora_tools.adapter import metadata
from blora_tools.adapter.metadata import InputDigests
from blora_tools.adapter.model import open_adapter
from blora_tools.adapter.writer import write_order
from blora_tools.errors import AdapterFileError, NonFiniteError
from blora_tools.ops.convert import convert
from blora_tools.ops.prune import prune
from blora_tools.ops.result import copied
from blora_tools.ops.reweight import reweight
from blora_tools.taxonomy.selectors import resolve_selector
from blora_tools.taxonomy.weights import parse_weights


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def source(tmp_path) -> Path:
    """A file with metadata (a longer header) and padding, so header and tensors are not aligned to anything."""
    return make_adapter(tmp_path / "in.safetensors", "sd1", "locon", per_block=None, metadata={"ss_note": "x" * 5})


@pytest.fixture
def reads(monkeypatch) -> dict[int, int]:
    """Bytes read from each file descriptor with os.pread (every tensor and hash read goes through it)."""
    counts: dict[int, int] = {}
    real = os.pread

    def counting(fd: int, n: int, offset: int) -> bytes:
        data = real(fd, n, offset)
        counts[os.fstat(fd).st_ino] = counts.get(os.fstat(fd).st_ino, 0) + len(data)
        return data

    monkeypatch.setattr(os, "pread", counting)
    return counts


def _digest(source: Path, entries) -> tuple[str, list[bytes]]:
    """(the short sha256 `InputDigests` gives, the bytes it handed out) for `entries` read in this order."""
    digests = InputDigests([source], entries)
    handed = [digests.through(e).produce() for e in entries]
    return digests.values()[metadata._input_placeholder(0)], handed


@pytest.mark.parametrize("every", [1, 2, 5], ids=["all", "every-2nd", "every-5th"])
def test_copies_in_file_order_hash_the_file_in_one_read(source, reads, every):
    adapter = open_adapter(source)
    keys = sorted(adapter.header.tensors, key=lambda k: adapter.info(k).begin)[::every]
    entries = write_order(copied(adapter, k) for k in keys)
    reads.clear()
    digest, handed = _digest(source, entries)
    assert reads == {source.stat().st_ino: source.stat().st_size}
    assert digest == _file_sha256(source)[:10]
    assert handed == [adapter.raw(e.name) for e in entries]


def test_copies_out_of_file_order_hash_the_whole_file(source, reads):
    """Renamed keys (convert) are written in another order: the input is then hashed whole, beside the copies."""
    adapter = open_adapter(source)
    keys = sorted(adapter.header.tensors, key=lambda k: adapter.info(k).begin)
    entries = [copied(adapter, k, f"{i:05d}") for i, k in enumerate(reversed(keys))]
    assert write_order(entries) == entries
    digest, handed = _digest(source, entries)
    assert digest == _file_sha256(source)[:10]
    assert handed == [adapter.raw(k) for k in reversed(keys)]


def test_an_input_nothing_is_copied_from_is_hashed_whole(source, tmp_path):
    other = make_adapter(tmp_path / "other.safetensors", "sd1", "lora", seed=3)
    adapter = open_adapter(source)
    entries = write_order(copied(adapter, k) for k in adapter.header.tensors)
    digests = InputDigests([source, other], entries)
    for e in entries:
        digests.through(e).produce()
    got = digests.values()
    assert list(got.values()) == [_file_sha256(source)[:10], _file_sha256(other)[:10]]


def _commands(path: Path):
    adapter = open_adapter(path)
    return {
        "prune": lambda: prune(adapter, resolve_selector("in1,out3", "sd1"), keep=False, selector="in1,out3"),
        "reweight": lambda: reweight(adapter, parse_weights("in1=0.5,out3=0").resolve("sd1"), text="in1=0.5,out3=0"),
        "convert-kohya": lambda: convert(adapter, to="kohya", uniform_alpha=True),
        "convert-peft": lambda: convert(adapter, to="peft"),
    }


@pytest.mark.parametrize("command", ["prune", "reweight", "convert-kohya", "convert-peft"])
def test_output_bytes_do_not_depend_on_the_route(tmp_path, monkeypatch, command):
    """One result written with the one-pass hash and again with every input hashed whole: the same file, the
    history names the input's sha256, and the file is what safetensors.torch.save writes for its tensors."""
    path = make_adapter(tmp_path / "in.safetensors", "sd1", "locon", alpha=lambda layer: 2.0 if layer.kind == "linear"
                        else 3.0)
    result = _commands(path)[command]()
    one_pass = result.save(tmp_path / "one.safetensors")
    monkeypatch.setattr(metadata, "_in_file_order", lambda spans: False)
    whole = result.save(tmp_path / "whole.safetensors")
    assert one_pass.read_bytes() == whole.read_bytes()
    with safe_open(one_pass, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["blora_history"])[-1]["inputs"][0]["sha256"] == _file_sha256(path)[:10]
    ours, theirs = one_pass.read_bytes(), save(load_file(one_pass), meta)
    assert [json.loads(h) for h, _ in map(_split, (ours, theirs))] == [json.loads(_split(theirs)[0])] * 2
    assert _split(ours)[1] == _split(theirs)[1]  # metadata order aside (safetensors' own is a hash map's)


def _split(raw: bytes) -> tuple[bytes, bytes]:
    """(header JSON, data) of a safetensors file's bytes."""
    n = int.from_bytes(raw[:8], "little")
    return raw[8 : 8 + n], raw[8 + n :]


def test_an_input_cut_short_while_writing_is_refused_and_nothing_written(source, tmp_path):
    result = _commands(source)["prune"]()
    with source.open("r+b") as f:
        f.truncate(source.stat().st_size // 2)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(AdapterFileError, match="file ended inside tensor"):
        result.save(tmp_path / "o.safetensors")
    assert sorted(os.listdir(tmp_path)) == before


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
@pytest.mark.parametrize("route", ["one-pass", "whole-file"])
def test_a_refused_write_leaves_no_hashing_thread_or_open_input(tmp_path, monkeypatch, route):
    path = make_adapter(tmp_path / "in.safetensors", "sd1", "lora", extra={"bundle_emb.x": torch.tensor([float("nan")])})
    result = _commands(path)["prune"]()
    if route == "whole-file":
        monkeypatch.setattr(metadata, "_in_file_order", lambda spans: False)
    threads, fds = threading.active_count(), _open_fds()
    with pytest.raises(NonFiniteError):
        result.save(tmp_path / "o.safetensors")
    assert (threading.active_count(), _open_fds()) == (threads, fds)
