"""The built-in demo: trains through the plugin, writes the files it promises, and they hold the right blocks;
each adapter fits its own image set best, and every sentence the demo prints about its numbers is true of them."""

import json
import math
import re

import pytest
from click.testing import CliRunner
from PIL import Image

from blora_tools.adapter.model import open_adapter
from blora_tools.cli import main
from blora_tools.demo import findings

ALL_SD1_GROUPS = {"te", "in0", "in1", "in2", "in3", "mid", "out0", "out1", "out2", "out3"}
MODELS = {"the base model": "base", "the character adapter": "character", "the style adapter": "style",
          "the merged file": "merged"}
CLAIM = re.compile(r"on the (\w+) set, (.+) has a lower loss than (.+) \((\d+\.\d{4}) vs (\d+\.\d{4})\)")


def test_findings_follow_the_numbers_whichever_way_they_go():
    losses = {"base": {"character": 1.0, "style": 1.0}, "character": {"character": 0.2, "style": 0.5},
              "style": {"character": 0.4, "style": 0.3}, "merged": {"character": 0.3, "style": 0.3}}
    texts = [f.text for f in findings(losses)]
    assert "on the character set, the character adapter has a lower loss than the style adapter (0.2000 vs 0.4000)" in texts
    assert "on the style set, the style adapter has a lower loss than the character adapter (0.3000 vs 0.5000)" in texts
    # merged vs style on the style set is a tie, also when only the printed digits agree: no sentence about it
    losses["merged"]["style"] = 0.30001
    assert not any("style set" in t and "merged" in t and "style adapter" in t for t in (f.text for f in findings(losses)))
    losses["character"]["character"] = 0.45  # now the style adapter fits the character set better
    swapped = [f.text for f in findings(losses)]
    assert "on the character set, the style adapter has a lower loss than the character adapter (0.4000 vs 0.4500)" in swapped
    assert not any("the character adapter has a lower loss than the style adapter" in t and "character set" in t for t in swapped)


@pytest.fixture(scope="module")
def default_demo(tmp_path_factory):
    """`blora-tools demo DIR --json` with the demo's own steps and seeds (what a newcomer runs), once."""
    out = tmp_path_factory.mktemp("demo") / "blora-demo"
    result = CliRunner().invoke(main, ["demo", str(out), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return out, json.loads(result.stdout)


def test_demo_writes_adapters_with_the_promised_blocks(default_demo):
    _, doc = default_demo
    files = {name: open_adapter(path) for name, path in doc["files"].items()}
    groups = {name: {m.group for m in adapter.modules.values()} for name, adapter in files.items()}
    assert groups["style"] == {"in0", "out3"}
    assert groups["character_upper"] == {"in0", "out3"}
    assert groups["character"] == ALL_SD1_GROUPS  # LoCon: in3 and out0 (no attention) get their convolutions
    assert groups["merged"] == groups["character"]
    for name in ("character", "style"):
        assert "locon" in {m.kind.value for m in files[name].modules.values()}
    losses = doc["losses"]
    assert set(losses) == {"base", "character", "style", "merged"}
    assert all(math.isfinite(v) for row in losses.values() for v in row.values())


def test_each_adapter_has_the_lowest_loss_on_its_own_set(default_demo):
    _, doc = default_demo
    losses = doc["losses"]
    assert losses["character"]["character"] < losses["style"]["character"]
    assert losses["style"]["style"] < losses["character"]["style"]
    assert all(losses[m][s] < losses["base"][s] for m in ("character", "style", "merged") for s in ("character", "style"))


def _report_table(text: str) -> dict[str, dict[str, float]]:
    rows = re.findall(r"^\| (base|character|style|merged) \| (\d+\.\d{4}) \| (\d+\.\d{4}) \|$", text, re.M)
    return {name: {"character": float(a), "style": float(b)} for name, a, b in rows}


def _report_claims(text: str) -> list[str]:
    return [line[2:] for line in text.splitlines() if line.startswith("- on the ")]


def _assert_backed(claims: list[str], table: dict[str, dict[str, float]]) -> None:
    """Each claim names two models and a set, lower first, with their losses as the table gives them."""
    assert set(table) == {"base", "character", "style", "merged"} and claims
    for claim in claims:
        data, lower, higher, low, high = CLAIM.fullmatch(claim).groups()
        assert (table[MODELS[lower]][data], table[MODELS[higher]][data]) == (float(low), float(high)), claim
        assert float(low) < float(high), claim


def test_every_claim_in_the_report_is_backed_by_its_table(default_demo):
    out, doc = default_demo
    report = (out / "report.md").read_text(encoding="utf-8")
    table = _report_table(report)
    assert all(abs(table[m][s] - doc["losses"][m][s]) <= 5e-5 for m in table for s in ("character", "style"))
    claims = _report_claims(report)
    assert claims == doc["findings"] and len(claims) >= 4
    _assert_backed(claims, table)
    # what a newcomer looks for first: each adapter wins on its own set, and the demo says so
    assert "on the character set, the character adapter has a lower loss than the style adapter" in report
    assert "on the style set, the style adapter has a lower loss than the character adapter" in report


def test_demo_draws_the_block_chart(default_demo):
    out, doc = default_demo
    assert doc["chart"] == str(out / "blocks.png")
    with Image.open(out / "blocks.png") as chart:
        assert chart.format == "PNG" and chart.width > 300 and chart.height > 200
        assert len(set(chart.convert("RGB").getdata())) > 3  # bars in more than one colour on white, not blank
    assert "![per-block norms](blocks.png)" in (out / "report.md").read_text(encoding="utf-8")


def test_demo_refuses_to_overwrite_without_force(default_demo):
    out, _ = default_demo
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = CliRunner().invoke(main, ["demo", str(out), "--steps", "2"])
    assert again.exit_code == 1 and "--force" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_demo_prints_only_claims_its_numbers_back(runner, tmp_path):
    out = tmp_path / "demo"
    shown = runner.invoke(main, ["demo", str(out), "--steps", "2"], catch_exceptions=False)
    assert shown.exit_code == 0, shown.stderr
    printed = [line.strip() for line in shown.stdout.splitlines() if line.strip().startswith("on the ")]
    report = (out / "report.md").read_text(encoding="utf-8")
    assert printed == _report_claims(report)
    _assert_backed(printed, _report_table(report))
    assert re.search(r"chart\s+\S*blocks\.png", shown.stdout) and (out / "blocks.png").is_file()
