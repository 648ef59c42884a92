"""Fixtures of the bad-input battery shared by its output tests: two small SD1 adapters copied into each test's folder."""

from __future__ import annotations

import pytest
from adapters import make_adapter


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
