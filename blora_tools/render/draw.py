"""The labelled grid image: axis titles, column and row labels (wrapped to the cell width), cells in plan order.

PIL is imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from blora_tools.render.plan import GridPlan

if TYPE_CHECKING:
    from PIL import Image

@dataclass
class Layout:
    """Where everything goes on the grid image (pixels)."""

    width: int
    height: int
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(draw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; words longer than a line are broken by characters."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = word if not line else f"{line} {word}"
            if _text_width(draw, candidate, font) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for ch in word:
                if line and _text_width(draw, line + ch, font) > width:
                    lines.append(line)
                    line = ""
                line += ch
        lines.append(line)
    return lines


def draw_grid(plan: GridPlan, images: Sequence["Image.Image"]) -> tuple["Image.Image", Layout]:
    """The labelled grid: axis titles, column and row labels, cells in plan order. A single cell
    without axes is returned as it is."""
    from PIL import Image, ImageDraw

    if len(images) != len(plan.cells):
        raise ValueError(f"{len(images)} images for {len(plan.cells)} cells")
    cell_w, cell_h = images[0].size
    if not plan.is_grid:
        return images[0], Layout(cell_w, cell_h, [(0, 0, cell_w, cell_h)])
    size = max(10, min(48, cell_w // 16))
    font, title_font = _font(size), _font(size + size // 4)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = size + size // 3
    title_h = size + size // 4 + size // 2
    pad, gap = max(4, size // 2), max(2, size // 4)

    col_lines = [_wrap(scratch, plan.x.label(v), font, cell_w - 2) for v in plan.x.values] if plan.x else []
    top = pad + title_h + max(len(lines) for lines in col_lines) * line_h + pad if plan.x else pad
    left_w = 0
    row_lines: list[list[str]] = []
    if plan.y:
        label_w = max(cell_w // 2, min(cell_w, max(_text_width(scratch, plan.y.label(v), font) for v in plan.y.values)))
        row_lines = [_wrap(scratch, plan.y.label(v), font, label_w) for v in plan.y.values]
        left_w = pad + title_h + label_w + pad
    left = left_w or pad
    width = left + plan.columns * cell_w + (plan.columns - 1) * gap + pad
    height = top + plan.rows * cell_h + (plan.rows - 1) * gap + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)

    def x0(col: int) -> int:
        return left + col * (cell_w + gap)

    def y0(row: int) -> int:
        return top + row * (cell_h + gap)

    if plan.x:
        body_w = plan.columns * cell_w + (plan.columns - 1) * gap
        tw = _text_width(draw, plan.x.title, title_font)
        draw.text((left + (body_w - tw) // 2, pad), plan.x.title, fill="black", font=title_font)
        for col, lines in enumerate(col_lines):
            y = pad + title_h
            for line in lines:
                w = _text_width(draw, line, font)
                draw.text((x0(col) + (cell_w - w) // 2, y), line, fill="black", font=font)
                y += line_h
    if plan.y:
        body_h = plan.rows * cell_h + (plan.rows - 1) * gap
        tw = _text_width(draw, plan.y.title, title_font)
        strip = Image.new("RGB", (tw + 2, title_h), "white")
        ImageDraw.Draw(strip).text((0, 0), plan.y.title, fill="black", font=title_font)
        strip = strip.rotate(90, expand=True)
        grid.paste(strip, (pad, top + max(0, (body_h - strip.size[1]) // 2)))
        for row, lines in enumerate(row_lines):
            y = y0(row) + max(0, (cell_h - len(lines) * line_h) // 2)
            for line in lines:
                draw.text((pad + title_h, y), line, fill="black", font=font)
                y += line_h
    layout = Layout(width, height)
    for cell, image in zip(plan.cells, images):
        box = (x0(cell.col), y0(cell.row), x0(cell.col) + cell_w, y0(cell.row) + cell_h)
        grid.paste(image, box[:2])
        layout.boxes.append(box)
    return grid, layout
