"""The file model groups keys into modules with kind, rank, alpha, block; PEFT and attn-proc keys too."""

import json

import pytest
import torch
from safetensors.torch import save_file

from blora_tools.adapter.formats import Format, split_key
from blora_tools.adapter.kinds import Kind
from blora_tools.adapter.model import open_adapter
from blora_tools.errors import AdapterFileError
from blora_tools.taxonomy import Arch

ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
RES = "lora_unet_up_blocks_3_resnets_0_conv1"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def _save(tmp_path, tensors, metadata=None, name="a.safetensors"):
    path = tmp_path / name
    save_file(tensors, path, metadata=metadata)
    return path


def test_kinds_ranks_alphas_and_blocks(tmp_path):
    t = {
        f"{ATTN}.lora_down.weight": torch.randn(4, 32),
        f"{ATTN}.lora_up.weight": torch.randn(32, 4),
        f"{ATTN}.alpha": torch.tensor(2.0, dtype=torch.bfloat16),
        f"{RES}.lora_down.weight": torch.randn(8, 32, 3, 3).half(),
        f"{RES}.lora_up.weight": torch.randn(32, 8, 1, 1).half(),
        f"{RES}.alpha": torch.tensor([3.0]),
        f"{TE}.hada_w1_a": torch.randn(32, 2), f"{TE}.hada_w1_b": torch.randn(2, 32),
        f"{TE}.hada_w2_a": torch.randn(32, 2), f"{TE}.hada_w2_b": torch.randn(2, 32),
        "lora_unet_down_blocks_1_attentions_0_proj_in.lokr_w1": torch.randn(4, 4),
        "lora_unet_down_blocks_1_attentions_0_proj_in.lokr_w2": torch.randn(8, 8),
        "lora_unet_down_blocks_1_attentions_0_proj_out.diff": torch.randn(32, 32),
        "bundle_emb.cat.string_to_param.*": torch.randn(1, 8),
    }
    a = open_adapter(_save(tmp_path, t))
    m = a.modules
    assert (m[ATTN].kind, m[ATTN].rank, m[ATTN].alpha, m[ATTN].scale) == (Kind.LORA, 4, 2.0, 0.5)
    assert (m[RES].kind, m[RES].rank, m[RES].alpha, m[RES].weight_shape) == (Kind.LOCON, 8, 3.0, (32, 32, 3, 3))
    assert m[RES].placement.group == "out3" and m[ATTN].placement.lbw == "IN01"
    assert m[TE].kind is Kind.LOHA and m[TE].rank == 2 and m[TE].alpha is None and m[TE].scale == 1.0
    assert m["lora_unet_down_blocks_1_attentions_0_proj_in"].kind is Kind.LOKR
    assert m["lora_unet_down_blocks_1_attentions_0_proj_in"].weight_shape == (32, 32)
    assert m["lora_unet_down_blocks_1_attentions_0_proj_out"].kind is Kind.FULL
    assert a.passthrough == ["bundle_emb.cat.string_to_param.*"]
    assert any("pass through" in w for w in a.warnings)
    assert a.format is Format.KOHYA


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64])
def test_alpha_of_any_dtype_and_shape(tmp_path, dtype):
    for alpha in (torch.tensor(3, dtype=dtype), torch.tensor([3], dtype=dtype)):
        path = _save(tmp_path, {f"{ATTN}.lora_down.weight": torch.randn(4, 8), f"{ATTN}.lora_up.weight": torch.randn(8, 4), f"{ATTN}.alpha": alpha})
        assert open_adapter(path).modules[ATTN].alpha == 3.0


def test_tucker_and_conv1x1(tmp_path):
    path = _save(tmp_path, {
        f"{RES}.lora_down.weight": torch.randn(4, 16, 1, 1), f"{RES}.lora_mid.weight": torch.randn(4, 4, 3, 3),
        f"{RES}.lora_up.weight": torch.randn(32, 4, 1, 1),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 16, 1, 1),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(16, 4, 1, 1),
    })
    m = open_adapter(path).modules
    assert m[RES].kind is Kind.TUCKER and m[RES].weight_shape == (32, 16, 3, 3)
    assert m["lora_unet_down_blocks_0_attentions_0_proj_in"].kind is Kind.LORA_CONV1X1


@pytest.mark.parametrize(
    "tensors, fragment",
    [
        ({f"{ATTN}.lora_up.weight": torch.randn(8, 4)}, "has lora_up but no lora_down"),
        ({f"{ATTN}.lora_down.weight": torch.randn(4, 8)}, "has lora_down but no lora_up"),
        ({f"{ATTN}.alpha": torch.tensor(1.0)}, "orphan alpha"),
        ({f"{ATTN}.lora_down.weight": torch.randn(0, 8), f"{ATTN}.lora_up.weight": torch.randn(8, 0)}, "rank 0"),
        ({f"{ATTN}.lora_down.weight": torch.randn(4, 8), f"{ATTN}.lora_up.weight": torch.randn(8, 3)}, "does not fit"),
        ({f"{ATTN}.lora_down.weight": torch.randn(4, 8), f"{ATTN}.lora_up.weight": torch.randn(8, 4), f"{ATTN}.alpha": torch.tensor([1.0, 2.0])}, "single value"),
        ({f"{ATTN}.lora_down.weight": torch.randn(4, 8), f"{ATTN}.lora_up.weight": torch.randn(8, 4), f"{ATTN}.alpha": torch.tensor(float("nan"))}, "alpha is nan"),
        ({"model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4)}, "not an adapter"),
    ],
    ids=["up-only", "down-only", "orphan-alpha", "rank0", "shape-mismatch", "alpha-vector", "alpha-nan", "full-model"],
)
def test_broken_modules_are_errors_naming_file_and_module(tmp_path, tensors, fragment):
    path = _save(tmp_path, tensors)
    with pytest.raises(AdapterFileError) as err:
        open_adapter(path)
    assert fragment in str(err.value) and str(path) in str(err.value)


def test_empty_safetensors_is_not_an_adapter(tmp_path):
    path = _save(tmp_path, {})
    with pytest.raises(AdapterFileError, match="empty file"):
        open_adapter(path)


def test_peft_keys_and_alphas_from_adapter_metadata(tmp_path):
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn2.to_k": 2}})}
    t = {
        f"unet.{path}.lora_A.weight": torch.randn(4, 32), f"unet.{path}.lora_B.weight": torch.randn(32, 4),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.randn(4, 32),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.randn(32, 4),
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 32),
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 4),
    }
    a = open_adapter(_save(tmp_path, t, meta))
    assert a.format is Format.PEFT
    assert a.modules[ATTN].alpha == 8 and a.modules[ATTN].path == path and a.modules[ATTN].placement.lbw == "IN01"
    assert a.modules["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"].alpha == 2
    assert TE in a.modules  # transformers-5 path read in the canonical transformers-4 form


def test_peft_sdxl_text_encoder_becomes_te1(tmp_path):
    t = {}
    for comp in ("text_encoder", "text_encoder_2"):
        t[f"{comp}.text_model.encoder.layers.0.mlp.fc1.lora_A.weight"] = torch.randn(2, 8)
        t[f"{comp}.text_model.encoder.layers.0.mlp.fc1.lora_B.weight"] = torch.randn(8, 2)
    a = open_adapter(_save(tmp_path, t))
    assert a.arch is Arch.SDXL
    assert {m.placement.block for m in a.modules.values()} == {"te1", "te2"}


def test_attn_proc_keys():
    k = split_key("unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.processor.to_out_lora.up.weight")
    assert k.stem == "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0"
    assert k.param == "lora_up.weight" and k.format is Format.ATTN_PROC


def test_tensors_are_read_on_demand_and_exact(tmp_path):
    down = torch.randn(4, 8).half()
    path = _save(tmp_path, {f"{ATTN}.lora_down.weight": down, f"{ATTN}.lora_up.weight": torch.randn(8, 4)})
    a = open_adapter(path)
    got = a.tensors(a.modules[ATTN])
    assert torch.equal(got["lora_down.weight"], down) and got["lora_down.weight"].dtype == torch.float16
