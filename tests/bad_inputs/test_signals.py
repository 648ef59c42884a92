"""SIGTERM and SIGHUP (what `timeout`, systemd and a closed terminal send) are handled like Ctrl-C.

A real process gets the signal in the middle of writing: it removes its temporary file, prints one line and
exits with 128 + the signal number; the folder is exactly as it was. A signal that was ignored when the
command started (nohup) stays ignored.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from adapters import make_adapter
from battery import invoke, require, snapshot

pytestmark = pytest.mark.skipif(os.name != "posix", reason="needs POSIX signals")


@pytest.fixture
def inputs(tmp_path):
    a = make_adapter(tmp_path / "a.safetensors", "sd1", "locon", rank=2, per_block=1, seed=1)
    b = make_adapter(tmp_path / "b.safetensors", "sd1", "lora", rank=3, per_block=1, seed=2)
    return a, b


def _merge_signalling_itself(a, b, out, signum: int, ignore: bool = False) -> str:
    """A program running `merge` that sends itself `signum` while the third module is being written."""
    return textwrap.dedent(f"""
        import os, signal
        if {ignore!r}:
            signal.signal({signum}, signal.SIG_IGN)
        import blora_tools.ops.merge as merge_ops
        real, calls = merge_ops._concat, []
        def producer(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), {signum})
            return real(*args, **kwargs)
        merge_ops._concat = producer
        from blora_tools.cli import main
        main(["merge", {str(a)!r}, {str(b)!r}, "-o", {str(out)!r}], prog_name="blora-tools")
    """)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_signal_in_the_middle_of_a_write_leaves_nothing(tmp_path, inputs, name):
    require("merge")
    signum = getattr(signal, name)
    out = tmp_path / "ab.safetensors"
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _merge_signalling_itself(*inputs, out, signum)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signum, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: terminated by {name}; nothing was written"], proc.stderr
    assert snapshot(tmp_path) == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], os.listdir(tmp_path)


def test_sighup_ignored_by_nohup_stays_ignored(tmp_path, inputs):
    require("merge")
    out = tmp_path / "ab.safetensors"
    proc = subprocess.run([sys.executable, "-c", _merge_signalling_itself(*inputs, out, signal.SIGHUP, ignore=True)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from safetensors import safe_open

    with safe_open(str(out), framework="numpy") as f:
        assert len(list(f.keys())) > 0


def test_sigterm_from_outside_while_reading(tmp_path, inputs):
    """The signal comes from another process (as `timeout` sends it), while the command is busy."""
    require("inspect")
    ready = tmp_path / "ready"
    code = textwrap.dedent(f"""
        import pathlib, time
        import blora_tools.ops.stats as stats
        real = stats.inspect_adapter
        def slow(*args, **kwargs):
            pathlib.Path({str(ready)!r}).write_text("x")
            time.sleep(120)
            return real(*args, **kwargs)
        stats.inspect_adapter = slow
        from blora_tools.cli import main
        main(["inspect", {str(inputs[0])!r}], prog_name="blora-tools")
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines() == ["error: terminated by SIGTERM; nothing was written"], err


def test_handlers_are_restored_after_a_command(runner, tmp_path, inputs):
    """The CLI also runs inside other programs (tests, notebooks): their handlers come back afterwards."""
    require("inspect")
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    result = invoke(runner, ["inspect", inputs[0], "--no-stats"])
    assert result.exit_code == 0, result.stderr
    assert {s: signal.getsignal(s) for s in before} == before
