"""Outputs: never onto an input, never over a file without --force, never half-written (disk full, Ctrl-C).

Each case runs through every writing command (and render's output checks, which run before any model is
loaded), and checks the folder afterwards: nothing new at or beside the output, everything else byte-identical.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from contextlib import contextmanager

import pytest
from battery import inputs, sources  # noqa: F401  (fixtures)
from battery import READERS, WRITERS, assert_refused, invoke, reading_args, require, snapshot, writing_args

from blora_tools.errors import OutputError


# --- refused outputs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("command", WRITERS)
def test_output_equal_to_an_input(runner, tmp_path, inputs, command, force):
    require(command)
    a, b = inputs
    target = b if command == "merge" else a  # merge: the second input, the other commands: their only one
    before = snapshot(tmp_path)
    result = invoke(runner, writing_args(command, a, b, target) + (["--force"] if force else []))
    assert_refused(result, tmp_path, before, str(target), "is one of the inputs")


@pytest.mark.parametrize("command", WRITERS)
def test_output_that_is_an_input_under_another_name(runner, tmp_path, inputs, command):
    """The same file through a hard link: `samefile`, not the path text, decides."""
    require(command)
    a, b = inputs
    link = tmp_path / "link.safetensors"
    os.link(a, link)
    before = snapshot(tmp_path)
    result = invoke(runner, writing_args(command, a, b, link) + ["--force"])
    assert_refused(result, tmp_path, before, str(link), "is one of the inputs")


@pytest.mark.parametrize("command", WRITERS)
def test_existing_output_without_force(runner, tmp_path, inputs, command):
    require(command)
    a, b = inputs
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"an older file the user wants to keep")
    before = snapshot(tmp_path)
    result = invoke(runner, writing_args(command, a, b, out))
    assert_refused(result, tmp_path, before, str(out), "--force")


@pytest.mark.parametrize("command", WRITERS)
def test_existing_output_with_force_is_replaced_whole(runner, tmp_path, inputs, command):
    require(command)
    a, b = inputs
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    out.chmod(0o664)  # a file in a folder shared with a UI service: the replacement keeps its permissions
    before = snapshot(tmp_path)
    result = invoke(runner, writing_args(command, a, b, out) + ["--force"])
    assert result.exit_code == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o664
    after = snapshot(tmp_path)
    assert sorted(after) == sorted(before) and after["out.safetensors"] != before["out.safetensors"]
    assert all(after[name] == before[name] for name in ("a.safetensors", "b.safetensors"))


@pytest.mark.parametrize("command", WRITERS)
def test_output_folder_missing(runner, tmp_path, inputs, command):
    require(command)
    a, b = inputs
    out = tmp_path / "no such folder" / "out.safetensors"
    before = snapshot(tmp_path)
    result = invoke(runner, writing_args(command, a, b, out))
    assert_refused(result, tmp_path, before, str(out), "does not exist")
    assert not out.parent.exists()


@pytest.mark.parametrize("command", WRITERS)
def test_output_that_is_a_folder_is_a_usage_error(runner, tmp_path, inputs, command):
    require(command)
    a, b = inputs
    (tmp_path / "folder").mkdir()
    before = snapshot(tmp_path)
    result = invoke(runner, writing_args(command, a, b, tmp_path / "folder"))
    assert_refused(result, tmp_path, before, "is a directory", code=2)


@pytest.mark.parametrize("command", WRITERS)
def test_output_not_safetensors(runner, tmp_path, inputs, command):
    require(command)
    a, b = inputs
    out = tmp_path / "out.ckpt"
    before = snapshot(tmp_path)
    result = invoke(runner, writing_args(command, a, b, out))
    assert_refused(result, tmp_path, before, str(out), ".safetensors")


@pytest.mark.parametrize(
    "make_out, fragment",
    [
        (lambda folder, lora: lora, "must end in .png"),  # -o the adapter itself
        (lambda folder, lora: folder / "no such folder" / "grid.png", "does not exist"),
        (lambda folder, lora: _existing(folder / "grid.png"), "--force"),
    ],
    ids=["output-is-the-input", "folder-missing", "exists-without-force"],
)
def test_render_refuses_its_output_before_loading_anything(runner, tmp_path, inputs, make_out, fragment):
    require("render")
    out = make_out(tmp_path, inputs[0])
    before = snapshot(tmp_path)
    result = invoke(runner, ["render", "--model", tmp_path / "no-model", "--lora", inputs[0], "--prompt", "a cat",
                             "-o", out, "--dry-run"])
    assert_refused(result, tmp_path, before, str(out), fragment)


def _existing(path):
    path.write_bytes(b"an older image")
    return path


# --- failures while writing --------------------------------------------------------------------------------


class _FullDisk:
    """A file whose `fail_at`-th write fails with ENOSPC (by default the third: the header went through and the
    disk fills up in the tensor data)."""

    def __init__(self, file, fail_at: int = 3):
        self._file, self._writes, self._fail_at = file, 0, fail_at

    def write(self, data):
        self._writes += 1
        if self._writes >= self._fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)


@pytest.mark.parametrize("command", WRITERS)
def test_disk_full_during_write(runner, tmp_path, inputs, monkeypatch, command):
    require(command)
    import blora_tools.adapter.writer as writer

    real_fdopen = os.fdopen
    monkeypatch.setattr(writer.os, "fdopen", lambda fd, *a, **k: _FullDisk(real_fdopen(fd, *a, **k)))
    a, b = inputs
    out = tmp_path / "out.safetensors"
    before = snapshot(tmp_path)
    result = invoke(runner, writing_args(command, a, b, out))
    assert_refused(result, tmp_path, before, str(out), "No space left on device", "nothing was written")


@pytest.mark.parametrize("command", WRITERS)
def test_folder_where_no_temporary_file_can_be_made(runner, tmp_path, inputs, monkeypatch, command):
    """A read-only output folder (simulated: tests may run as root, where chmod does not stop writes)."""
    require(command)
    import blora_tools.adapter.writer as writer

    real_mkstemp = tempfile.mkstemp

    def refused(*args, dir=None, **kwargs):
        if dir is not None and os.path.samefile(dir, tmp_path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(writer.tempfile, "mkstemp", refused)
    a, b = inputs
    out = tmp_path / "out.safetensors"
    before = snapshot(tmp_path)
    result = invoke(runner, writing_args(command, a, b, out))
    assert_refused(result, tmp_path, before, str(out), "Permission denied")


@contextmanager
def _interrupting_progress(app, description, total):
    """cli.output.progress whose second report is Ctrl-C (SIGINT arrives as KeyboardInterrupt)."""
    calls = []

    def advance(n=1):
        calls.append(n)
        if len(calls) >= 2:
            raise KeyboardInterrupt

    yield advance


@pytest.mark.parametrize("command", WRITERS)
def test_ctrl_c_while_writing_leaves_nothing(runner, tmp_path, inputs, monkeypatch, command):
    require(command)
    from blora_tools.cli import output

    monkeypatch.setattr(output, "progress", _interrupting_progress)
    a, b = inputs
    before = snapshot(tmp_path)
    result = invoke(runner, writing_args(command, a, b, tmp_path / "out.safetensors"))
    assert_refused(result, tmp_path, before, "interrupted", "nothing was written", code=130)


@pytest.mark.parametrize("method", ["concat", "svd"])
def test_ctrl_c_in_the_middle_of_a_long_merge(runner, tmp_path, inputs, monkeypatch, method):
    """The interrupt comes from the tensor producer, deep in the write, after some modules were written."""
    require("merge")
    import blora_tools.ops.merge as merge_ops

    name = "_concat" if method == "concat" else "_compressed"
    real = getattr(merge_ops, name)
    calls = []

    def slow_then_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_ops, name, slow_then_interrupted)
    a, b = inputs
    before = snapshot(tmp_path)
    extra = ["--method", "svd", "--rank", "2"] if method == "svd" else []
    # two module workers (the policy would pick them from the machine's load), so the interrupt comes from one
    result = invoke(runner, ["merge", a, b, "-o", tmp_path / "ab.safetensors", *extra, "--threads", "2"])
    assert 5 <= len(calls) <= 5 + 4  # the read-ahead (compute.Ahead: two per worker) may have started four more
    assert_refused(result, tmp_path, before, "interrupted", code=130)


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="needs POSIX signals")
def test_a_real_sigint_in_the_middle_of_a_merge(tmp_path, inputs):
    """The process really gets SIGINT while writing: exit 130, one line, and the folder as it was."""
    require("merge")
    a, b = inputs
    out = tmp_path / "ab.safetensors"
    code = textwrap.dedent(f"""
        import os, signal
        import blora_tools.ops.merge as merge_ops
        real, calls = merge_ops._concat, []
        def producer(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return real(*args, **kwargs)
        merge_ops._concat = producer
        from blora_tools.cli import main
        main(["merge", {str(a)!r}, {str(b)!r}, "-o", {str(out)!r}], prog_name="blora-tools")
    """)
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: interrupted; nothing was written"], proc.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", READERS)
def test_ctrl_c_while_reading(runner, tmp_path, inputs, monkeypatch, command):
    require(command)
    import blora_tools.adapter.model as model

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "open_adapter", interrupted)
    a, b = inputs
    before = snapshot(tmp_path)
    result = invoke(runner, reading_args(command, a, b, tmp_path / "out.safetensors"))
    assert_refused(result, tmp_path, before, "interrupted", code=130)


def test_ctrl_c_while_planning(runner, tmp_path, monkeypatch):
    require("plan")
    import kohya_plugin.plan as plan

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plan, "plan_network", interrupted)
    result = invoke(runner, ["plan", "--arch", "sd1"])
    assert_refused(result, tmp_path, {}, "interrupted", code=130)


# --- the atomic byte write render uses for its PNG and JSON (the CLI reaches it only after loading a model) ---


def test_render_write_is_atomic_when_the_disk_fills(tmp_path, monkeypatch):
    from blora_tools.adapter.writer import write_bytes_atomic

    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _FullDisk(real_fdopen(fd, *a, **k), fail_at=1))
    with pytest.raises(OutputError, match="No space left"):
        write_bytes_atomic(tmp_path / "grid.png", b"png bytes")
    assert os.listdir(tmp_path) == []


def test_render_write_interrupted_leaves_nothing(tmp_path, monkeypatch):
    from blora_tools.adapter.writer import write_bytes_atomic

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomic(tmp_path / "grid.png", b"png bytes")
    assert os.listdir(tmp_path) == []


def test_byte_write_in_a_read_only_folder_is_one_clean_error(tmp_path, monkeypatch):
    """Regression: render's own copy of the atomic write created its temporary file outside the try."""
    import tempfile

    from blora_tools.adapter.writer import write_bytes_atomic

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(OutputError, match="Permission denied"):
        write_bytes_atomic(tmp_path / "grid.png", b"png bytes")
    assert os.listdir(tmp_path) == []
