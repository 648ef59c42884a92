"""The golden kohya manifests are in the repository, complete, from one sd-scripts commit, as the generator writes them.

Every manifest test reads tests/data/kohya_manifests/; if a file were missing those tests would error, and this
file says which. The generator (scripts/make_kohya_manifests.py) needs sd-scripts to run; its `-m real` test
regenerates the files and compares (tests/real/test_sd_scripts.py). Here its pure parts are checked
against the committed files: the LBW mapping and the one-record-per-line JSON layout.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

MANIFESTS = [f"{arch}_{mode}" for arch in ("sd1", "sd2", "sd2_ckpt", "sdxl") for mode in ("lora", "locon")]
FILES = [*MANIFESTS, "lbw_blocks"]


def _generator():
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_kohya_manifests.py"
    spec = importlib.util.spec_from_file_location("make_kohya_manifests", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_folder_holds_every_manifest_and_nothing_else(manifest_dir):
    assert sorted(p.name for p in manifest_dir.iterdir()) == sorted([*(f"{n}.json" for n in FILES), "README.md"])


def test_every_file_records_one_commit_the_generator_and_a_transformers_4_environment(load_manifest):
    docs = [load_manifest(n) for n in FILES]
    assert len({d["kohya_commit"] for d in docs}) == 1 and re.fullmatch(r"[0-9a-f]{40}", docs[0]["kohya_commit"])
    assert {d["generator"] for d in docs} == {"python scripts/make_kohya_manifests.py --sd-scripts SD_SCRIPTS"}
    assert all(d["environment"]["transformers"].startswith("4.") for d in docs)


@pytest.mark.parametrize("name", MANIFESTS)
def test_counts_describe_the_module_list(name, load_manifest):
    doc = load_manifest(name)
    modules = doc["modules"]
    assert [m["name"] for m in modules] == sorted({m["name"] for m in modules})
    for component, count in doc["counts"].items():
        assert count == (len(modules) if component == "total" else sum(m["component"] == component for m in modules))
    for component, kinds in doc["counts_by_kind"].items():
        for kind, count in kinds.items():
            assert count == sum(m["component"] == component and m["kind"] == kind for m in modules)


@pytest.mark.parametrize("name", FILES)
def test_files_are_in_the_generators_layout(name, manifest_dir):
    text = (manifest_dir / f"{name}.json").read_text()
    assert _generator().render(json.loads(text)) + "\n" == text


def test_lbw_table_is_the_generators_mapping_of_the_locon_manifests(load_manifest):
    generator = _generator()
    lbw = load_manifest("lbw_blocks")
    for arch, place in (("sd1", generator.sd_lbw), ("sdxl", generator.sdxl_lbw)):
        unet = [m for m in load_manifest(f"{arch}_locon")["modules"] if m["component"] == "unet"]
        expected = {}
        for m in unet:
            block, group, index = place(m["name"])
            assert index == m["kohya_block_index"], m["name"]
            expected[m["name"]] = {"lbw": block, "group": group, "kohya_block_index": index}
        assert lbw[arch] == expected
