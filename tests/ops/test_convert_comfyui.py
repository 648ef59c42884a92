"""`convert --to comfyui` on Stable Diffusion files: ComfyUI's LoraSave layout, ΔW unchanged both ways."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters import dense_deltas, make_adapter  # noqa: E402

from blora_tools.adapter.formats import Dialect  # noqa: E402
from blora_tools.adapter.model import open_adapter  # noqa: E402
from blora_tools.ops.convert import convert  # noqa: E402


@pytest.mark.parametrize("arch,te_root", [("sd1", "clip_l"), ("sd2", "clip_h"), ("sdxl", "clip_g")])
def test_comfyui_layout_round_trips(tmp_path, arch, te_root):
    src = make_adapter(tmp_path / "k.safetensors", arch, per_block=1, alpha=1.0)
    convert(open_adapter(src), to="comfyui").save(tmp_path / "c.safetensors")
    keys = load_file(tmp_path / "c.safetensors")
    unet = [k for k in keys if k.startswith("diffusion_model.")]
    assert unet and all(k.split(".")[1] in ("input_blocks", "middle_block", "output_blocks", "time_embed",
                                            "label_emb", "out") for k in unet)  # ComfyUI's model keys are LDM
    assert any(k.startswith(f"text_encoders.{te_root}.transformer.text_model.") for k in keys)
    comfy = open_adapter(tmp_path / "c.safetensors")
    assert comfy.dialect is Dialect.COMFYUI and len(comfy.modules) == len(open_adapter(src).modules)
    convert(comfy, to="kohya").save(tmp_path / "k2.safetensors")
    want, got = dense_deltas(src), dense_deltas(tmp_path / "k2.safetensors")
    assert set(want) == set(got)
    for stem in want:
        assert (want[stem] - got[stem]).abs().max() < 1e-6, stem
