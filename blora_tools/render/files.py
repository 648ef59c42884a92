"""What a render writes: the checks before writing, the cell → settings map (schema blora-render/1), and the
PNG with that map in a text chunk."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from blora_tools.render.args import Axis
from blora_tools.render.draw import Layout
from blora_tools.render.plan import GridPlan

if TYPE_CHECKING:
    from PIL import Image

def grid_map(plan: GridPlan, layout: Layout, common: dict) -> dict:
    """The JSON document describing a rendered grid (schema blora-render/1)."""
    cells = []
    for i, (cell, box) in enumerate(zip(plan.cells, layout.boxes)):
        cells.append({
            "index": i,
            "col": cell.col,
            "row": cell.row,
            "x_label": cell.x_label,
            "y_label": cell.y_label,
            "box": list(box),
            "settings": cell.settings.to_json(),
        })
    return {
        "schema": "blora-render/1",
        "image": {"width": layout.width, "height": layout.height},
        "columns": plan.columns,
        "rows": plan.rows,
        "x": _axis_json(plan.x),
        "y": _axis_json(plan.y),
        **common,
        "cells": cells,
    }


def _axis_json(axis: Axis | None) -> dict | None:
    if axis is None:
        return None
    return {
        "kind": axis.kind.value,
        "adapter": axis.target,
        "title": axis.title,
        "values": list(axis.values),
        "labels": [axis.label(v) for v in axis.values],
    }


def dumps(doc: dict) -> str:
    from blora_tools.jsonio import dumps as valid_json

    return valid_json(doc, indent=2, ensure_ascii=False)


def check_image_output(path: Path, force: bool, with_json: bool = False, inputs: Sequence[Path] = ()) -> list[Path]:
    """The files a render writes (the PNG, and its .json with `with_json`) after checking they may be written
    (writer.check_output: the rules of every output)."""
    from blora_tools.adapter.writer import check_output

    targets = [check_output(path, inputs, force, suffixes=(".png",))]
    if with_json:
        targets.append(check_output(json_path_for(path), inputs, force, suffixes=(".json",)))
    return targets


def json_path_for(path: Path) -> Path:
    """Where `--json` writes the cell map: beside the PNG, same stem."""
    return Path(path).with_suffix(".json")


def png_bytes(image: "Image.Image", doc: dict | None = None) -> bytes:
    """The image as PNG bytes, with the render map as a `blora-render` text chunk when given."""
    import io

    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if doc is not None:
        from blora_tools.jsonio import dumps as valid_json

        info.add_itxt("blora-render", valid_json(doc, ensure_ascii=False, separators=(",", ":")))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
