"""Shared fixtures: golden manifests, CLI runner, file checksums."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """One intra-op thread: the models here are tiny, and spinning OpenMP threads on a shared 2-core
    machine made single convolutions 50× slower than one thread (measured)."""
    import torch

    torch.set_num_threads(1)


def _manifest_dir() -> Path | None:
    for candidate in (
        os.environ.get("BLORA_MANIFESTS"),
        REPO.parent / "shared" / "fixtures" / "kohya_manifests",
    ):
        if candidate and Path(candidate, "sd1_lora.json").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def manifest_dir() -> Path:
    """The golden kohya manifests (../shared/fixtures/kohya_manifests)."""
    found = _manifest_dir()
    if found is None:
        pytest.skip("golden manifests not found (set BLORA_MANIFESTS)")
    return found


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
