"""`blora-tools inspect`: what is inside adapter files, per block."""

from __future__ import annotations

from pathlib import Path

import click
from rich.text import Text

from blora_tools.cli import output
from blora_tools.cli.params import arch_option, device_option
from blora_tools.errors import AdapterFileError


def _expand(paths: tuple[Path, ...]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(p.rglob("*.safetensors"))
            if not found:
                raise AdapterFileError("folder holds no .safetensors files", p)
            files.extend(found)
        else:
            files.append(p)
    return files


@click.command("inspect")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--fine", is_flag=True, help="One row per LBW block (IN00…OUT11, BASE) instead of per paper group.")
@click.option("--no-stats", is_flag=True, help="Read only the headers: no norms, no NaN check, no tensor data.")
@arch_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per file (schema blora-inspect/1).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Also draw the per-block norms of every file as a chart (.png/.svg/.pdf; needs matplotlib).")
@click.option("--force", is_flag=True, help="Replace the --plot chart if it exists.")
@device_option
@click.pass_obj
def inspect_cmd(app, paths: tuple[Path, ...], fine: bool, no_stats: bool, as_json: bool, plot: Path | None, force: bool, arch) -> None:
    """Show architecture, format, kinds and a per-block table of adapter FILES (or folders).

    Norms are Frobenius norms of each block's scaled ΔW, computed from the factors (no dense
    matrices); share is the block's part of the file's total squared norm.

    Flux.1 and SD3 files also get every block (D00..S37, J00..) as a grid, ten blocks a row, the layer
    parts each group trains, and a chart (--plot) with one bar per block.

    \b
    Examples:
      blora-tools inspect style.safetensors
      blora-tools inspect --fine --json style.safetensors
      blora-tools inspect --no-stats ~/loras/          # one row per file, headers only
      blora-tools inspect a.safetensors b.safetensors --plot norms.png
      blora-tools inspect flux-lora.safetensors --fine          # BASE, D00..D18, S00..S37 (empty runs collapsed)
    """
    from blora_tools.adapter.model import open_adapter
    from blora_tools.ops.stats import inspect_adapter

    if plot is not None and no_stats:
        raise click.UsageError("--plot draws norms, which --no-stats does not compute")
    files = _expand(paths)
    device = None
    if not no_stats:  # statistics read tensors; without them torch is never imported
        from blora_tools.compute import resolve_device

        device = resolve_device(app.device)
    if plot is not None:
        from blora_tools.cli.plot import check_chart

        check_chart(plot, [*paths, *files], force)
    reports = []
    for path in files:
        adapter = open_adapter(path, arch)
        with output.progress(app, f"reading {path.name}", len(adapter.modules)) as advance:
            reports.append(inspect_adapter(adapter, fine=fine, with_stats=not no_stats, on_module=advance, device=device))
    archs = {r["arch"] for r in reports}
    if len(archs) > 1:
        for r in reports:
            r["warnings"].append(f"files of mixed architectures given: {', '.join(sorted(archs))}")
    if plot is not None:
        from blora_tools.cli.plot import plot_blocks

        series = {Path(r["path"]).name: {b: v["norm"] for b, v in r.get("per_block", r["blocks"]).items()} for r in reports}
        plot_blocks(plot, series, "per-block ΔW norm", inputs=files, force=force)
        output.note(app, f"chart written to {plot}")
    if as_json:
        output.print_json(app, reports)
        for r in reports:
            output.warn_all(app, (f"{r['path']}: {w}" for w in r["warnings"]))
        return
    if len(reports) > 1:
        _show_many(app, reports)
        return
    _show_one(app, reports[0], fine)


def _show_one(app, report: dict, fine: bool) -> None:
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(report["kinds"].items()))
    dtypes = ", ".join(sorted(report["dtypes"]))
    app.out.print(Text(report["path"], style="bold"))
    app.out.print(
        Text(
            f"{report['arch']} · {_keys(report)}{_naming(report)} · {report['modules']} modules ({kinds}) · {dtypes} · "
            f"{output.human_bytes(report['size'])}"
        )
    )
    has_norm = report["norm"] is not None
    rows = []
    for name, b in report["blocks"].items():
        rank = "" if b["rank_min"] is None else (
            str(b["rank_min"]) if b["rank_min"] == b["rank_max"] else f"{b['rank_min']}–{b['rank_max']}"
        )
        scale = "" if b["scale_min"] is None else (
            f"{b['scale_min']:g}" if b["scale_min"] == b["scale_max"] else f"{b['scale_min']:g}–{b['scale_max']:g}"
        )
        row = [name, b["modules"] or "·", rank, scale, f"{b['params']:,}" if b["params"] else "", output.human_bytes(b["bytes"]) if b["bytes"] else ""]
        if has_norm:
            share = b["share"] or 0.0
            row += [f"{b['norm']:.4g}" if b["norm"] is not None else "", f"{100 * share:.1f}%" if b["norm"] is not None else "", output.bar(share)]
        rows.append(row)
    columns = ["LBW" if fine else "block", "modules", "rank", "α/rank", "params", "bytes"]
    if has_norm:
        columns += ["norm", "share", ""]
    if fine and "per_block" in report:
        rows = _collapse_empty(rows)
    app.out.print(output.table(None, columns, rows, right=range(1, 8)))
    if "per_block" in report:
        _show_dit(app, report, has_norm, fine)
    training = report["training"]
    if training:
        lines = [f"{k}: {v}" for k, v in training.items() if k != "top_tags"]
        if "top_tags" in training:
            lines.append("top tags: " + ", ".join(f"{t} ({n})" for t, n in training["top_tags"]))
        app.out.print(Text("training: " + " · ".join(lines), style="dim"))
    output.warn_all(app, report["warnings"])


_NAMINGS = {"bfl": "fused BFL layers", "diffusers": "split diffusers layers", "part": "XLabs linear1 q/k/v parts"}


def _naming(report: dict) -> str:
    """How a Flux.1/SD3 file names its layers (fused BFL/SAI or split diffusers), after its key format."""
    namings = report.get("naming")
    return f" ({', '.join(_NAMINGS[n] for n in namings)})" if namings else ""


def _collapse_empty(rows: list[list]) -> list[list]:
    """Runs of consecutive blocks without modules as one row (`D02–D18`), so 57 blocks stay readable."""
    merged: list[list] = []
    for row in rows:
        if row[1] == "·" and merged and merged[-1][1] == "·" and merged[-1][0][:1] == row[0][:1]:
            merged[-1][0] = f"{merged[-1][0].split('–')[0]}–{row[0]}"
        else:
            merged.append(list(row))
    return merged


def _show_dit(app, report: dict, has_norm: bool, fine: bool) -> None:
    """Flux.1/SD3: every block in a grid (a row per ten blocks of a group), then what the file trains."""
    if not fine:
        from blora_tools.taxonomy.blocks import table as arch_table

        per_block = report["per_block"]
        what = "share of ‖ΔW‖² (%)" if has_norm else "rank"
        groups = arch_table(report["arch"]).group_members.values()
        app.out.print(output.block_grid(f"{what} per block", groups, lambda b: _cell(per_block[b], has_norm)))
    trained = report["trained"]
    parts = " · ".join(f"{g}: {', '.join(p)}" for g, p in trained["parts"].items())
    app.out.print(Text(f"trains {trained['blocks'] or '(nothing)'} ({parts})", style="dim"))
    if trained["untrained"]:
        app.out.print(Text(f"no modules in {trained['untrained']}", style="dim"))


def _cell(figures: dict, has_norm: bool) -> str:
    if not figures["modules"]:
        return "·"
    if has_norm:
        return "" if figures["share"] is None else f"{100 * figures['share']:.1f}"
    low, high = figures["rank_min"], figures["rank_max"]
    return "" if low is None else f"r{low}" if low == high else f"r{low}–{high}"


def _keys(report: dict) -> str:
    """The key format, and the producer dialect where it is not the format's own (`kohya (comfyui keys)`)."""
    if report["dialect"] == report["format"] or (report["format"], report["dialect"]) == ("peft", "diffusers"):
        return report["format"]
    return f"{report['format']} ({report['dialect']} keys)"


def _show_many(app, reports: list[dict]) -> None:
    rows = []
    for r in reports:
        groups = [g for g, b in r["blocks"].items() if b["modules"]]
        ranks = [b["rank_max"] for b in r["blocks"].values() if b["rank_max"] is not None]
        rows.append([
            r["path"], r["arch"], _keys(r), ",".join(f"{k}" for k in sorted(r["kinds"])), r["modules"],
            max(ranks) if ranks else "", ",".join(groups), output.human_bytes(r["size"]), len(r["warnings"]) or "",
        ])
    app.out.print(output.table(None, ["file", "arch", "format", "kinds", "modules", "rank≤", "blocks", "size", "warnings"], rows, right=(4, 5, 7, 8)))
    for r in reports:
        output.warn_all(app, (f"{r['path']}: {w}" for w in r["warnings"]))
