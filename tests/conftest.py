"""Shared fixtures: golden manifests, CLI runner, file checksums."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """One intra-op thread: the models here are tiny, and spinning OpenMP threads on a shared 2-core
    machine made single convolutions 50× slower than one thread (measured)."""
    import torch

    torch.set_num_threads(1)


MANIFEST_DIR = REPO / "tests" / "data" / "kohya_manifests"


@pytest.fixture(scope="session")
def manifest_dir() -> Path:
    """The golden kohya manifests, written by scripts/make_kohya_manifests.py (see the README beside them)."""
    return MANIFEST_DIR


@pytest.fixture(scope="session")
def load_manifest(manifest_dir):
    """Load one manifest by name, e.g. load_manifest('sd1_lora')."""
    cache: dict[str, dict] = {}

    def load(name: str) -> dict:
        if name not in cache:
            cache[name] = json.loads((manifest_dir / f"{name}.json").read_text())
        return cache[name]

    return load


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def runner():
    from click.testing import CliRunner

    return CliRunner()
