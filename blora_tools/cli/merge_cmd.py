"""`blora-tools merge`: combine adapters with a ratio and a block set each (character + style)."""

from __future__ import annotations

from pathlib import Path

import click

from blora_tools.cli import output as ui
from blora_tools.cli.params import (
    arch_option,
    DTYPES,
    RANK,
    SELECTOR,
    RatiosParam,
    allow_nonfinite_option,
    alpha_option,
    clamp_option,
    conv_rank_option,
    device_option,
    dtype_option,
    force_option,
    json_option,
    names_option,
    output_option,
)
from blora_tools.ops.merge import METHODS

@click.command("merge")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@output_option()
@click.option("--ratios", type=RatiosParam(), help="One comma list, one ratio per input, in input order (default 1 each).")
@click.option("--blocks", "selectors", multiple=True, type=SELECTOR, help="Blocks taken from an input; give it once per input, in input order (default all).")
@click.option("--method", type=click.Choice(METHODS), default=METHODS[0], show_default=True, help="concat: exact, rank = sum of ranks. svd: re-compressed to --rank.")
@click.option("--rank", type=RANK, help="With svd: target rank, or per block 'in0=8,out3=16' (unnamed blocks keep every rank).")
@conv_rank_option
@clamp_option
@alpha_option
@dtype_option
@names_option
@click.option("--strict", is_flag=True, help="Refuse inputs trained on different base models (otherwise a warning).")
@force_option
@arch_option
@allow_nonfinite_option
@device_option
@json_option
@click.pass_obj
def merge_cmd(app, inputs, output: Path, ratios, selectors, method, rank, conv_rank, clamp_quantile, alpha, dtype, names, strict, force, allow_nonfinite, as_json, arch) -> None:
    """Merge adapter INPUTS, each with its own ratio and blocks, into -o OUT.

    --ratios is one comma list aligned with the inputs; --blocks is given once per input, in input order.
    The output uses one alpha for every module, with each module's scale folded into its factors, so every
    loader (diffusers included) gets the same ΔW. concat is exact; svd never builds a dense ΔW for LoRA inputs
    (LoHa, LoKr and full modules are made dense and compressed into conv-shaped factors on conv layers).
    A layer named differently in different inputs (SDXL LDM and diffusers names) is one module of the output,
    named as in the first input unless --names says otherwise. Flux.1/SD3 inputs of any dialect (kohya,
    diffusers/ai-toolkit, ComfyUI, OneTrainer, XLabs) are combined per fused layer in the first input's
    naming (put a kohya/ComfyUI file first for kohya's fused names, which every Flux loader reads); a
    sub-selector such as D05.img.q takes only those rows of a fused layer from that input.

    \b
    Examples (character on all blocks at 1.0, plus style on the outer level at 0.8):
      blora-tools merge char.safetensors style.safetensors --ratios 1,0.8 \\
          --blocks all --blocks in0,out3 -o char+style.safetensors
      blora-tools merge a.safetensors b.safetensors --method svd --rank 32 -o ab.safetensors
      blora-tools merge flux-char.safetensors flux-style-diffusers.safetensors --ratios 1,0.8 \\
          --blocks all --blocks S10-S37 -o flux-char+style.safetensors
    """
    from blora_tools.adapter.model import open_adapter
    from blora_tools.adapter.writer import check_output
    from blora_tools.compute import resolve_device
    from blora_tools.ops.lowrank import rank_plan
    from blora_tools.ops.merge import Source, common_arch, merge

    n = len(inputs)
    if ratios is not None and len(ratios) != n:
        raise click.BadParameter(f"{len(ratios)} ratio(s) for {n} input(s); give one per input", param_hint="--ratios")
    if selectors and len(selectors) != n:
        raise click.BadParameter(f"given {len(selectors)} time(s) for {n} input(s); give it once per input, in order", param_hint="--blocks")
    if method == "concat" and (rank or conv_rank or clamp_quantile):
        raise click.UsageError("--rank, --conv-rank and --clamp-quantile go with --method svd")
    if method == "svd" and rank is None:
        raise click.UsageError("--method svd needs --rank N (or per block, e.g. --rank in0=8,out3=16)")
    device = resolve_device(app.device)
    adapters = [open_adapter(path, arch) for path in inputs]
    check_output(output, inputs, force)
    arch = common_arch(adapters)
    sources = []
    for i, adapter in enumerate(adapters):
        selector = selectors[i] if selectors else None
        blocks = None
        if selector is not None and selector.text.strip().lower() not in ("all", "character"):
            blocks = selector.resolve(arch)
        sources.append(Source(adapter, ratios[i] if ratios else 1.0, blocks, selector.text if selector else "all"))
    plan = rank_plan(rank, arch, conv=conv_rank) if method == "svd" else None
    result = merge(
        sources,
        method=method,
        plan=plan,
        alpha=alpha,
        dtype=DTYPES[dtype] if dtype else None,
        clamp_quantile=clamp_quantile,
        strict=strict,
        names=names,
        device=device,
    )
    written = ui.save_result(app, result, output, force, allow_nonfinite)
    s = result.summary
    ui.report(app, result, written, as_json, f"{s['modules']} modules, {s['method']}, alpha {s['alpha']:g}", ui.show_ranks)
