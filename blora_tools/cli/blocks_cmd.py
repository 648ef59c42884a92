"""`blora-tools blocks`: the block table of an architecture, and conversions between conventions."""

from __future__ import annotations


import click

from blora_tools.cli import output
from blora_tools.cli.params import FINITE_FLOAT, MAX_RANK
from blora_tools.taxonomy.arch import KNOWN_ARCHS, Arch


@click.command("blocks")
@click.option("--arch", "arch_name", type=click.Choice([a.value for a in KNOWN_ARCHS]), required=True, help="Architecture.")
@click.argument("spec", required=False)
@click.option("--as", "as_format", type=click.Choice(["table", "kohya", "lbw", "lbw-short", "diffusers"]), default="table", show_default=True, help="Output convention for SPEC.")
@click.option("--rank", type=click.IntRange(1, MAX_RANK), default=None, help="With a selector: the value for selected blocks (others 0), e.g. block_dims.")
@click.option("--lbw-fill", type=FINITE_FLOAT, default=0.0, show_default=True, help="Value for blocks a short LBW vector does not name (1 = kohya --lbws).")
@click.option("--length", type=click.IntRange(1, 1000), default=None, help="Flux/SD3 with --as lbw: the vector length (Flux 58, 57, 20, 19, 61; SD3 1+depth or 25; default the full one).")
@click.option("--json", "as_json", is_flag=True, help="Print the table or the conversion as JSON.")
@click.pass_obj
def blocks_cmd(app, arch_name: str, spec: str | None, as_format: str, rank: int | None, lbw_fill: float, length: int | None, as_json: bool) -> None:
    """Show an architecture's blocks, or convert a SPEC between block conventions.

    SPEC is a selector (`in0,out3`, `style`, `NOT te`) or block weights (`in0=1,out3=0.5`, an LBW
    vector, an LBW preset such as MIDD, or `lbw=…` pasted from a prompt).

    \b
    Examples:
      blora-tools blocks --arch sdxl
      blora-tools blocks --arch sd1 in0,out3 --as kohya --rank 16     # 25 block_dims values
      blora-tools blocks --arch sd1 lbw=MIDD --as diffusers           # set_adapters dict
      blora-tools blocks --arch sd1 "in0=1,out3=0.5" --as lbw
      blora-tools blocks --arch flux                                  # D00..D18, S00..S37, presets, vectors
      blora-tools blocks --arch flux splitflux-style --as kohya       # train_single_block_indices=10-37
      blora-tools blocks --arch flux "S10-S37=1,D=0.5" --as lbw --length 57

    On Flux.1 and SD3, --as kohya gives kohya's train_double_block_indices / train_single_block_indices
    (SD3: train_block_indices), --as lbw a weight vector (58/57/20/19/61 values on Flux, 1+depth or 25 on SD3;
    refused where that length cannot hold the weights) and --as diffusers the diffusers module names.
    """
    from blora_tools.taxonomy.arch import is_dit
    from blora_tools.taxonomy.weights import to_diffusers, to_kohya, to_lbw

    arch = Arch(arch_name)
    if length is not None and (as_format != "lbw" or not is_dit(arch)):
        raise click.UsageError("--length goes with --as lbw on flux or sd3")
    if spec is None:
        if is_dit(arch):
            from blora_tools.cli.blocks_dit import show_dit_table

            show_dit_table(app, arch, as_json)
        else:
            _show_table(app, arch, as_json)
        return
    weights, blocks = _resolve(spec, arch, rank, lbw_fill)
    if is_dit(arch):
        from blora_tools.cli.blocks_dit import export_dit

        export_dit(app, weights, as_format, length, as_json)
        if blocks is not None and not app.quiet:
            from blora_tools.taxonomy.selectors import describe_blocks

            output.note(app, f"{spec} = {describe_blocks(blocks, arch)}")
        return
    if as_format == "table":
        _show_table(app, arch, as_json, weights.values)
        return
    if as_format == "diffusers":
        value = to_diffusers(weights)
        output.print_json(app, value)
        return
    values = to_kohya(weights) if as_format == "kohya" else to_lbw(weights, short=as_format == "lbw-short")
    if as_json:
        output.print_json(app, values)
    else:
        click.echo(",".join(output.number(v) for v in values))
    if blocks is not None and not app.quiet:
        from blora_tools.taxonomy.selectors import describe_blocks

        output.note(app, f"{spec} = {describe_blocks(blocks, arch)}")


def _resolve(spec: str, arch: Arch, rank: int | None, lbw_fill: float):
    """Weights for SPEC: a selector gives `rank` (or 1) inside and 0 outside; anything else is weights."""
    from blora_tools.errors import SelectorError
    from blora_tools.taxonomy.selectors import parse_selector
    from blora_tools.taxonomy.weights import LBW_PRESETS, parse_weights, uniform_weights

    selector_error = None
    if "=" not in spec:
        try:
            blocks = parse_selector(spec).resolve(arch)
            return uniform_weights(arch, blocks, inside=float(rank if rank is not None else 1)), blocks
        except SelectorError as err:
            selector_error = err
    if rank is not None:
        raise click.UsageError("--rank goes with a selector (e.g. in0,out3), not with weights")
    try:
        return parse_weights(spec).resolve(arch, fill=lbw_fill), None
    except SelectorError as err:
        looks_like_weights = "=" in spec or spec[:1].isdigit() or spec.upper() in LBW_PRESETS
        raise click.BadParameter(str(err if looks_like_weights or selector_error is None else selector_error), param_hint="SPEC") from None


def _show_table(app, arch: Arch, as_json: bool, values=None) -> None:
    from blora_tools.taxonomy.blocks import table

    layout = table(arch)
    slots: dict[str, list[int]] = {}
    for i, block in enumerate(layout.kohya_slots):
        slots.setdefault(block, []).append(i)
    rows = []
    for te in layout.text_encoders:
        rows.append({"block": te.value, "group": te.value, "lbw": "BASE", "kohya": [], "attention": True})
    for lbw in layout.unet_lbw:
        rows.append({"block": lbw, "group": layout.group_of(lbw), "lbw": lbw, "kohya": slots.get(lbw, []), "attention": lbw in layout.attention_lbw})
    rows.append({"block": "OTHER", "group": "none", "lbw": None, "kohya": slots.get("OTHER", []), "attention": False})
    if values is not None:
        for row in rows:
            row["weight"] = values[row["block"]]
    if as_json:
        output.print_json(app, {"arch": arch.value, "blocks": rows, "presets": {"upper": _level(layout, 0), "middle": _level(layout, 1), "bottom": _level(layout, 2)}})
        return
    columns = ["group", "LBW", "kohya index", "attention"] + (["weight"] if values is not None else [])
    cells = []
    for row in rows:
        cell = [row["group"], row["lbw"] or "(time emb / out)", ",".join(map(str, row["kohya"])), "yes" if row["attention"] else "—"]
        if values is not None:
            cell.append(output.number(row["weight"]))
        cells.append(cell)
    app.out.print(output.table(f"{arch.value} blocks", columns, cells))
    app.out.print(
        f"presets: upper/style = {_level(layout, 0)} · middle = {_level(layout, 1)} · bottom = {_level(layout, 2)} · character = all"
    )


def _level(layout, level: int) -> str:
    return ",".join(layout.level_groups(level))
