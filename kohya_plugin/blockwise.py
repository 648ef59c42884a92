"""`--network_module kohya_plugin.blockwise`: block-wise LoRA/LoCon for kohya-ss sd-scripts.

sd-scripts looks up two functions here, `create_network` and `create_network_from_weights`. Importing this
module needs neither sd-scripts nor diffusers/transformers, and has no side effects.

    accelerate launch train_network.py ... --network_module kohya_plugin.blockwise \\
        --network_dim 16 --network_alpha 8 --network_args "preset=style" "conv_dim=8"

`--network_args` keys (all values are strings; unknown keys are errors): `preset` (all/character,
style/upper, middle, bottom), `blocks` (selector), `block_ranks`, `block_alphas`, `conv_dim`, `conv_alpha`,
`conv_block_ranks`, `conv_block_alphas`, `block_lr` (named weights such as `in0=16,out3=8`), `te_dim`,
`te_alpha`, `algo` (lora/locon), `dropout`, `rank_dropout`, `module_dropout`, `loraplus_lr_ratio`,
`loraplus_unet_lr_ratio`, `loraplus_text_encoder_lr_ratio`, `verbose`; and kohya `networks.lora`'s
positional `block_dims`, `block_alphas`, `conv_block_dims`, `conv_block_alphas`, `down_lr_weight`,
`mid_lr_weight`, `up_lr_weight`, `block_lr_zero_threshold`. See `kohya_plugin.args`.

Saved files are ordinary kohya LoRA/LoCon files with ONE alpha for all modules (the training alpha most modules
share; each other module's alpha ratio is folded into its up factor), `ss_network_module` =
`kohya_plugin.blockwise` and a `blora_spec` JSON with the per-block ranks, alphas and learning-rate weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from blora_tools.errors import SpecError
from kohya_plugin.args import parse_network_args
from kohya_plugin.network import MODULE_NAME, BlockwiseNetwork, load_weights_file
from kohya_plugin.targets import detect_unet_arch

__all__ = ["MODULE_NAME", "BlockwiseNetwork", "create_network", "create_network_from_weights"]


def _need_unet(unet) -> None:
    if unet is None:
        raise SpecError("the blockwise network needs the U-Net (unet is None)")


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae,
    text_encoder,
    unet,
    neuron_dropout: float | None = None,
    **kwargs,
) -> BlockwiseNetwork:
    """A new block-wise network for `unet` and `text_encoder` (one model, a list of two for SDXL, or None).

    `network_dim` None → 4, `network_alpha` None → 1.0. `kwargs` are the `--network_args` strings; every one
    is checked (SpecError naming the argument) before the models are looked at.
    """
    _need_unet(unet)
    arch = detect_unet_arch(unet)
    parsed = parse_network_args(kwargs, arch, network_dim, network_alpha, neuron_dropout)
    return BlockwiseNetwork.from_args(text_encoder, unet, parsed, multiplier=multiplier)


def create_network_from_weights(
    multiplier: float,
    file: str | Path | None,
    vae,
    text_encoder,
    unet,
    weights_sd: Mapping | None = None,
    for_inference: bool = False,
    **kwargs,
) -> tuple[BlockwiseNetwork, Mapping]:
    """A network with the modules of a kohya LoRA/LoCon file, and the file's state dict: `(network, weights_sd)`.

    Ranks come from the tensor shapes and alphas from `.alpha` (else the rank); for this plugin's own files the
    training alphas are restored from `blora_spec`. The weights are not loaded: call `load_weights` (after
    `apply_to`) or `merge_to`. `kwargs` may carry learning-rate weights, dropouts and LoRA+ ratios.
    """
    _need_unet(unet)
    metadata: dict[str, str] = {}
    if weights_sd is None:
        if file is None:
            raise SpecError("create_network_from_weights needs a file or a weights state dict")
        weights_sd, metadata = load_weights_file(file)
    elif file is not None and Path(file).suffix.lower() == ".safetensors" and Path(file).is_file():
        from blora_tools.adapter.header import read_header

        metadata = dict(read_header(file).metadata)
    network = BlockwiseNetwork.from_weights(
        text_encoder,
        unet,
        weights_sd,
        metadata,
        multiplier=multiplier,
        network_args=kwargs,
        source=str(file) if file is not None else "weights",
    )
    return network, weights_sd
