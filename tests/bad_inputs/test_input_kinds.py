"""Inputs that are not regular files, or too large, are refused at once and never block.

A FIFO without a writer makes a plain open() wait forever and /dev/zero reads without end; every command
that reads an adapter, `reweight --preset-file` and `inspect FOLDER` refuse them with one line. A watchdog
writes into the FIFO after a while, so a regression fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import pytest
from adapters import make_adapter
from battery import READERS, assert_refused, invoke, reading_args, require, snapshot

from blora_tools.adapter.header import read_header
from blora_tools.errors import AdapterFileError, SelectorError
from blora_tools.taxonomy.weights import MAX_PRESET_FILE_BYTES, read_preset_file

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")

_WATCHDOG_S = 20.0


@contextmanager
def _fifo(path):
    """A FIFO at `path`; if anything opens it for reading and blocks, a writer appears after a while."""
    os.mkfifo(path)
    done = threading.Event()

    def unblock():
        while not done.wait(_WATCHDOG_S):
            try:  # succeeds only while a reader is blocked in open()
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                continue
            os.write(fd, b"\0" * 16)
            os.close(fd)

    watchdog = threading.Thread(target=unblock, daemon=True)
    watchdog.start()
    try:
        yield path
    finally:
        done.set()
        watchdog.join()


@pytest.fixture
def good(tmp_path):
    return make_adapter(tmp_path / "good.safetensors", "sd1", "lora", rank=2, per_block=1)


@pytest.mark.parametrize("command", READERS)
def test_fifo_as_an_adapter_is_refused(runner, tmp_path, good, command):
    require(command)
    with _fifo(tmp_path / "pipe.safetensors") as fifo:
        before = snapshot(tmp_path)
        result = invoke(runner, reading_args(command, fifo, good, tmp_path / "out.safetensors"))
        assert_refused(result, tmp_path, before, str(fifo), "is a FIFO (named pipe), not a regular file (a .safetensors file expected)")


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "/dev/urandom"])
@pytest.mark.parametrize("command", ["inspect", "prune", "merge"])
def test_device_as_an_adapter_is_refused(runner, tmp_path, good, command, device):
    require(command)
    if not os.path.exists(device):
        pytest.skip(f"no {device}")
    before = snapshot(tmp_path)
    result = invoke(runner, reading_args(command, device, good, tmp_path / "out.safetensors"))
    assert_refused(result, tmp_path, before, device, "is a character device")


def test_fifo_inside_a_scanned_folder_is_refused(runner, tmp_path, good):
    require("inspect")
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "good.safetensors").write_bytes(good.read_bytes())
    with _fifo(folder / "z-pipe.safetensors") as fifo:
        before = snapshot(tmp_path)
        result = invoke(runner, ["inspect", folder])
        assert_refused(result, tmp_path, before, str(fifo), "FIFO")
        result = invoke(runner, ["inspect", "--no-stats", "--json", folder])
        assert_refused(result, tmp_path, before, str(fifo), "FIFO")


def test_read_header_refuses_every_non_regular_kind(tmp_path):
    import socket

    with _fifo(tmp_path / "p.safetensors") as fifo:
        with pytest.raises(AdapterFileError, match="FIFO"):
            read_header(fifo)
    with pytest.raises(AdapterFileError, match="directory"):
        read_header(tmp_path)
    sock_path = tmp_path / "s.safetensors"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(sock_path))
        with pytest.raises(AdapterFileError, match="socket"):
            read_header(sock_path)
    finally:
        server.close()


def test_a_path_swapped_for_a_fifo_after_the_check_does_not_block(tmp_path, monkeypatch):
    """The race the O_NONBLOCK open closes: stat says regular file, open gets a FIFO."""
    import blora_tools.inputs as inputs

    regular = tmp_path / "r.safetensors"
    regular.write_bytes(b"x" * 16)
    real_stat = os.stat
    with _fifo(tmp_path / "p.safetensors") as fifo:
        monkeypatch.setattr(inputs.os, "stat", lambda p, *a, **k: real_stat(regular if str(p) == str(fifo) else p))
        with pytest.raises(AdapterFileError, match="FIFO"):
            read_header(fifo)


# --- preset files -----------------------------------------------------------------------------------------------


def test_fifo_as_a_preset_file_is_refused(runner, tmp_path, good):
    require("reweight")
    with _fifo(tmp_path / "presets.txt") as fifo:
        before = snapshot(tmp_path)
        result = invoke(runner, ["reweight", good, "--preset", "MINE", "--preset-file", fifo, "-o", tmp_path / "o.safetensors"])
        assert_refused(result, tmp_path, before, str(fifo), "FIFO")


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_device_as_a_preset_file_is_refused(tmp_path, device):
    if not os.path.exists(device):
        pytest.skip(f"no {device}")
    with pytest.raises(SelectorError, match="character device"):
        read_preset_file(device)


def test_oversized_preset_file_is_refused_without_reading_it_all(tmp_path):
    big = tmp_path / "presets.txt"
    line = b"P:" + b",".join([b"1"] * 17) + b"\n"
    big.write_bytes(line * (MAX_PRESET_FILE_BYTES // len(line) + 2))
    with pytest.raises(SelectorError) as err:
        read_preset_file(big)
    assert "larger than the 1,048,576-byte limit" in err.value.message and str(big) in str(err.value)


def test_missing_and_folder_preset_files(tmp_path):
    with pytest.raises(SelectorError, match="no such file"):
        read_preset_file(tmp_path / "missing.txt")
    with pytest.raises(SelectorError, match="directory"):
        read_preset_file(tmp_path)


@pytest.mark.parametrize("option", ["--model", "--config"])
def test_fifo_as_a_render_model_or_config_is_refused(runner, tmp_path, good, option):
    require("render")
    with _fifo(tmp_path / "model.safetensors") as fifo:
        model = fifo if option == "--model" else tmp_path / "no-model"
        extra = ["--config", fifo] if option == "--config" else []
        before = snapshot(tmp_path)
        result = invoke(runner, ["render", "--model", model, *extra, "--lora", good, "--prompt", "a cat",
                                 "-o", tmp_path / "grid.png"])
        assert_refused(result, tmp_path, before, str(fifo), "FIFO")
