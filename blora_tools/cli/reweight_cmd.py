"""`blora-tools reweight`: bake block weights into a file, linearly, the way runtime strength works."""

from __future__ import annotations

from pathlib import Path

import click

from blora_tools.cli import output as ui
from blora_tools.cli.params import FINITE_FLOAT, WEIGHTS, allow_nonfinite_option, arch_option, force_option, input_file, json_option, output_option, uniform_alpha_option


@click.command("reweight")
@input_file
@click.option("--weights", "weights", type=WEIGHTS, help="Named weights 'in0=1,out3=0.5,te=0' (unnamed blocks keep 1), or any form --lbw takes.")
@click.option("--lbw", "lbw", type=WEIGHTS, help="An LBW vector (17/26 values SD1/SD2, 12/20 SDXL; Flux 58/57/20/19/61, SD3 1+depth or 25, by absolute block index), a preset name, or 'lbw=…' pasted from a prompt.")
@click.option("--preset", help="An LBW preset name: built in (ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5, NONE) or from --preset-file.")
@click.option("--preset-file", type=click.Path(dir_okay=False, path_type=Path), help="A preset file of 'NAME:v1,v2,…' lines (# lines are comments).")
@click.option("--lbw-fill", type=FINITE_FLOAT, default=0.0, show_default=True, help="Weight of blocks an LBW vector does not name (LBW: 0; kohya --lbws: 1).")
@output_option()
@uniform_alpha_option
@force_option
@arch_option
@allow_nonfinite_option
@json_option
@click.pass_obj
def reweight_cmd(app, file: Path, weights, lbw, preset, preset_file, lbw_fill: float, output: Path, uniform_alpha: bool, force: bool, allow_nonfinite: bool, as_json: bool, arch) -> None:
    """Multiply each module of FILE by its block's weight and write -o OUT.

    Exactly one factor per module is scaled (lora_up, hada_w1_a, lokr_w1, diff, w_norm), so the effect is
    linear, as with runtime strength; weight 0 removes the module, weight 1 copies it byte for byte.
    Alphas stay as they are unless --uniform-alpha gives them one (files whose modules have different alphas
    are loaded mis-scaled by diffusers). DoRA modules take only 0 or 1.

    \b
    Examples:
      blora-tools reweight char.safetensors --weights "in0=1,out3=0.5,te=0" -o out.safetensors
      blora-tools reweight char.safetensors --lbw "lbw=1,0,0,0,1,1,1,0,0,0,0,0,1,1,1,1,1" -o out.safetensors
      blora-tools reweight char.safetensors --preset MIDD -o out.safetensors
      blora-tools reweight char.safetensors --preset MINE --preset-file presets.txt -o out.safetensors
      blora-tools reweight flux.safetensors --weights "S00-S09=0,double=0.5,D05.img.q=0" -o out.safetensors

    On Flux.1 and SD3 a weight may name part of a block (D05.img.q, S10.linear1.mlp, J03.ctx): only those
    rows of the up factor are scaled (exact, same rank). BASE is the text encoders plus the embedders and
    final layer. A pasted vector is read by absolute block index whatever blocks the file holds, and a
    short one never repeats its last value (20 values: BASE and D00..D18; the single blocks keep 1).
    """
    from blora_tools.adapter.model import open_adapter
    from blora_tools.adapter.writer import check_output
    from blora_tools.ops.reweight import reweight

    given = [name for name, value in (("--weights", weights), ("--lbw", lbw), ("--preset", preset)) if value is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --weights, --lbw or --preset")
    if preset_file is not None and preset is None:
        raise click.UsageError("--preset-file goes with --preset NAME")
    if lbw is not None and lbw.vector is None:
        raise click.BadParameter("expected an LBW vector, a preset name or lbw=…; use --weights for 'block=weight' pairs", param_hint="--lbw")
    spec = weights or lbw or _preset(preset, preset_file)
    adapter = open_adapter(file, arch)
    check_output(output, [file, *([preset_file] if preset_file is not None else [])], force)
    resolved = spec.resolve(adapter.arch, fill=lbw_fill)
    result = reweight(adapter, resolved, text=spec.text, uniform_alpha=uniform_alpha)
    written = ui.save_result(app, result, output, force, allow_nonfinite)
    s = result.summary
    ui.report(app, result, written, as_json, f"{s['scaled']} modules scaled, {s['removed']} removed", _show_weights)


def _show_weights(app, result) -> None:
    key = ui.group_key(result.summary["arch"])
    rows = []
    for group in sorted(result.summary["blocks"], key=key):
        row = result.summary["blocks"][group]
        rows.append([group, row["modules"], ", ".join(f"{w:g}" for w in row["weights"]), row["removed"] or "·"])
    app.out.print(ui.table(None, ["block", "modules", "weight", "removed"], rows, right=(1, 3)))


def _preset(name: str, preset_file: Path | None):
    from blora_tools.errors import SelectorError
    from blora_tools.taxonomy.weights import LBW_PRESETS, parse_weights, read_preset_file

    presets = read_preset_file(preset_file) if preset_file is not None else {}
    if name not in presets and name.upper() not in LBW_PRESETS:
        known = ", ".join(sorted({*LBW_PRESETS, *presets}))
        raise SelectorError(f"unknown preset {name!r}; known: {known}", preset_file)
    return parse_weights(name, presets)
