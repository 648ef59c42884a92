"""Per-block bar charts as image files (matplotlib, the optional `plot` extra).

Only the figure API is used (no pyplot), so drawing changes no global matplotlib state or backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from blora_tools.errors import BloraError, OutputError

_FORMATS = (".png", ".svg", ".pdf")


def plot_blocks(path: str | Path, series: Mapping[str, Mapping[str, float | None]], title: str) -> Path:
    """Draw one bar per block for each series (grouped side by side) and write the chart to `path`.

    Args:
        path: the image to write (.png, .svg or .pdf); replaced if it exists, written atomically.
        series: series name (e.g. a file name) → block name → value (None or missing: no bar). Blocks appear
            in the order they are first met.
        title: the chart's title.

    Returns:
        The path written. Raises BloraError when matplotlib is missing or the path cannot be written.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise BloraError(
            "drawing charts needs matplotlib: pip install 'blora-tools[plot]' (or pip install matplotlib)"
        ) from None
    path = Path(path)
    if path.suffix.lower() not in _FORMATS:
        raise OutputError(f"chart must end in {', '.join(_FORMATS)}", path)
    if not path.parent.is_dir():
        raise OutputError(f"folder {path.parent} does not exist", path)
    blocks: list[str] = []
    for values in series.values():
        blocks += [b for b in values if b not in blocks]
    figure = Figure(figsize=(max(5.0, 0.6 * len(blocks) * max(1, len(series)) ** 0.5 + 2), 3.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, b in enumerate(blocks) if values.get(b) is not None]
        ys = [float(values[b]) for b in blocks if values.get(b) is not None]
        axes.bar(xs, ys, width=width, label=name)
    axes.set_xticks(range(len(blocks)), blocks, rotation=45 if len(blocks) > 12 else 0)
    axes.set_title(title)
    axes.axhline(0.0, color="black", linewidth=0.5)
    if len(series) > 1:
        axes.legend(fontsize="small")
    from blora_tools.adapter.writer import atomic_file

    with atomic_file(path) as f:
        figure.savefig(f, format=path.suffix[1:].lower(), dpi=120)
    return path
