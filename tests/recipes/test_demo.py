"""The built-in demo: trains through the plugin, writes the files it promises, and they hold the right blocks."""

import json
import math

from PIL import Image

from blora_tools.adapter.model import open_adapter
from blora_tools.cli import main
from blora_tools.demo import run_demo


def test_demo_writes_adapters_with_the_promised_blocks(tmp_path):
    result = run_demo(tmp_path, steps=3)
    groups = {name: {m.group for m in open_adapter(path).modules.values()} for name, path in result.files.items()}
    assert groups["style"] == {"in0", "out3"}
    assert groups["character_upper"] == {"in0", "out3"}
    assert groups["character"] == {"te", "in0", "in1", "in2", "mid", "out1", "out2", "out3"}
    assert groups["merged"] == groups["character"]
    style_kinds = {m.kind.value for m in open_adapter(result.files["style"]).modules.values()}
    assert "locon" in style_kinds
    assert set(result.losses) == {"base", "character", "style", "merged"}
    assert all(math.isfinite(v) for row in result.losses.values() for v in row.values())
    # Each adapter changes the model: its loss differs from the base model's.
    assert all(result.losses[name] != result.losses["base"] for name in ("character", "style", "merged"))


def test_demo_cli_refuses_to_overwrite_and_reports_json(runner, tmp_path):
    out = tmp_path / "demo"
    first = runner.invoke(main, ["demo", str(out), "--steps", "2", "--json"], catch_exceptions=False)
    assert first.exit_code == 0, first.stderr
    doc = json.loads(first.stdout)
    assert (out / "report.md").is_file() and set(doc["files"]) == {"character", "style", "character_upper", "merged"}
    # the chart the README shows: matplotlib is a dependency, so a plain install draws it
    with Image.open(out / "blocks.png") as chart:
        assert chart.format == "PNG" and chart.width > 300 and chart.height > 200
        assert len(set(chart.convert("RGB").getdata())) > 3  # bars in more than one colour on white, not blank
    assert "![per-block norms](blocks.png)" in (out / "report.md").read_text(encoding="utf-8")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = runner.invoke(main, ["demo", str(out), "--steps", "2"])
    assert again.exit_code == 1 and "--force" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
