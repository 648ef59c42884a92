"""Everything the CLI prints goes through here: JSON, tables, warnings, notes, progress, bar charts."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from rich.markup import escape
from rich.table import Table
from rich.text import Text


def print_json(app, obj) -> None:
    """One JSON document on stdout (plain, no markup, no wrapping)."""
    app.out.file.write(json.dumps(obj, indent=2, default=str) + "\n")


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
