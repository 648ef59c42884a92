"""`blora-tools demo`: the whole idea on a tiny built-in model, no files or downloads needed."""

from __future__ import annotations

from pathlib import Path

import click
from rich.text import Text

from blora_tools.cli import output


@click.command("demo")
@click.argument("directory", required=False, default="blora-demo", type=click.Path(file_okay=False, path_type=Path))
@click.option("--steps", type=click.IntRange(1, 10_000), default=40, show_default=True, help="Training steps per adapter.")
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True, help="Seed for the model, the data and training.")
@click.option("--force", is_flag=True, help="Replace the demo files in DIRECTORY if they exist.")
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
@click.pass_obj
def demo_cmd(app, directory: Path, steps: int, seed: int, force: bool, as_json: bool) -> None:
    """Train a character and a style adapter on a tiny SD1-shaped model, then cut, merge and compare them.

    Everything is built in code (no downloads, no files of yours) and takes under a minute on a laptop
    CPU. The adapters are trained through `kohya_plugin.blockwise` with sd-scripts' call sequence on two
    synthetic latent image sets (one identity, one texture); the character adapter covers all blocks, the
    style adapter only the outermost level (in0,out3), both LoCon. Files, a Markdown report and a chart of the
    per-block norms (blocks.png) go to DIRECTORY (default ./blora-demo).

    \b
    Examples:
      blora-tools demo
      blora-tools demo /tmp/demo --steps 120 --force
      blora-tools inspect blora-demo/style.safetensors     # then look at what it made
    """
    from blora_tools.demo import run_demo, write_report

    def stage(message: str) -> None:
        if not as_json and not app.quiet:
            app.err.print(Text("→ " + message))

    with output.progress(app, "training", 2 * steps) as advance:
        result = run_demo(directory, steps=steps, seed=seed, force=force, on_stage=stage, on_step=advance)
    for message in result.notes:
        output.note(app, f"plugin: {message}")
    chart = _chart(app, result, directory, force)
    report = write_report(result, directory / "report.md", chart, force=force)
    if as_json:
        output.print_json(app, {
            "directory": str(directory), "seconds": result.seconds, "losses": result.losses,
            "training": {k: {"first": a, "last": b} for k, (a, b) in result.train_curves.items()},
            "files": {k: str(v) for k, v in result.files.items()}, "report": str(report),
            "chart": None if chart is None else str(chart), "findings": [f.text for f in result.findings],
        })
        return
    _show(app, result, report, chart)


def _chart(app, result, directory: Path, force: bool) -> Path | None:
    from blora_tools.cli.plot import plot_blocks
    from blora_tools.errors import BloraError

    series = {name: {b: v["norm"] for b, v in report["blocks"].items()} for name, report in result.inspect.items()}
    try:
        return plot_blocks(directory / "blocks.png", series, "per-block ΔW norm: character vs style", force=force)
    except BloraError as err:
        output.note(app, f"no chart: {err}")
        return None


def _show(app, result, report: Path, chart: Path | None) -> None:
    rows = [[name, f"{v['character']:.4f}", f"{v['style']:.4f}"] for name, v in result.losses.items()]
    app.out.print(output.table("denoising loss on each image set (lower is better)", ["model", "character set", "style set"], rows, right=(1, 2)))
    for finding in result.findings:
        app.out.print(Text(f"  {finding.text}"))
    rows = []
    char_blocks, style_blocks = result.inspect["character"]["blocks"], result.inspect["style"]["blocks"]
    for block, figures in char_blocks.items():
        other = style_blocks.get(block, {})
        rows.append([block, figures["modules"] or "·", other.get("modules") or "·"])
    app.out.print(output.table("modules per block", ["block", "character", "style"], rows, right=(1, 2)))
    app.out.print(f"merged file: {result.merge_summary['modules']} modules · took {result.seconds:.1f} s")
    for name, path in result.files.items():
        app.out.print(Text(f"  {name:16} {path}"))
    app.out.print(Text(f"  {'report':16} {report}"))
    if chart is not None:
        app.out.print(Text(f"  {'chart':16} {chart}"))
    app.out.print(Text(f"next: blora-tools inspect {result.files['style']}", style="dim"))
