"""The writer: same data bytes and hashes as sd-scripts, atomic, and refusing unsafe outputs."""

import hashlib
import io
import os
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from blora_tools.adapter.writer import Entry, save_state_dict, write_entries
from blora_tools.errors import OutputError


def _sd_scripts_hashes(tensors, metadata):
    """sd-scripts' precalculate_safetensors_hashes, restated: hashes of `safetensors.torch.save` output."""
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = io.BytesIO(save(tensors, ss_only))
    n = int.from_bytes(b.read(8), "little")
    b.seek(8 + n)
    model = hashlib.sha256(b.read()).hexdigest()
    b.seek(0x100000)
    legacy = hashlib.sha256(b.read(0x10000)).hexdigest()[:8]
    return model, legacy


@pytest.mark.parametrize("big", [False, True], ids=["small", "over-1MiB"])
def test_hashes_match_sd_scripts(tmp_path, big):
    torch.manual_seed(0)
    tensors = {
        "lora_unet_x.lora_down.weight": torch.randn(4, 100_000 if big else 10),
        "lora_unet_x.lora_up.weight": torch.randn(8, 4).half(),
        "lora_unet_x.alpha": torch.tensor(1.0, dtype=torch.bfloat16),
    }
    meta = {"ss_network_dim": "4"}  # one ss_ key: safetensors' own metadata order is then fixed
    path = save_state_dict(tmp_path / "o.safetensors", tensors, meta)
    with safe_open(path, "pt") as f:
        got = f.metadata()
    assert (got["sshs_model_hash"], got["sshs_legacy_hash"]) == _sd_scripts_hashes(tensors, meta)
    loaded = load_file(path)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_data_section_is_what_safetensors_writes(tmp_path):
    tensors = {"b": torch.randn(3), "a": torch.randn(2).half(), "c": torch.tensor(2, dtype=torch.int64)}
    ours = save_state_dict(tmp_path / "o.safetensors", tensors, {}).read_bytes()
    theirs = save(tensors, {})
    tail = lambda raw: raw[8 + int.from_bytes(raw[:8], "little"):]  # noqa: E731
    assert tail(ours) == tail(theirs)


def test_caller_metadata_is_not_modified(tmp_path):
    meta = {"ss_a": "1"}
    save_state_dict(tmp_path / "o.safetensors", {"x": torch.zeros(1)}, meta)
    assert meta == {"ss_a": "1"}


def test_refusals(tmp_path):
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep")
    entries = [Entry("x", "F32", (1,), lambda: b"\0\0\0\0")]
    with pytest.raises(OutputError, match="--force"):
        write_entries(existing, entries, {})
    assert existing.read_bytes() == b"keep"
    with pytest.raises(OutputError, match="one of the inputs"):
        write_entries(existing, entries, {}, inputs=[existing], force=True)
    with pytest.raises(OutputError, match="does not exist"):
        write_entries(tmp_path / "nope" / "o.safetensors", entries, {})
    with pytest.raises(OutputError, match="directory"):
        write_entries(tmp_path, entries, {})
    write_entries(existing, entries, {}, force=True)
    assert existing.read_bytes() != b"keep"


def test_failure_mid_write_leaves_nothing(tmp_path):
    def boom():
        raise KeyboardInterrupt

    target = tmp_path / "o.safetensors"
    entries = [Entry("a", "F32", (1,), lambda: b"\0" * 4), Entry("b", "F32", (1,), boom)]
    with pytest.raises(KeyboardInterrupt):
        write_entries(target, entries, {})
    assert os.listdir(tmp_path) == []


def test_disk_full_is_an_output_error_and_leaves_nothing(tmp_path):
    def full():
        raise OSError(28, "No space left on device")

    target = tmp_path / "o.safetensors"
    with pytest.raises(OutputError, match="No space left"):
        write_entries(target, [Entry("a", "F32", (1,), full)], {})
    assert os.listdir(tmp_path) == []


def test_late_metadata_is_filled_in_after_the_data_and_hashes_still_match(tmp_path):
    from blora_tools.adapter.tensors import encode

    tensors = {"lora_unet_x.lora_down.weight": torch.randn(4, 10), "lora_unet_x.alpha": torch.tensor(2.0)}
    entries = [Entry(k, "F32", tuple(t.shape), lambda t=t: encode(t)) for k, t in tensors.items()]
    calls: list[int] = []
    meta = {"ss_network_dim": "4", "blora_history": '[{"sha256": "?000000000"}]'}

    def late():
        calls.append(1)
        return {"blora_history": '[{"sha256": "0123456789"}]'}

    path = write_entries(tmp_path / "o.safetensors", entries, meta, late=late)
    with safe_open(path, "pt") as f:
        got = f.metadata()
    assert got["blora_history"] == '[{"sha256": "0123456789"}]' and calls == [1]
    assert (got["sshs_model_hash"], got["sshs_legacy_hash"]) == _sd_scripts_hashes(tensors, {"ss_network_dim": "4"})
    assert all(torch.equal(load_file(path)[k], v) for k, v in tensors.items())


def _writeback_entries() -> tuple[dict, list[Entry]]:
    from blora_tools.adapter.tensors import encode

    tensors = {f"t{i}": torch.randn(50 + i) for i in range(6)}
    return tensors, [Entry(k, "F32", tuple(t.shape), lambda t=t: encode(t)) for k, t in tensors.items()]


@pytest.mark.parametrize("answer", [0, -1, None], ids=["started", "refused", "unavailable"])
def test_writeback_starts_in_order_and_never_changes_the_file(tmp_path, monkeypatch, answer):
    """Disk writes are started behind the writer (Linux sync_file_range) over contiguous ranges from the start; a
    refusal stops the requests, and without the call (other systems) nothing is asked; the file is the same."""
    from blora_tools.adapter import writer

    calls: list[tuple[int, int, int]] = []

    def record(fd, offset, length, flags):
        calls.append((offset, length, flags))
        return answer

    monkeypatch.setattr(writer, "_WRITEBACK_STEP", 400)
    monkeypatch.setattr(writer, "_sync_file_range", lambda: None if answer is None else record)
    tensors, entries = _writeback_entries()
    path = write_entries(tmp_path / "o.safetensors", entries, {}, hashes=False)
    assert path.read_bytes() == save(tensors)
    if answer is None:
        assert calls == []
    elif answer == -1:
        assert calls == [(0, calls[0][1], writer._SYNC_FILE_RANGE_WRITE)] and calls[0][1] >= 400
    else:
        assert len(calls) >= 2 and all(flags == writer._SYNC_FILE_RANGE_WRITE and n >= 400 for _, n, flags in calls)
        assert [offset for offset, _, _ in calls] == [0] + [o + n for o, n, _ in calls[:-1]]
        assert calls[-1][0] + calls[-1][1] <= path.stat().st_size


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_the_real_writeback_call_is_accepted(tmp_path, monkeypatch):
    from blora_tools.adapter import writer

    real = writer._sync_file_range()
    answers: list[int] = []
    monkeypatch.setattr(writer, "_sync_file_range", lambda: lambda *args: answers.append(real(*args)) or answers[-1])
    monkeypatch.setattr(writer, "_WRITEBACK_STEP", 400)
    tensors, entries = _writeback_entries()
    assert write_entries(tmp_path / "o.safetensors", entries, {}, hashes=False).read_bytes() == save(tensors)
    assert len(answers) >= 2 and set(answers) == {0}
