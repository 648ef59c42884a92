"""`render(request)`, the library call behind `blora-tools render`: what it writes, reports and loads."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from blora_tools.errors import OutputError
from blora_tools.render.args import Axis, LoraArg
from blora_tools.render.run import RenderRequest, render

from render_fixtures import SIZE, STEPS, load_pipe, make_lora, model_dirs  # noqa: F401 - model_dirs is a fixture

REPO = Path(__file__).resolve().parents[2]


def test_render_writes_png_and_map_and_reports_every_step(tmp_path, model_dirs):
    folder = model_dirs("sd1")
    make_lora(tmp_path / "style.safetensors", load_pipe(folder), "sd1", seed=11, every=3)
    calls: list[tuple[str, int]] = []
    advances: list[int] = []

    @contextlib.contextmanager
    def progress(description, total):
        calls.append((description, total))
        yield lambda: advances.append(1)

    notes: list[str] = []
    request = RenderRequest(
        model=folder, output=tmp_path / "out.png", prompt="a cat", steps=STEPS, size=(SIZE, SIZE), device="cpu",
        loras=(LoraArg.from_text(f"s={tmp_path / 'style.safetensors'}"),), grid_x=Axis.from_text("seed:1,2,3"),
        write_json=True,
    )
    result = render(request, on_note=notes.append, progress=progress)
    assert result.written == [tmp_path / "out.png", tmp_path / "out.json"]
    doc = json.loads((tmp_path / "out.json").read_text())
    png = Image.open(tmp_path / "out.png")
    assert json.loads(png.text["blora-render"]) == doc == result.doc
    assert png.size == result.image_size == (doc["image"]["width"], doc["image"]["height"])
    assert [c["settings"]["seed"] for c in doc["cells"]] == [1, 2, 3]
    assert calls == [("rendering 3 cell(s)", 3 * STEPS)] and len(advances) == 3 * STEPS
    assert any(str(folder) in n for n in notes)

    # a second call refuses to replace them, before loading anything
    before = (tmp_path / "out.png").read_bytes()
    with pytest.raises(OutputError, match="--force"):
        render(request)
    assert (tmp_path / "out.png").read_bytes() == before


def test_dry_run_imports_neither_diffusers_nor_transformers(tmp_path, model_dirs):
    make_lora(tmp_path / "style.safetensors", load_pipe(model_dirs("sd1")), "sd1", seed=12, every=3)
    script = (
        "import sys\n"
        "from blora_tools.cli import main\n"
        f"main(['render', '--model', {str(tmp_path / 'absent')!r}, '--lora', {str(tmp_path / 'style.safetensors')!r},"
        f" '--prompt', 'a cat', '--grid-x', 'style@upper|all', '--dry-run', '-o', {str(tmp_path / 'new.png')!r}],"
        " standalone_mode=False)\n"
        "print('loaded:', sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers'}))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "2 cell(s)" in run.stdout and "in0,out3" in run.stdout
    assert "loaded: []" in run.stdout
    assert not (tmp_path / "new.png").exists()
