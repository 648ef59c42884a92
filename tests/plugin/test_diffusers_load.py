"""A file the plugin saves (blocks with different ranks and alphas, LoCon, text encoder) loads in diffusers
and gives the plugin's own output: diffusers' kohya converter + PEFT, on the tiny SD1 U-Net and CLIP."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fake_trainer import TrainerArgs, predict, synthetic_batch, tiny_models, train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ARGS = [
    "block_ranks=in0=4,out3=2,mid=8",
    "block_alphas=in0=1,out3=8,mid=16",
    "te_alpha=2",
    "conv_dim=2",
    "conv_alpha=0.5",
]


def test_diffusers_loads_the_file_exactly(tmp_path):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    path = tmp_path / "mixed.safetensors"
    tes, unet = tiny_models("sd1")
    batch = synthetic_batch("sd1")
    with torch.no_grad():
        base = predict("sd1", tes, unet, batch)
    result = train("sd1", tes, unet, batch,
                   TrainerArgs(network_dim=8, network_alpha=4, network_args=ARGS, max_train_steps=5,
                               output=str(path)))
    result.network.eval()
    with torch.no_grad():
        ours = predict("sd1", tes, unet, batch)
    assert (ours - base).abs().max() > 1e-3
    alphas = {m.alpha_value for m in result.network.unet_loras}
    ranks = {m.lora_dim for m in result.network.unet_loras}
    assert len(alphas) > 2 and len(ranks) > 2, "the file really mixes ranks and alphas"

    tes2, unet2 = tiny_models("sd1")
    state, network_alphas = StableDiffusionPipeline.lora_state_dict(load_file(str(path)))
    StableDiffusionPipeline.load_lora_into_unet(state, network_alphas, unet2, adapter_name="blockwise")
    StableDiffusionPipeline.load_lora_into_text_encoder(
        state, network_alphas, tes2[0], prefix="text_encoder", adapter_name="blockwise"
    )
    with torch.no_grad():
        theirs = predict("sd1", tes2, unet2, batch)
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()
