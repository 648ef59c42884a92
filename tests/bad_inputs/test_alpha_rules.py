"""Alpha rules (issue #12): fold with the alpha as stored, refuse alphas a dtype cannot hold, alpha 0 is ambiguous,
and extreme stored alphas (F64 1e300, 1e-300) give one clean line or a finite file in every command.

Oracle: `adapters.dense_deltas` reads the written file with safetensors and its own arithmetic (alpha as stored).
"""

from __future__ import annotations

import pytest
import torch
from adapters import dense_deltas, make_adapter, metadata_of, relative_error
from battery import READERS, error_line, invoke, reading_args, require, snapshot
from safetensors.torch import load_file, save_file

from blora_tools.adapter.model import open_adapter
from blora_tools.errors import BloraError
from blora_tools.ops.convert import convert
from blora_tools.ops.lowrank import RankPlan
from blora_tools.ops.merge import Source, merge
from blora_tools.ops.prune import prune
from blora_tools.ops.stats import inspect_adapter
from blora_tools.taxonomy.selectors import resolve_selector


def _with_alpha(path, value: float, dtype: torch.dtype, count: int = 1):
    """Rewrite the first `count` modules' alphas of `path` as `value` stored in `dtype`."""
    tensors = load_file(str(path))
    stems = sorted(k[: -len(".alpha")] for k in tensors if k.endswith(".alpha"))[:count]
    for stem in stems:
        tensors[f"{stem}.alpha"] = torch.tensor(value, dtype=dtype)
    save_file(tensors, str(path))
    return stems


@pytest.mark.parametrize("method", ["concat", "svd"])
def test_merge_folds_with_the_alpha_it_stores(tmp_path, method):
    # 1e-45 is subnormal in F32 and reads back as 1.4e-45: folding with 1e-45 made ΔW 40 % too strong.
    path = make_adapter(tmp_path / "a.safetensors", "sd1", "lora", rank=4, alpha=2.0, per_block=1)
    plan = RankPlan(4) if method == "svd" else None
    out = merge([Source(open_adapter(path))], method=method, plan=plan, alpha=1e-45, dtype="F32")
    out = out.save(tmp_path / "m.safetensors")
    alphas = {float(v) for k, v in load_file(str(out)).items() if k.endswith(".alpha")}
    assert alphas == {float(torch.tensor(1e-45, dtype=torch.float32))} and alphas != {1e-45}
    want, got = dense_deltas(path), dense_deltas(out)
    assert set(want) == set(got)
    assert max(relative_error(got[s], want[s]) for s in want) < 1e-4


@pytest.mark.parametrize(
    "alpha, dtype, says",
    [(1e300, "F32", "cannot be stored as F32 "), (1e-50, "F32", "cannot be stored as F32 "),
     (1e300, "F16", "cannot be stored as F16 or F32"), (0.0, "F16", "positive")],
)
def test_merge_refuses_an_alpha_its_dtype_cannot_hold(tmp_path, alpha, dtype, says):
    path = make_adapter(tmp_path / "a.safetensors", "sd1", "lora", per_block=1)
    with pytest.raises(BloraError, match=says):
        merge([Source(open_adapter(path))], alpha=alpha, dtype=dtype)


def test_an_fp16_file_keeps_an_alpha_fp16_cannot_hold_exactly_in_f32(tmp_path):
    path = make_adapter(tmp_path / "a.safetensors", "sd1", "lora", dtype=torch.float16, per_block=1)
    out = merge([Source(open_adapter(path))], alpha=1e5).save(tmp_path / "m.safetensors")  # F16 max is 65504
    alphas = [v for k, v in load_file(str(out)).items() if k.endswith(".alpha")]
    assert {a.dtype for a in alphas} == {torch.float32} and {float(a) for a in alphas} == {1e5}
    want, got = dense_deltas(path), dense_deltas(out)
    assert max(relative_error(got[s], want[s]) for s in want) < 2e-3  # fp16 factors


def test_stored_alpha_zero_is_read_as_scale_zero_with_a_warning_and_never_written(tmp_path):
    path = make_adapter(tmp_path / "a.safetensors", "sd1", "lora", per_block=1)
    (stem,) = _with_alpha(path, 0.0, torch.float32)
    adapter = open_adapter(path)
    assert any("store alpha 0" in w and stem in w for w in inspect_adapter(adapter, with_stats=False)["warnings"])
    results = {
        "concat": merge([Source(adapter)]),
        "svd": merge([Source(adapter)], method="svd"),  # lossless: every rank kept
        "uniform": convert(adapter, to="kohya", uniform_alpha=True),
        "peft": convert(adapter, to="peft"),
        "prune": prune(adapter, resolve_selector("out3", "sd1"), keep=False),  # keeps the te module
    }
    want = dense_deltas(path)
    assert float(want[stem].abs().max()) == 0.0  # the oracle reads alpha 0 as A1111 does
    for name, result in results.items():
        assert any("store alpha 0" in w and "A1111 and ComfyUI" in w for w in result.warnings), name
        out = result.save(tmp_path / f"{name}.safetensors")
        tensors = load_file(str(out))
        if name != "prune":  # prune copies every kept tensor byte for byte
            assert all(float(v) > 0 for k, v in tensors.items() if k.endswith(".alpha")), name
        got = dense_deltas(out)
        assert max(relative_error(got[s], want[s]) for s in want if s in got and s != stem) < 1e-4, name


EXTREMES = [(1e300, torch.float64), (1e-300, torch.float64), (6e4, torch.float16)]


@pytest.mark.parametrize("value, dtype", EXTREMES, ids=["f64-1e300", "f64-1e-300", "f16-6e4"])
@pytest.mark.parametrize("command", READERS)
def test_extreme_stored_alphas_give_one_line_or_a_finite_file(tmp_path, runner, command, value, dtype):
    require(command)
    good = make_adapter(tmp_path / "good.safetensors", "sd1", "lora", rank=2, per_block=1, seed=3)
    path = make_adapter(tmp_path / "x.safetensors", "sd1", "lora", rank=2, per_block=1)
    _with_alpha(path, value, dtype, count=3)
    out = tmp_path / "out.safetensors"
    before = snapshot(tmp_path)
    variants = [reading_args(command, path, good, out)]
    if command == "merge":
        variants.append(["merge", str(path), "--method", "svd", "--rank", "2", "-o", str(out)])
    if command == "convert":
        variants.append(["convert", str(path), "--to", "kohya", "--uniform-alpha", "-o", str(out)])
    for args in variants:
        result = invoke(runner, args)
        assert "Traceback" not in result.stderr, result.stderr
        if result.exit_code != 0:
            error_line(result)
            assert snapshot(tmp_path) == before, "a refused command left a file"
        elif out.exists():
            tensors = load_file(str(out))
            assert all(bool(t.isfinite().all()) for t in tensors.values()), args
            assert "blora_spec" in metadata_of(out)
            out.unlink()
