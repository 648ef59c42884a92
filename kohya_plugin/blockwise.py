"""`--network_module kohya_plugin.blockwise`: block-wise LoRA/LoCon for kohya-ss sd-scripts.

sd-scripts looks up two functions here, `create_network` and `create_network_from_weights`. Importing this
module needs neither sd-scripts nor diffusers/transformers, and has no side effects.

    accelerate launch train_network.py ... --network_module kohya_plugin.blockwise \\
        --network_dim 16 --network_alpha 8 --network_args "preset=style" "conv_dim=8"

Flux.1 and SD3 the same way, with `flux_train_network.py` / `sd3_train_network.py`:

    accelerate launch flux_train_network.py ... --network_module kohya_plugin.blockwise \
        --network_dim 16 --network_alpha 16 --network_args "block_ranks=double=8,S10-S37=32" "split_qkv=true"

`--network_args` values are strings; unknown keys are errors. Every key is declared once in
`kohya_plugin.args.NETWORK_ARGS`; `python -m kohya_plugin.args --markdown` prints the table of them.

Saved files are ordinary kohya LoRA/LoCon files with ONE alpha for all modules (the training alpha most modules
share; each other module's alpha ratio is folded into its up factor), `ss_network_module` =
`kohya_plugin.blockwise` and a `blora_spec` JSON with the per-block ranks, alphas and learning-rate weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from blora_tools.errors import SpecError
from kohya_plugin.args import parse_network_args, read_multiplier
from kohya_plugin.network import MODULE_NAME, BlockwiseNetwork
from kohya_plugin.targets import detect_unet_arch
from kohya_plugin.weights_io import read_metadata, read_weights_file

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
    """A new block-wise network for `unet` and `text_encoder` (one model, a list of two for SDXL, or None); on
    Flux.1/SD3 `unet` is the transformer and `text_encoder` the trainer's list (`[clip_l, t5xxl]`,
    `[clip_l, clip_g, t5xxl]`).

    `network_dim` None → 4, `network_alpha` None → 1.0. `kwargs` are the `--network_args` strings. Every one,
    the multiplier and the ranks (against the widest layer) are checked before the models are changed: a bad
    value is a SpecError (a ValueError) naming it, and the models stay exactly as they were.
    """
    read_multiplier(multiplier)
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
    `apply_to`) or `merge_to`. `kwargs` may carry learning-rate weights, dropouts and LoRA+ ratios. A file that
    cannot be read or used is an AdapterFileError naming it; the models are not changed.
    """
    read_multiplier(multiplier)
    _need_unet(unet)
    metadata: dict[str, str] = {}
    if weights_sd is None:
        if file is None:
            raise SpecError("create_network_from_weights needs a file or a weights state dict")
        weights_sd, metadata = read_weights_file(file)
    elif file is not None and Path(file).suffix.lower() == ".safetensors" and Path(file).is_file():
        metadata = read_metadata(file)
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
