"""`blora-tools prune`: remove whole modules by block; kept tensors stay byte-identical.

Also home of the small helpers the surgery commands (prune, reweight, merge, resize) share: write a Result
with a progress bar, and show its summary as a table or JSON.
"""

from __future__ import annotations

from pathlib import Path

import click

from blora_tools.cli import output as ui
from blora_tools.cli.params import SELECTOR, allow_nonfinite_option, arch_option, force_option, input_file, json_option, output_option, uniform_alpha_option


@click.command("prune")
@input_file
@click.option("--keep", type=SELECTOR, help="Keep only modules in these blocks, e.g. in0,out3 or style.")
@click.option("--drop", type=SELECTOR, help="Remove modules in these blocks, e.g. te or 'mid out0'.")
@output_option(required=False)
@click.option("--dry-run", is_flag=True, help="List what would be removed; write nothing (no -o needed).")
@uniform_alpha_option
@force_option
@arch_option
@allow_nonfinite_option
@json_option
@click.pass_obj
def prune_cmd(
    app, file: Path, keep, drop, output: Path | None, dry_run: bool, uniform_alpha: bool, force: bool,
    allow_nonfinite: bool, as_json: bool, arch,
) -> None:
    """Remove whole modules of FILE by block and write the rest to -o OUT.

    Every key of a removed module goes (alpha, dora_scale, lora_mid, …), so no orphan is left; every kept
    tensor is copied byte for byte (with --uniform-alpha, every module gets one alpha instead, ΔW unchanged:
    diffusers mis-scales files whose alphas differ). Text encoders are blocks like any other (te, te1, te2, BASE).

    On Flux.1 and SD3, blocks are D00..D18, S00..S37 (J00.. on SD3), double, single, joint, BASE and research
    presets; a sub-selector (D05.img.q, S10.linear1.mlp, J03.ctx) choosing part of a fused layer keeps that
    module at its rank and zeroes the rows of the parts that go (LoKr and DoRA modules refuse this).

    \b
    Examples:
      blora-tools prune style.safetensors --keep in0,out3 -o style-outer.safetensors
      blora-tools prune char.safetensors --drop te -o char-unet.safetensors
      blora-tools prune char.safetensors --drop "IN04-IN08" --dry-run
      blora-tools prune flux.safetensors --keep S10-S37 -o flux-style.safetensors
      blora-tools prune flux.safetensors --drop "D00-D18.txt" -o flux-no-txt.safetensors
    """
    from blora_tools.adapter.model import open_adapter
    from blora_tools.adapter.writer import check_output
    from blora_tools.ops.prune import prune

    if (keep is None) == (drop is None):
        raise click.UsageError("give exactly one of --keep SELECTOR or --drop SELECTOR")
    if output is None and not dry_run:
        raise click.UsageError("missing -o/--output (or use --dry-run to only list what would go)")
    selector = keep if keep is not None else drop
    adapter = open_adapter(file, arch)
    if not dry_run:
        check_output(output, [file], force)
    blocks = selector.resolve(adapter.arch)
    result = prune(adapter, blocks, keep=keep is not None, selector=selector.text, uniform_alpha=uniform_alpha)
    written = None if dry_run else ui.save_result(app, result, output, force, allow_nonfinite)
    if as_json:
        ui.show_json(app, result, written)
        return
    summary = result.summary
    if dry_run:
        _show_dry_run(app, result)
    else:
        groups = sorted(set(summary["kept"]) | set(summary["dropped"]), key=ui.group_key(summary["arch"]))
        partial = summary["partial"]
        rows = [[g, summary["kept"].get(g, 0) + summary["dropped"].get(g, 0), summary["kept"].get(g, "·"), summary["dropped"].get(g, "·")] + ([partial.get(g, "·")] if partial else []) for g in groups]
        columns = ["block", "modules", "kept", "dropped"] + (["rows zeroed"] if partial else [])
        app.out.print(ui.table(None, columns, rows, right=(1, 2, 3, 4)))
        ui.done(app, written, f"{summary['modules_after']} of {summary['modules_before']} modules kept")
    ui.warn_all(app, result.warnings)


def _show_dry_run(app, result) -> None:
    s = result.summary
    dropped = s["dropped_modules"]
    app.out.print(f"{s['mode']} {s['selector']} = {s['blocks']}: {len(dropped)} of {s['modules_before']} modules would go")
    for stem in dropped:
        app.out.print(f"  {stem}", markup=False)
    zeroed = s["zeroed_rows"]
    if zeroed:
        app.out.print(f"{len(zeroed)} module(s) would stay with some rows zeroed (same rank):")
        for stem, parts in zeroed.items():
            app.out.print(f"  {stem}: {', '.join(parts)}", markup=False)
    ui.note(app, "dry run: nothing written")
