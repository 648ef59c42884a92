"""`blora-tools convert`: kohya ↔ PEFT/diffusers, SDXL LDM ↔ diffusers names, one alpha for every module."""

from __future__ import annotations

from pathlib import Path

import click

from blora_tools.cli import output as ui
from blora_tools.cli.params import (
    allow_nonfinite_option,
    arch_option,
    force_option,
    input_file,
    json_option,
    names_option,
    output_option,
    uniform_alpha_option,
)


@click.command("convert")
@input_file
@click.option(
    "--to",
    "target",
    type=click.Choice(["kohya", "peft", "diffusers", "comfyui"]),
    required=True,
    help="Output format: kohya (A1111/ComfyUI/sd-scripts keys), peft = diffusers (diffusers/PEFT keys + "
    "lora_adapter_metadata) or comfyui (ComfyUI's LoraSave keys: diffusion_model., text_encoders.).",
)
@click.option(
    "--compact/--no-compact",
    default=True,
    show_default=True,
    help="Flux.1/SD3 to peft: split a fused layer with fewer ranks per part where its up factor is proven "
    "block-diagonal (exact); --no-compact gives every part the whole down factor.",
)
@uniform_alpha_option
@names_option
@output_option()
@force_option
@allow_nonfinite_option
@json_option
@arch_option
@click.pass_obj
def convert_cmd(
    app, file: Path, target: str, compact: bool, uniform_alpha: bool, names: str | None, output: Path, force: bool,
    allow_nonfinite: bool, as_json: bool, arch,
) -> None:
    """Convert FILE between kohya and PEFT/diffusers formats and write it to -o OUT.

    ΔW stays the same for every module. kohya output copies factors byte for byte under their new names and
    keeps each module's alpha (--uniform-alpha gives them one). PEFT output sets alpha = rank everywhere, each
    module's alpha/rank folded into lora_B, because loaders that ignore lora_adapter_metadata assume it.
    LoHa, LoKr, Tucker, full and DoRA modules have no PEFT LoRA form: converting them to peft is an error.
    From PEFT, SDXL gets kohya's LDM names unless --names says otherwise; --names defaults to the file's own.
    comfyui writes ComfyUI's own layout (diffusion_model. + the model's names, text_encoders.clip_l… / t5xxl).

    \b
    Flux.1 and SD3: kohya and comfyui files name the fused layers (img_attn.qkv, linear1); peft files the
    split ones (to_q, to_k, to_v, proj_mlp). To peft, each part gets its rows of the up factor and the whole
    down factor (same rank and alpha; --compact keeps only the ranks a part uses where that is exact). To
    kohya/comfyui, parts are stacked: downs on top of each other, ups block-diagonal, rank = the sum, alpha =
    that rank (each part's own scale folded in); missing parts are zero rows. ΔW is unchanged either way.

    
    Which format each loader wants:
      A1111/Forge, ComfyUI   kohya (they do not map PEFT U-Net keys); any alphas
      sd-scripts             kohya with its own names: diffusers-style on SD1/SD2, LDM on SDXL
                             (--base_weights, merge_lora.py; LoHa/LoKr/Tucker/full need LyCORIS)
      LyCORIS                kohya, every kind
      diffusers              kohya or peft; kohya needs one alpha (--uniform-alpha) and no LoHa/LoKr/Tucker/full
      PEFT                   peft

    
    Examples:
      blora-tools convert char.safetensors --to peft -o char-peft.safetensors
      blora-tools convert pytorch_lora_weights.safetensors --to kohya -o char-kohya.safetensors
      blora-tools convert blockwise.safetensors --to kohya --uniform-alpha -o fixed.safetensors
      blora-tools convert xl.safetensors --to kohya --names diffusers -o xl-diffusers-names.safetensors
      blora-tools convert ai-toolkit-flux.safetensors --to kohya -o flux-kohya.safetensors
      blora-tools convert flux-kohya.safetensors --to diffusers -o flux-diffusers.safetensors
    """
    from blora_tools.adapter.model import open_adapter
    from blora_tools.adapter.writer import check_output
    from blora_tools.ops.convert import convert

    adapter = open_adapter(file, arch)
    check_output(output, [file], force)
    result = convert(adapter, to=target, uniform_alpha=uniform_alpha, names=names, compact=compact)
    written = ui.save_result(app, result, output, force, allow_nonfinite)
    s = result.summary
    what = f"{s['arch']} {s['dialect']} → {s['to']}, {s['modules']} modules"
    if s["modules"] != s["modules_in"]:
        what += f" (from {s['modules_in']})"
    if s["names"]:
        what += f", {s['names']} names"
    if s["alpha_is_rank"]:
        what += f", alpha = rank ({s['rescaled']} rescaled)"
    if s["uniform_alpha"] is not None:
        what += f", alpha {s['uniform_alpha']:g} everywhere ({s['rescaled']} rescaled)"
    ui.report(app, result, written, as_json, what)
