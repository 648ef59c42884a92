"""What Flux.1/SD3 loaders skip in an output is said (ops.result.loader_notes), from facts pinned elsewhere:
diffusers 0.42 drops kohya Flux embedders/final layer and converts no kohya SD3 or T5 name (tests/test_dit_oracles.py),
sd-scripts' lora_flux/lora_sd3 read only kohya's fused names (golden manifests)."""

from __future__ import annotations

from blora_tools.adapter.model import open_adapter
from blora_tools.ops.result import loader_notes

from dit_adapters import make_dit_adapter


def _notes(path) -> list[str]:
    adapter = open_adapter(path)
    return loader_notes(adapter.modules.values(), adapter.arch, one_alpha=True)


def test_kohya_flux_output_names_what_diffusers_skips(tmp_path):
    notes = _notes(make_dit_adapter(tmp_path / "k.safetensors", "flux", "kohya"))
    assert any(n.startswith("10 Flux embedder/final-layer module(s): diffusers 0.42 skips them") for n in notes), notes
    assert not any("diffusers' names" in n for n in notes)
    only_blocks = _notes(make_dit_adapter(tmp_path / "b.safetensors", "flux", "kohya", blocks={"D00", "S01"}))
    assert only_blocks == []


def test_split_names_in_a_kohya_format_file_are_flagged_for_sd_scripts(tmp_path):
    notes = _notes(make_dit_adapter(tmp_path / "o.safetensors", "flux", "onetrainer"))
    assert any(n.startswith("50 module(s) have diffusers' names") and "convert --to kohya" in n for n in notes), notes
    assert not any("embedder/final-layer" in n for n in notes)


def test_kohya_sd3_output_says_diffusers_loads_none_of_it(tmp_path):
    path = make_dit_adapter(tmp_path / "s.safetensors", "sd3", "kohya")
    notes = _notes(path)
    count = len(open_adapter(path).modules)
    assert notes == [f"{count} SD3 module(s) in kohya names: diffusers' SD3 loader converts no kohya names and loads "
                     "none of them; `convert --to diffusers` writes a file it loads"]
