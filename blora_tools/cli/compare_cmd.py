"""`blora-tools compare`: where two adapters train, how strongly, and where they collide."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import click
from rich.text import Text

from blora_tools.cli import output as ui
from blora_tools.cli.params import arch_option, device_option, json_option

_STATUS_STYLE = MappingProxyType(
    {"aligned": "bold yellow", "opposed": "bold red", "shared": "", "a only": "cyan", "b only": "magenta"}
)


@click.command("compare")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option(
    "--style",
    type=click.Choice(["a", "b"]),
    help="Which file is the style adapter, for the pruning advice (default: the one training fewer U-Net blocks).",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw the per-block norms of both files to this image (.png/.svg/.pdf; needs blora-tools[plot]).",
)
@click.option("--force", is_flag=True, help="Replace the --plot chart if it exists.")
@json_option
@arch_option
@device_option
@click.pass_obj
def compare_cmd(app, a: Path, b: Path, style: str | None, plot_path: Path | None, force: bool, as_json: bool, arch) -> None:
    """Compare adapters A and B block by block, e.g. a character and a style adapter.

    Per paper group: which file trains it, the norm of each file's ΔW there, the cosine similarity of the
    two ΔW (the group's modules flattened together; missing modules count as zeros) and the overlap of their
    column spaces (mean cos² of the principal angles, 1 = same directions, 0 = orthogonal). Blocks where
    both are strong and aligned (cosine > 0.3: effects add up) or opposed (< -0.3: they cancel) are
    flagged; those are the blocks to prune from the style adapter before merging.

    \b
    Examples:
      blora-tools compare character.safetensors style.safetensors
      blora-tools compare char.safetensors style.safetensors --style b --json
      blora-tools compare a.safetensors b.safetensors --plot blocks.png
    """
    from blora_tools.adapter.model import open_adapter
    from blora_tools.compute import resolve_device
    from blora_tools.ops.compare import compare

    if plot_path is not None:
        from blora_tools.cli.plot import check_chart

        check_chart(plot_path, [a, b], force)
    device = resolve_device(app.device)
    first, second = open_adapter(a, arch), open_adapter(b, arch)
    total = len(first.modules) + len(second.modules)
    with ui.progress(app, f"comparing {a.name} and {b.name}", total) as advance:
        report = compare(first, second, style=style, on_module=advance, device=device)
    if plot_path is not None:
        from blora_tools.cli.plot import plot_blocks

        blocks = report["blocks"]
        series = {
            f"A: {a.name}": {g: f["norm_a"] if f["modules_a"] else None for g, f in blocks.items()},
            f"B: {b.name}": {g: f["norm_b"] if f["modules_b"] else None for g, f in blocks.items()},
        }
        plot_blocks(plot_path, series, f"per-block ‖ΔW‖ ({report['arch']})", inputs=[a, b], force=force)
    if as_json:
        ui.print_json(app, report)
        ui.warn_all(app, report["warnings"])
        return
    _show(app, report, a, b)
    if plot_path is not None:
        ui.note(app, f"chart written to {plot_path}")
    ui.warn_all(app, report["warnings"])


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}"


def _show(app, report: dict, a: Path, b: Path) -> None:
    app.out.print(Text("A ", style="bold cyan") + Text(str(a)))
    app.out.print(Text("B ", style="bold magenta") + Text(str(b)))
    blocks = report["blocks"]
    top_a = max((f["norm_a"] for f in blocks.values()), default=0.0) or 1.0
    top_b = max((f["norm_b"] for f in blocks.values()), default=0.0) or 1.0
    rows = []
    for group, f in blocks.items():
        status = f["status"] or ""
        rows.append(
            [
                group,
                f"{f['norm_a']:.3g}" if f["modules_a"] else "·",
                ui.bar(f["norm_a"] / top_a, width=10, style="cyan"),
                f"{f['norm_b']:.3g}" if f["modules_b"] else "·",
                ui.bar(f["norm_b"] / top_b, width=10, style="magenta"),
                _number(f["cosine"]),
                "–" if f["overlap"] is None else f"{f['overlap']:.2f}",
                Text(status, style=_STATUS_STYLE.get(status, "")),
            ]
        )
    columns = ["block", "norm A", "", "norm B", "", "cosine", "overlap", ""]
    app.out.print(ui.table(None, columns, rows, right=(1, 3, 5, 6)))
    advice = report["advice"]
    who = "A" if advice["style"] == "a" else "B"
    assumed = " (assumed: it trains fewer blocks; set --style)" if advice["style_assumed"] else ""
    if advice["prune"]:
        app.out.print(
            Text("advice: ", style="bold")
            + Text(f"prune {','.join(advice['prune'])} from the style adapter {who}{assumed} before merging — ")
            + Text(advice["reason"])
        )
    else:
        app.out.print(Text("advice: ", style="bold") + Text(advice["reason"]))
