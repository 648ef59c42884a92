"""`compare`: per-block norms, cosine and column-space overlap against dense computations; flags and advice."""

from __future__ import annotations

import json

import pytest
import torch
from adapters import block_of, make_adapter, save
from interop_helpers import deltas
from safetensors.torch import load_file

from blora_tools.adapter.model import open_adapter
from blora_tools.cli import main
from blora_tools.errors import BloraError
from blora_tools.ops.compare import compare
from blora_tools.ops.convert import convert
from blora_tools.taxonomy.blocks import table

BASIS_TOLERANCE = 1e-5


def group_of(stem: str, arch: str) -> str:
    block = block_of(stem, arch)
    return table(arch).group_of(block) if block else "none"


def dense_basis(delta: torch.Tensor) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(delta.double(), full_matrices=False)
    return u[:, : int((s > BASIS_TOLERANCE * s[0]).sum())]


def dense_figures(path_a, path_b, arch: str) -> dict[str, dict]:
    """The compare figures from dense ΔW: flattened, concatenated per group, zeros for missing modules."""
    da, db = deltas(path_a), deltas(path_b)
    groups: dict[str, dict] = {}
    for stem in sorted(set(da) | set(db)):
        g = groups.setdefault(group_of(stem, arch), {"a": [], "b": [], "overlaps": []})
        shape = (da.get(stem) if stem in da else db[stem]).shape
        a = da.get(stem, torch.zeros(shape, dtype=torch.float64))
        b = db.get(stem, torch.zeros(shape, dtype=torch.float64))
        g["a"].append(a.flatten())
        g["b"].append(b.flatten())
        if stem in da and stem in db:
            cosines = torch.linalg.svdvals(dense_basis(a).T @ dense_basis(b))
            g["overlaps"].append(float((cosines**2).mean()))
    figures = {}
    for name, g in groups.items():
        a, b = torch.cat(g["a"]), torch.cat(g["b"])
        has_a, has_b = bool(a.abs().sum()), bool(b.abs().sum())
        figures[name] = {
            "norm_a": float(a.norm()),
            "norm_b": float(b.norm()),
            "cosine": float(a @ b / (a.norm() * b.norm())) if has_a and has_b else None,
            "overlap": sum(g["overlaps"]) / len(g["overlaps"]) if g["overlaps"] else None,
        }
    return figures


def assert_matches_dense(report: dict, path_a, path_b, arch: str) -> None:
    expected = dense_figures(path_a, path_b, arch)
    for group, want in expected.items():
        got = report["blocks"][group]
        for key in ("norm_a", "norm_b"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-9), (group, key)
        for key in ("cosine", "overlap"):
            if want[key] is None:
                assert got[key] is None, (group, key)
            else:
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (group, key)
    empty = set(report["blocks"]) - set(expected)
    assert all(report["blocks"][g]["trained_by"] is None for g in empty)


@pytest.mark.parametrize(
    "arch, kind_a, kind_b",
    [
        ("sd1", "lora", "lora"),
        ("sd1", "lora", "loha"),  # factors against a dense kind
        ("sdxl", "locon", "tucker"),
        ("sd1", "lokr", "full"),  # dense against dense
        ("sd2", "locon", "lora"),
    ],
)
def test_figures_equal_dense_computation(tmp_path, arch, kind_a, kind_b):
    a = make_adapter(tmp_path / "a.safetensors", arch, kind_a, alpha=lambda l: 1.0 if l.kind == "linear" else 3.0)
    b = make_adapter(tmp_path / "b.safetensors", arch, kind_b, blocks="NOT mid", rank=2, seed=7, per_block=3)
    report = compare(open_adapter(a), open_adapter(b))
    assert report["arch"] == arch and report["schema"] == "blora-compare/1"
    assert_matches_dense(report, a, b, arch)
    assert any(f["shared"] for f in report["blocks"].values())


def _scaled_copy(src, dst, factor: float):
    tensors = load_file(str(src))
    for key in tensors:
        if key.endswith("lora_up.weight"):
            tensors[key] = tensors[key] * factor
    return save(tensors, dst)


def test_identical_and_opposed_files(tmp_path):
    char = make_adapter(tmp_path / "char.safetensors", "sd1", "lora", per_block=None)
    style = make_adapter(tmp_path / "style.safetensors", "sd1", "lora", blocks="in0,out3,in1", seed=3, per_block=None)
    same = compare(open_adapter(char), open_adapter(_scaled_copy(char, tmp_path / "twice.safetensors", 2.0)))
    for f in same["blocks"].values():
        if f["trained_by"] == "both":
            assert f["cosine"] == pytest.approx(1.0) and f["overlap"] == pytest.approx(1.0)
            assert f["norm_b"] == pytest.approx(2 * f["norm_a"])
            assert f["status"] == ("aligned" if f["strong_a"] else "shared")
    # A style adapter that undoes the character in in1 and out3 (and adds in0 of its own):
    tensors = load_file(str(style))
    char_tensors = load_file(str(char))
    for key in list(tensors):
        stem = key.split(".")[0]
        if block_of(stem, "sd1") in ("IN04", "IN05", "IN06", "OUT09", "OUT10", "OUT11") and key in char_tensors:
            tensors[key] = -char_tensors[key] if key.endswith("lora_up.weight") else char_tensors[key]
    opposed = save(tensors, tmp_path / "opposed.safetensors")
    report = compare(open_adapter(char), open_adapter(opposed))
    assert_matches_dense(report, char, opposed, "sd1")
    blocks = report["blocks"]
    assert blocks["in1"]["cosine"] == pytest.approx(-1.0) and blocks["in1"]["status"] == "opposed"
    assert blocks["out3"]["status"] == "opposed"
    assert blocks["in0"]["status"] == "shared"  # independent random factors: nearly orthogonal
    assert blocks["mid"]["trained_by"] == "a" and blocks["mid"]["cosine"] is None and blocks["mid"]["overlap"] is None
    assert blocks["out0"]["trained_by"] is None and blocks["out0"]["norm_a"] == 0.0
    advice = report["advice"]
    assert advice["style"] == "b" and advice["style_assumed"] and advice["prune"] == ["in1", "out3"]
    assert "opposed" in advice["reason"]
    flipped = compare(open_adapter(opposed), open_adapter(char))["advice"]
    assert flipped["style"] == "a" and flipped["prune"] == ["in1", "out3"]
    assert compare(open_adapter(char), open_adapter(opposed), style="a")["advice"]["style_file"] == str(char)


def test_kohya_and_peft_forms_of_one_adapter_pair_up(tmp_path):
    kohya = make_adapter(tmp_path / "xl.safetensors", "sdxl", "locon", alpha=lambda l: 2.0 if l.kind == "linear" else 1.0)
    peft_result = convert(open_adapter(kohya), to="kohya", names="diffusers")
    diffusers_names = peft_result.save(tmp_path / "xl-diffusers.safetensors")
    lora = make_adapter(tmp_path / "xl-lora.safetensors", "sdxl", "lora")
    peft = convert(open_adapter(lora), to="peft").save(tmp_path / "xl-peft.safetensors")
    for a, b in ((kohya, diffusers_names), (lora, peft)):
        report = compare(open_adapter(a), open_adapter(b))
        for f in report["blocks"].values():
            if f["trained_by"]:
                assert f["trained_by"] == "both" and f["shared"] == f["modules_a"] == f["modules_b"]
                assert f["cosine"] == pytest.approx(1.0) and f["overlap"] == pytest.approx(1.0)


def test_mismatched_architectures_are_an_error(tmp_path):
    a = make_adapter(tmp_path / "a.safetensors", "sd1", "lora")
    b = make_adapter(tmp_path / "b.safetensors", "sdxl", "lora")
    with pytest.raises(BloraError, match="architectures differ: .* is sd1, .* is sdxl"):
        compare(open_adapter(a), open_adapter(b))


# --- CLI and pictures -------------------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path):
    a = make_adapter(tmp_path / "char [v2].safetensors", "sd1", "locon")
    b = make_adapter(tmp_path / "style.safetensors", "sd1", "locon", blocks="in0,out3,in2", seed=5)
    return a, b


def test_cli_json(runner, pair):
    a, b = pair
    result = runner.invoke(main, ["compare", str(a), str(b), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert {"a", "b", "arch", "blocks", "warnings", "advice"} <= set(doc)
    assert doc["a"] == str(a) and doc["arch"] == "sd1"
    assert list(doc["blocks"]) == ["te", "in0", "in1", "in2", "in3", "mid", "out0", "out1", "out2", "out3"]
    for f in doc["blocks"].values():
        assert {"norm_a", "norm_b", "cosine", "overlap"} <= set(f)
        assert f["overlap"] is None or 0.0 <= f["overlap"] <= 1.0
        assert f["cosine"] is None or -1.0 <= f["cosine"] <= 1.0
    assert doc["blocks"]["mid"]["cosine"] is None and doc["blocks"]["in0"]["cosine"] is not None


def test_cli_table_and_plot(runner, pair, tmp_path):
    pytest.importorskip("matplotlib")
    a, b = pair
    png = tmp_path / "blocks.png"
    result = runner.invoke(main, ["compare", str(a), str(b), "--plot", str(png)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "char [v2].safetensors" in result.stdout and "█" in result.stdout and "advice:" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".blocks.png")]


def test_cli_errors(runner, tmp_path, pair):
    a, _ = pair
    xl = make_adapter(tmp_path / "xl.safetensors", "sdxl", "lora")
    result = runner.invoke(main, ["compare", str(a), str(xl)])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "architectures differ" in result.stderr


def test_plot_blocks(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from blora_tools.cli.plot import plot_blocks

    svg = plot_blocks(tmp_path / "n.svg", {"a": {"in0": 1.0, "out3": 0.5}, "b": {"in0": None, "mid": 2.0}}, "norms")
    assert svg.read_text().lstrip().startswith("<?xml")
    with pytest.raises(BloraError, match="must end in"):
        plot_blocks(tmp_path / "n.jpg", {"a": {"in0": 1.0}}, "t")
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)  # as if matplotlib were missing
    with pytest.raises(BloraError, match=r"pip install 'blora-tools\[plot\]'"):
        plot_blocks(tmp_path / "m.png", {"a": {"in0": 1.0}}, "t")
    assert not (tmp_path / "m.png").exists()
