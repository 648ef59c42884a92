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


# --- Flux.1 and SD3: tiny diffusers transformers and pipelines --------------------------------------------

def _block_layers(names, blocks: dict[str, dict[int, int]]) -> set[str]:
    """Layer names renumbered by `blocks` (block list prefix -> {full index: tiny index}); blocks not in a map are
    dropped, layers outside the block lists kept."""
    out = set()
    for name in names:
        prefix, _, rest = name.partition(".")
        if prefix not in blocks:
            out.add(name)
            continue
        index, _, rest = rest.partition(".")
        if int(index) in blocks[prefix]:
            out.add(f"{prefix}.{blocks[prefix][int(index)]}.{rest}")
    return out


def _layers(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def test_tiny_flux_has_the_layers_of_flux_dev_and_schnell(load_manifest):
    """Same layer names as diffusers' full Flux.1 dev (kohya_manifests/diffusers_flux_dev.json), per block."""
    from blora_tools.models import build_flux_transformer

    full = [layer["name"] for layer in load_manifest("diffusers_flux_dev")["layers"]]
    first_two = {0: 0, 1: 1}
    tiny = _layers(build_flux_transformer(variant="dev"))
    assert tiny == _block_layers(full, {"transformer_blocks": first_two, "single_transformer_blocks": first_two})
    schnell = _layers(build_flux_transformer(variant="schnell"))
    guidance = {f"time_text_embed.guidance_embedder.linear_{i}" for i in (1, 2)}
    assert tiny - schnell == guidance


@pytest.mark.parametrize("variant, blocks", [
    ("sd3_medium", {0: 0, 1: 1, 23: 2}),
    ("sd35_medium", {0: 0, 13: 1, 23: 2}),  # block 0 has attn2, 13 is the first without, 23 is pre-only
    ("sd35_large", {0: 0, 1: 1, 37: 2}),
])
def test_tiny_sd3_has_the_layers_of_the_published_models(variant, blocks, load_manifest):
    """Same layer names as diffusers' full SD3 Medium / SD3.5 Medium / SD3.5 Large, per kind of block."""
    from blora_tools.models import build_sd3_transformer

    full = [layer["name"] for layer in load_manifest(f"diffusers_{variant}")["layers"]]
    assert _layers(build_sd3_transformer(variant=variant)) == _block_layers(full, {"transformer_blocks": blocks})


def test_tiny_dit_transformers_train():
    """Every Linear of the tiny Flux gets a gradient from a forward/backward pass on CPU."""
    from blora_tools.models import FLUX_TINY, build_flux_transformer

    model = build_flux_transformer()
    tokens, text = 16, 5
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    out = model(hidden_states=torch.randn(1, tokens, 64), encoder_hidden_states=torch.randn(1, text, 32),
                pooled_projections=torch.randn(1, FLUX_TINY["pooled_projection_dim"]), timestep=torch.tensor([0.5]),
                img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3), guidance=torch.tensor([3.5])).sample
    assert out.shape == (1, tokens, 64)
    out.pow(2).mean().backward()
    assert all(m.weight.grad is not None for m in model.modules() if isinstance(m, torch.nn.Linear))


def _generate(pipe, seed: int, prompt: str = "a photo of a cat"):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, height=32, width=32, num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
                output_type="np", max_sequence_length=16).images


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_tiny_dit_pipelines_generate_deterministically(family):
    from blora_tools.models import build_flux_pipeline, build_sd3_pipeline

    build = build_flux_pipeline if family == "flux" else build_sd3_pipeline
    pipe, again, other = build(seed=1), build(seed=1), build(seed=2)
    image = _generate(pipe, 0)
    assert image.shape == (1, 32, 32, 3) and image.std() > 0.01
    assert (image == _generate(again, 0)).all()
    assert not (image == _generate(other, 0)).all()
    assert not (image == _generate(pipe, 1)).all()
    assert not (image == _generate(pipe, 0, "a red house")).all()
