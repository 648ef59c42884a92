"""Per-block bar charts as image files (matplotlib, the optional `plot` extra).

Only the figure API is used (no pyplot), so drawing changes no global matplotlib state or backend.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

from blora_tools.errors import BloraError

CHART_SUFFIXES = (".png", ".svg", ".pdf")
MANY_BLOCKS = 26
"""Above this many bars (SD1's 26 LBW blocks) the chart narrows its bars and turns its labels upright."""


def check_chart(path: str | Path, inputs: Iterable[str | Path] = (), force: bool = False) -> Path:
    """Check a chart path by the rules of every output (writer.check_output); call it before long work."""
    from blora_tools.adapter.writer import check_output

    return check_output(path, inputs, force, suffixes=CHART_SUFFIXES)


def plot_blocks(
    path: str | Path,
    series: Mapping[str, Mapping[str, float | None]],
    title: str,
    *,
    inputs: Iterable[str | Path] = (),
    force: bool = False,
) -> Path:
    """Draw one bar per block for each series (grouped side by side) and write the chart to `path`.

    Args:
        path: the image to write (.png, .svg or .pdf), atomically; never an input, and an existing file only
            with `force` (checked again when the file is moved into place).
        series: series name (e.g. a file name) → block name → value (None or missing: no bar). Blocks appear
            in the order they are first met.
        title: the chart's title.
        inputs: the files the chart was drawn from.
        force: replace an existing file.

    Returns:
        The path written. Raises BloraError when matplotlib is missing or the path may not be written.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise BloraError(
            "drawing charts needs matplotlib: pip install 'blora-tools[plot]' (or pip install matplotlib)"
        ) from None
    path = check_chart(path, inputs, force)
    blocks: list[str] = []
    for values in series.values():
        blocks += [b for b in values if b not in blocks]
    per_bar = 0.6 if len(blocks) <= MANY_BLOCKS else 0.22  # Flux's 58 blocks in about 15 inches, not 37
    figure = Figure(figsize=(max(5.0, per_bar * len(blocks) * max(1, len(series)) ** 0.5 + 2), 3.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, b in enumerate(blocks) if _finite(values.get(b))]
        ys = [float(values[b]) for b in blocks if _finite(values.get(b))]
        axes.bar(xs, ys, width=width, label=name)
    many = len(blocks) > MANY_BLOCKS
    axes.set_xticks(range(len(blocks)), blocks, rotation=90 if many else 45 if len(blocks) > 12 else 0,
                    fontsize="x-small" if many else None)
    axes.set_title(title)
    axes.axhline(0.0, color="black", linewidth=0.5)
    if len(series) > 1:
        axes.legend(fontsize="small")
    from blora_tools.adapter.writer import atomic_file

    with atomic_file(path, force=force) as f:
        figure.savefig(f, format=path.suffix[1:].lower(), dpi=120)
    return path


def _finite(value: float | None) -> bool:
    """A value that gets a bar (None, NaN and ±Inf get none: matplotlib cannot scale an axis to them)."""
    return value is not None and math.isfinite(value)
