"""Shared helpers of the bad-input battery: which commands exist, how each is called, what a clean refusal is.

A clean refusal (STYLE.md "Errors and exit codes"): the documented exit code, one `error: …` line on stderr
naming the file (or argument) and the problem, no traceback, nothing new at or beside the output, and every
file that was there before byte-identical.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import pytest
from adapters import make_adapter

from blora_tools.cli import COMMANDS, main

READERS = ("inspect", "prune", "reweight", "merge", "resize", "convert", "compare", "render")
"""Commands that read adapter files (render with --dry-run: it opens and checks adapters, loads no model)."""

WRITERS = ("prune", "reweight", "merge", "resize", "convert")
"""Commands that write an adapter file."""

ALL = ("inspect", "prune", "reweight", "merge", "resize", "convert", "compare", "blocks", "plan", "render")
"""Every command the battery covers (issue 6)."""


def require(command: str) -> None:
    """Skip, saying why, when a command is not registered or its module does not import (yet)."""
    module = COMMANDS.get(command)
    if module is None:
        pytest.skip(f"command {command!r} is not in blora_tools.cli.COMMANDS")
    try:
        importlib.import_module(f"blora_tools.cli.{module}")
    except ImportError as err:  # a command still being written: reported as a skip, never silently dropped
        pytest.skip(f"blora_tools.cli.{module} does not import yet: {err}")


def reading_args(command: str, file: Path, good: Path, out: Path) -> list[str]:
    """Arguments that make `command` read `file` (with `good` as the other input where two are needed)."""
    args = {
        "inspect": ["inspect", file],
        "prune": ["prune", file, "--drop", "te", "-o", out],
        "reweight": ["reweight", file, "--weights", "in0=0.5", "-o", out],
        "merge": ["merge", good, file, "-o", out],
        "resize": ["resize", file, "--rank", "1", "-o", out],
        "convert": ["convert", file, "--to", "peft", "-o", out],
        "compare": ["compare", good, file],
        "render": ["render", "--model", out.parent / "no-model", "--lora", file, "--prompt", "a cat",
                   "-o", out.with_suffix(".png"), "--dry-run"],
    }[command]
    return [str(a) for a in args]


def invoke(runner, args) -> object:
    """Run the CLI; an exception other than a clean exit propagates with its traceback (it is a bug)."""
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative name → sha256): compared before and after a refused command."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def error_line(result) -> str:
    """The single stderr line of a refusal (exit 1): `error: <file>: <problem>`."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def usage_line(result) -> str:
    """The `Error: …` line of a usage error (exit 2; Click adds the usage and a --help hint)."""
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def assert_refused(result, folder: Path, before: dict[str, str], *mentions: str, code: int = 1) -> str:
    """Exit `code`, one clean line mentioning each of `mentions`, and `folder` exactly as it was.

    Exit 1 (bad input) and 130 (interrupted) print one `error: …` line; exit 2 (usage) Click's block.
    """
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    line = usage_line(result) if code == 2 else error_line(result)
    for text in mentions:
        assert text in line, (text, line)
    assert snapshot(folder) == before, "a file was left behind, changed or lost"
    return line


def writing_args(command: str, a: Path, b: Path, out: Path) -> list[str]:
    """Arguments that make writing `command` read `a` (and `b`, for merge) and write `out`."""
    args = {
        "prune": ["prune", a, "--drop", "te", "-o", out],
        "reweight": ["reweight", a, "--weights", "in0=0.5", "-o", out],
        "merge": ["merge", a, b, "--ratios", "1,0.7", "-o", out],
        "resize": ["resize", a, "--rank", "1", "-o", out],
        "convert": ["convert", a, "--to", "kohya", "--uniform-alpha", "-o", out],
    }[command]
    return [str(x) for x in args]


# --- fixtures of the output tests (import them by name: `from battery import inputs, sources`) ---------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    a = make_adapter(folder / "a.safetensors", "sd1", "locon", rank=2, per_block=1, seed=1)
    b = make_adapter(folder / "b.safetensors", "sd1", "lora", rank=3, per_block=1, seed=2)
    return a.read_bytes(), b.read_bytes()


@pytest.fixture
def inputs(tmp_path, sources):
    paths = []
    for name, data in zip(("a.safetensors", "b.safetensors"), sources):
        path = tmp_path / name
        path.write_bytes(data)
        paths.append(path)
    return paths
