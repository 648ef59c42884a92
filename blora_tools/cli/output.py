"""Everything the CLI prints goes through here: JSON, tables, warnings, notes, progress, bar charts."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from rich.markup import escape
from rich.table import Table
from rich.text import Text


def print_json(app, obj) -> None:
    """One JSON document on stdout (plain, no markup, no wrapping), always valid JSON (see jsonio.dumps)."""
    from blora_tools.jsonio import dumps

    app.out.file.write(dumps(obj, indent=2) + "\n")


def warn(app, message: str) -> None:
    """A warning line on stderr (printed even with --json; never with user text read as markup)."""
    app.err.print(Text("warning: ", style="yellow") + Text(" ".join(message.split())))


def note(app, message: str) -> None:
    """An informational line on stderr, suppressed by --quiet."""
    if not app.quiet:
        app.err.print(Text(message, style="dim"))


def warn_all(app, messages: Iterable[str]) -> None:
    for m in messages:
        warn(app, m)


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[object]], right: Iterable[int] = ()) -> Table:
    """A rich table; cells are text, never markup (file names can contain brackets)."""
    t = Table(title=escape(title) if title else None, title_justify="left", header_style="bold")
    right_set = set(right)
    for i, c in enumerate(columns):
        t.add_column(c, justify="right" if i in right_set else "left", no_wrap=True)
    for row in rows:
        t.add_row(*(c if isinstance(c, Text) else Text("" if c is None else str(c)) for c in row))
    return t


GRID_COLUMNS = 10
"""Blocks per row of a block grid: ten cells of up to six characters and the row label fit 100 columns."""


def block_grid(title: str | None, groups: Iterable[Sequence[str]], cell: Callable[[str], str]) -> Table:
    """Many blocks (Flux.1's 57, SD3's 38) as a grid: a row per ten blocks of a group, `cell(block)` in each."""
    rows = []
    for members in groups:
        for start in range(0, len(members), GRID_COLUMNS):
            chunk = members[start : start + GRID_COLUMNS]
            rows.append([f"{chunk[0]}–{chunk[-1]}"] + [cell(b) for b in chunk])
    columns = ["blocks"] + [f"+{i}" for i in range(GRID_COLUMNS)]
    return table(title, columns, rows, right=range(1, GRID_COLUMNS + 1))


def number(v: float) -> str:
    """A weight or rank as people write it: `1`, `0.5`."""
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def bar(fraction: float, width: int = 12, style: str = "cyan") -> Text:
    """A horizontal bar for a value in [0, 1]."""
    fraction = min(max(fraction, 0.0), 1.0)
    full = int(round(fraction * width))
    return Text("█" * full + "·" * (width - full), style=style)


@contextmanager
def progress(app, description: str, total: int) -> Iterator:
    """A progress bar on stderr; yields `advance(n=1)`. Silent with --quiet or when stderr is not a terminal."""
    if app.quiet or not app.err.is_terminal:
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=app.err,
        transient=True,
    ) as bar_display:
        task = bar_display.add_task(escape(description), total=total)
        yield lambda n=1: bar_display.advance(task, n)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# --- results of the writing commands -------------------------------------------------------------------------


def save_result(app, result, path: Path, force: bool, allow_nonfinite: bool = False) -> Path:
    """Write a Result atomically, with a progress bar over the bytes written (NaN/Inf refused unless allowed)."""
    with progress(app, f"writing {Path(path).name}", result.nbytes) as advance:
        return result.save(path, force=force, on_bytes=advance, allow_nonfinite=allow_nonfinite)


def show_json(app, result, written: Path | None) -> None:
    """The --json document: the operation's summary plus `output` (null for a dry run) and `warnings`."""
    doc = dict(result.summary)
    doc["output"] = None if written is None else str(written)
    doc["warnings"] = list(result.warnings)
    print_json(app, doc)
    warn_all(app, result.warnings)


def done(app, written: Path, what: str) -> None:
    """The closing line on stdout: what was written and how big it is."""
    size = human_bytes(written.stat().st_size)
    app.out.print(Text("wrote ", style="green") + Text(f"{written} ({what}, {size})"))


def group_key(arch: str):
    """A sort key putting paper groups in LBW order (text encoders first, `none` last)."""
    from blora_tools.taxonomy.blocks import table as arch_table

    order = list(arch_table(arch).groups) + ["none"]
    return lambda g: order.index(g) if g in order else len(order)


def report(app, result, written: Path, as_json: bool, what: str, show: Callable | None = None) -> None:
    """How a writing command ends: the JSON summary, or `show(app, result)`, the closing line and warnings."""
    if as_json:
        show_json(app, result, written)
        return
    if show is not None:
        show(app, result)
    done(app, written, what)
    warn_all(app, result.warnings)


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
            row += ["" if kept is None else f"{100 * kept:.2f}%", "" if kept is None else bar(kept)]
        rows.append(row)
    columns = ["block", "modules", "rank in", "rank out"] + (["‖ΔW‖² kept", ""] if measured else [])
    app.out.print(table(None, columns, rows, right=(1, 2, 3, 4)))


def _span(span) -> str:
    if not span:
        return "—"
    low, high = span
    return str(low) if low == high else f"{low}–{high}"
