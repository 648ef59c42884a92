"""`blora-tools merge`: combine adapters with a ratio and a block set each (character + style)."""

from __future__ import annotations

import math
from pathlib import Path

import click

from blora_tools.cli import output as ui
from blora_tools.cli.params import SELECTOR, allow_nonfinite_option, force_option, json_option, output_option
from blora_tools.cli.prune_cmd import done, group_key, save_result, show_json

DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}


class RatiosParam(click.ParamType):
    """A comma list of finite numbers: `1,0.8`."""

    name = "RATIOS"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            ratios = tuple(float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma list of numbers such as 1,0.8", param, ctx)
        if not all(math.isfinite(r) for r in ratios):
            self.fail(f"{value!r} has a value that is not finite", param, ctx)
        return ratios


class RankParam(click.ParamType):
    """A rank: `16`, or per block `in0=8,out3=16` (checked here; resolved once the architecture is known)."""

    name = "RANK"

    def convert(self, value, param, ctx):
        from blora_tools.errors import SelectorError
        from blora_tools.taxonomy.weights import parse_weights

        text = str(value).strip()
        if text.isdigit():
            if int(text) < 1:
                self.fail("a rank must be at least 1", param, ctx)
            return text
        try:
            spec = parse_weights(text)
        except SelectorError as err:
            self.fail(str(err), param, ctx)
        if spec.vector is not None or any(v < 0 or not float(v).is_integer() for _, v in spec.named):
            self.fail(f"{text!r}: give one whole number or block=rank pairs such as in0=8,out3=16", param, ctx)
        return text


class RuleParam(click.ParamType):
    """A dynamic rank rule: sv_fro:0.95, sv_ratio:20, sv_cumulative:0.9."""

    name = "RULE"

    def convert(self, value, param, ctx):
        from blora_tools.errors import BloraError
        from blora_tools.ops.lowrank import RankRule

        if isinstance(value, RankRule):
            return value
        try:
            return RankRule.from_text(str(value))
        except BloraError as err:
            self.fail(str(err), param, ctx)


RANK = RankParam()
RULE = RuleParam()

alpha_option = click.option("--alpha", type=float, help="The one alpha value the output uses for every module (default: its largest rank).")
dtype_option = click.option("--dtype", type=click.Choice(sorted(DTYPES)), help="Output tensor dtype (default: the first input's).")
clamp_option = click.option("--clamp-quantile", type=click.FloatRange(0, 1, min_open=True), help="Clamp factor entries at this quantile of their magnitudes (kohya's svd_merge option; off by default).")
conv_rank_option = click.option("--conv-rank", type=click.IntRange(min=1), help="Rank for k×k convolutions (LoCon); default: as --rank.")


@click.command("merge")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@output_option()
@click.option("--ratios", type=RatiosParam(), help="One comma list, one ratio per input, in input order (default 1 each).")
@click.option("--blocks", "selectors", multiple=True, type=SELECTOR, help="Blocks taken from an input; give it once per input, in input order (default all).")
@click.option("--method", type=click.Choice(["concat", "svd"]), default="concat", show_default=True, help="concat: exact, rank = sum of ranks. svd: re-compressed to --rank.")
@click.option("--rank", type=RANK, help="With svd: target rank, or per block 'in0=8,out3=16' (unnamed blocks keep every rank).")
@conv_rank_option
@clamp_option
@alpha_option
@dtype_option
@click.option("--strict", is_flag=True, help="Refuse inputs trained on different base models (otherwise a warning).")
@force_option
@allow_nonfinite_option
@json_option
@click.pass_obj
def merge_cmd(app, inputs, output: Path, ratios, selectors, method, rank, conv_rank, clamp_quantile, alpha, dtype, strict, force, allow_nonfinite, as_json) -> None:
    """Merge adapter INPUTS, each with its own ratio and blocks, into -o OUT.

    --ratios is one comma list aligned with the inputs; --blocks is given once per input, in input order.
    The output uses one alpha for every module, with each module's scale folded into its factors, so every
    loader (diffusers included) gets the same ΔW. concat is exact; svd never builds a dense ΔW for LoRA inputs
    (LoHa, LoKr and full modules are made dense and compressed).

    \b
    Examples (character on all blocks at 1.0, plus style on the outer level at 0.8):
      blora-tools merge char.safetensors style.safetensors --ratios 1,0.8 \\
          --blocks all --blocks in0,out3 -o char+style.safetensors
      blora-tools merge a.safetensors b.safetensors --method svd --rank 32 -o ab.safetensors
    """
    from blora_tools.adapter.model import open_adapter
    from blora_tools.adapter.writer import check_output
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
    adapters = [open_adapter(path) for path in inputs]
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
    arguments = {
        "inputs": [p.name for p in inputs],
        "ratios": [s.ratio for s in sources],
        "blocks": [s.selector for s in sources],
        "method": method,
    }
    arguments.update({k: v for k, v in (("rank", rank), ("conv_rank", conv_rank), ("clamp_quantile", clamp_quantile), ("alpha", alpha)) if v is not None})
    result = merge(
        sources,
        method=method,
        plan=plan,
        alpha=alpha,
        dtype=DTYPES[dtype] if dtype else None,
        clamp_quantile=clamp_quantile,
        strict=strict,
        arguments=arguments,
    )
    written = save_result(app, result, output, force, allow_nonfinite)
    if as_json:
        show_json(app, result, written)
        return
    show_ranks(app, result)
    s = result.summary
    done(app, written, f"{s['modules']} modules, {s['method']}, alpha {s['alpha']:g}")
    ui.warn_all(app, result.warnings)


def show_ranks(app, result) -> None:
    """A per-block table of ranks in and out (and the share of ‖ΔW‖² kept, when measured)."""
    blocks = result.summary["blocks"]
    measured = any("retained" in b for b in blocks.values())
    rows = []
    for group in sorted(blocks, key=group_key(result.summary["arch"])):
        b = blocks[group]
        row = [group, b["modules"], _span(b["rank_in"]), _span(b["rank_out"])]
        if measured:
            kept = b.get("retained")
            row += ["" if kept is None else f"{100 * kept:.2f}%", "" if kept is None else ui.bar(kept)]
        rows.append(row)
    columns = ["block", "modules", "rank in", "rank out"] + (["‖ΔW‖² kept", ""] if measured else [])
    app.out.print(ui.table(None, columns, rows, right=(1, 2, 3, 4)))


def _span(span) -> str:
    if not span:
        return "—"
    low, high = span
    return str(low) if low == high else f"{low}–{high}"
