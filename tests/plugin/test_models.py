"""blora_tools.models: tiny models run and train on CPU; full-size ones build on meta with the real widths."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from blora_tools.models import SDXL_TINY, build_text_encoders, build_unet


def test_tiny_sdxl_forward_and_backward():
    unet = build_unet("sdxl")
    te1, te2 = build_text_encoders("sdxl")
    ids = torch.randint(0, 990, (2, 77))
    with torch.no_grad():
        h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
        out2 = te2(ids, output_hidden_states=True)
    context = torch.cat([h1, out2.hidden_states[-2]], dim=-1)
    assert context.shape[-1] == SDXL_TINY.context_dim
    y = torch.cat([out2.text_embeds, torch.randn(2, SDXL_TINY.adm_in_channels - out2.text_embeds.shape[-1])], -1)
    x = torch.randn(2, 4, 16, 16)
    out = unet(x, torch.tensor([10, 900]), context, y)
    assert out.shape == x.shape
    out.pow(2).mean().backward()
    for layer in (
        unet.input_blocks[4][1].transformer_blocks[0].attn2.to_k,
        unet.output_blocks[8][0].in_layers[2],
        unet.label_emb[0][0],
    ):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_tiny_sd_forward(arch):
    unet = build_unet(arch)
    (te,) = build_text_encoders(arch)
    with torch.no_grad():
        context = te(torch.randint(0, 990, (1, 77))).last_hidden_state
        out = unet(torch.randn(1, 4, 16, 16), torch.tensor([5]), encoder_hidden_states=context).sample
    assert out.shape == (1, 4, 16, 16)


def test_seed_makes_init_deterministic():
    a, b, c = build_unet("sdxl", seed=3), build_unet("sdxl", seed=3), build_unet("sdxl", seed=4)
    assert torch.equal(a.out[2].weight, b.out[2].weight)
    assert not torch.equal(a.out[2].weight, c.out[2].weight)
    state = torch.random.get_rng_state()
    build_text_encoders("sd1", seed=7)
    assert torch.equal(state, torch.random.get_rng_state())


def test_full_size_builds_on_meta_with_real_widths():
    xl = build_unet("sdxl", "full", "meta")
    assert all(p.is_meta for p in xl.parameters())
    assert xl.label_emb[0][0].in_features == 2816
    assert xl.input_blocks[7][1].transformer_blocks[9].attn2.to_k.in_features == 2048
    assert len(xl.middle_block[1].transformer_blocks) == 10
    sd2 = build_unet("sd2", "full", "meta")
    assert isinstance(sd2.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    ckpt = build_unet("sd2", "full", "meta", variant="ckpt")
    assert isinstance(ckpt.down_blocks[0].attentions[0].proj_in, torch.nn.Conv2d)
    (te,) = build_text_encoders("sd2", "full", "meta")
    assert (te.config.hidden_size, te.config.num_hidden_layers, te.config.intermediate_size) == (1024, 23, 4096)
    _, te2 = build_text_encoders("sdxl", "full", "meta")
    assert type(te2).__name__ == "CLIPTextModelWithProjection"
    assert te2.text_projection.weight.shape == (1280, 1280)


def test_bad_arguments():
    with pytest.raises(ValueError):
        build_unet("sd1", "huge")
    with pytest.raises(ValueError):
        build_unet("sd1", variant="ckpt")
    with pytest.raises(ValueError):
        build_text_encoders("unknown")


def test_import_is_light():
    code = "import sys, blora_tools.models; assert 'transformers' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
