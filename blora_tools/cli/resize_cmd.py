"""`blora-tools resize`: re-compress an adapter to new ranks, per block or by a dynamic rule."""

from __future__ import annotations

from pathlib import Path

import click

from blora_tools.cli import output as ui
from blora_tools.cli.params import (
    arch_option,
    DTYPES,
    RANK,
    RULE,
    allow_nonfinite_option,
    alpha_option,
    clamp_option,
    conv_rank_option,
    device_option,
    dtype_option,
    force_option,
    input_file,
    json_option,
    output_option,
)


@click.command("resize")
@input_file
@click.option("--rank", type=RANK, help="Target rank, or per block 'in0=8,out3=16' (unnamed blocks keep their ranks; 0 drops a block).")
@click.option("--dynamic", type=RULE, help="Keep per module the fewest singular values meeting sv_fro:X (share of ‖ΔW‖ kept), sv_ratio:X (largest/smallest kept) or sv_cumulative:X; --rank caps it.")
@conv_rank_option
@clamp_option
@alpha_option
@dtype_option
@output_option()
@force_option
@arch_option
@allow_nonfinite_option
@device_option
@json_option
@click.pass_obj
def resize_cmd(app, file: Path, rank, dynamic, conv_rank, clamp_quantile, alpha, dtype, output: Path, force: bool, allow_nonfinite: bool, as_json: bool, arch) -> None:
    """Re-compress FILE to new ranks and write -o OUT, with a table of what each block keeps.

    Each module's ΔW is decomposed through the Gram matrices of its factors plus a small eigenproblem (no dense matrix for LoRA
    kinds) and truncated; modules already at or below the target keep their rank. The output uses one alpha
    for every module with each module's scale folded into its factors, so ΔW keeps its scale in every loader.

    \b
    Examples:
      blora-tools resize char.safetensors --rank 16 -o char-r16.safetensors
      blora-tools resize char.safetensors --rank "in0=8,out3=16" -o char-blocks.safetensors
      blora-tools resize char.safetensors --rank 32 --dynamic sv_fro:0.95 -o char-dyn.safetensors
    """
    from blora_tools.adapter.model import open_adapter
    from blora_tools.adapter.writer import check_output
    from blora_tools.compute import resolve_device
    from blora_tools.ops.lowrank import rank_plan
    from blora_tools.ops.resize import resize

    if rank is None and dynamic is None and conv_rank is None:
        raise click.UsageError("give --rank, --dynamic or --conv-rank")
    device = resolve_device(app.device)
    adapter = open_adapter(file, arch)
    check_output(output, [file], force)
    plan = rank_plan(rank, adapter.arch, conv=conv_rank, rule=dynamic)
    with ui.progress(app, f"decomposing {file.name}", len(adapter.modules)) as advance:
        result = resize(adapter, plan, alpha=alpha, dtype=DTYPES[dtype] if dtype else None, clamp_quantile=clamp_quantile, text=rank or "", progress=advance, device=device)
    written = ui.save_result(app, result, output, force, allow_nonfinite)
    s = result.summary
    kept = f"{100 * s.get('retained', 1.0):.2f}% of ‖ΔW‖² kept"
    ui.report(app, result, written, as_json, f"{s['modules']} modules, alpha {s['alpha']:g}, {kept}", ui.show_ranks)
