"""`blora-tools convert`: kohya ↔ PEFT/diffusers, SDXL LDM ↔ diffusers names, one alpha for every module."""

from __future__ import annotations

from pathlib import Path

import click

from blora_tools.cli import output as ui
from blora_tools.cli.params import allow_nonfinite_option, force_option, input_file, json_option, output_option


@click.command("convert")
@input_file
@click.option(
    "--to",
    "target",
    type=click.Choice(["kohya", "peft"]),
    required=True,
    help="Output format: kohya (A1111/ComfyUI/sd-scripts keys) or peft (diffusers/PEFT keys + lora_adapter_metadata).",
)
@click.option(
    "--uniform-alpha",
    is_flag=True,
    help="Give every module the same alpha, folding the rest of its scale into its up factor (ΔW unchanged); "
    "repairs files diffusers mis-scales.",
)
@click.option(
    "--names",
    type=click.Choice(["ldm", "diffusers"]),
    help="U-Net naming of kohya output: ldm (input_blocks_…, kohya's SDXL names) or diffusers (down_blocks_…). "
    "Default: kept; from PEFT, ldm for SDXL.",
)
@output_option()
@force_option
@allow_nonfinite_option
@json_option
@click.pass_obj
def convert_cmd(
    app, file: Path, target: str, uniform_alpha: bool, names: str | None, output: Path, force: bool,
    allow_nonfinite: bool, as_json: bool,
) -> None:
    """Convert FILE between kohya and PEFT/diffusers formats and write it to -o OUT.

    Lossless: factors are copied byte for byte under their new names and every module keeps its scale
    (alphas move between kohya `alpha` tensors and PEFT's `lora_adapter_metadata`), so ΔW is the same.
    LoHa, LoKr, Tucker, full and DoRA modules have no PEFT LoRA form: converting them to peft is an error.

    \b
    Examples:
      blora-tools convert char.safetensors --to peft -o char-peft.safetensors
      blora-tools convert pytorch_lora_weights.safetensors --to kohya -o char-kohya.safetensors
      blora-tools convert blockwise.safetensors --to kohya --uniform-alpha -o fixed.safetensors
      blora-tools convert xl.safetensors --to kohya --names diffusers -o xl-diffusers-names.safetensors
    """
    from blora_tools.adapter.model import open_adapter
    from blora_tools.adapter.writer import check_output
    from blora_tools.ops.convert import convert

    adapter = open_adapter(file)
    check_output(output, [file], force)
    result = convert(adapter, to=target, uniform_alpha=uniform_alpha, names=names)
    written = ui.save_result(app, result, output, force, allow_nonfinite)
    s = result.summary
    what = f"{s['arch']} {s['from']} → {s['to']}, {s['modules']} modules"
    if s["names"]:
        what += f", {s['names']} names"
    if s["alpha_is_rank"]:
        what += f", alpha = rank ({s['rescaled']} rescaled)"
    if s["uniform_alpha"] is not None:
        what += f", alpha {s['uniform_alpha']:g} everywhere ({s['rescaled']} rescaled)"
    ui.report(app, result, written, as_json, what)
