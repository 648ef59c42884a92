"""resize: each module equals the rank-N truncation of its dense ΔW; dynamic rules and energies match dense SVDs."""

from __future__ import annotations

import pytest
import torch
from adapters import block_of, dense_deltas, diffusers_unet_error, make_adapter, metadata_of, relative_error

from blora_tools.adapter.model import open_adapter
from blora_tools.errors import BloraError
from blora_tools.ops.lowrank import RankPlan, RankRule, rank_plan
from blora_tools.ops.resize import resize
from blora_tools.taxonomy.selectors import resolve_selector


def _truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vt = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def _alphas(path) -> set[float]:
    from safetensors.torch import load_file

    return {float(t) for k, t in load_file(str(path)).items() if k.endswith(".alpha")}


CASES = [("sd1", "lora", "kohya"), ("sd1", "locon", "kohya"), ("sd1", "tucker", "kohya"), ("sd1", "loha", "kohya"), ("sd1", "lora", "peft"), ("sdxl", "locon", "kohya")]


@pytest.mark.parametrize("arch, kind, fmt", CASES, ids=["-".join(c) for c in CASES])
def test_resize_is_the_truncated_svd(tmp_path, arch, kind, fmt):
    source = make_adapter(tmp_path / "in.safetensors", arch, kind, rank=6, alpha=3.0, fmt=fmt)
    result = resize(open_adapter(source), RankPlan(3), alpha=1.0, dtype="F32")
    out = result.save(tmp_path / "out.safetensors")
    before, after = dense_deltas(source), dense_deltas(out)
    assert set(after) == set(before)
    for stem, delta in before.items():
        assert relative_error(after[stem], _truncated(delta, 3)) < 1e-4, stem
    assert _alphas(out) == {1.0}
    assert {m.rank for m in open_adapter(out).modules.values()} == {3}
    # the retained share per block is Σ kept σ² / Σ σ², from dense SVDs
    groups = {m.stem: m.group for m in open_adapter(source).modules.values()}
    for group, row in result.summary["blocks"].items():
        stems = [s for s in before if groups[s] == group]
        kept = sum(float((torch.linalg.svdvals(before[s])[:3] ** 2).sum()) for s in stems)
        total = sum(float(before[s].norm() ** 2) for s in stems)
        assert row["retained"] == pytest.approx(kept / total, rel=1e-5)


def test_per_block_ranks_leave_other_blocks_exact(tmp_path):
    source = make_adapter(tmp_path / "in.safetensors", "sd1", "locon", rank=6)
    plan = rank_plan("in0=2,out3=4,mid=0", "sd1", conv=1)
    result = resize(open_adapter(source), plan, text="in0=2,out3=4,mid=0")
    out = result.save(tmp_path / "out.safetensors")
    before, after = dense_deltas(source), dense_deltas(out)
    in0, out3 = resolve_selector("in0", "sd1"), resolve_selector("out3", "sd1")
    modules = open_adapter(source).modules
    assert set(after) == {s for s in before if block_of(s, "sd1") != "M00"}
    for stem, delta in after.items():
        block = block_of(stem, "sd1")
        conv = modules[stem].kind.value == "locon"
        rank = 1 if conv else 2 if block in in0 else 4 if block in out3 else 6
        assert relative_error(delta, _truncated(before[stem], rank)) < 1e-4, stem
    assert len(_alphas(out)) == 1
    meta = metadata_of(out)
    assert meta["ss_network_dim"] == "Dynamic" and "resize" in meta["blora_history"]


@pytest.mark.parametrize("rule", ["sv_fro:0.8", "sv_ratio:3", "sv_cumulative:0.6"])
def test_dynamic_rules_keep_the_fewest_values_that_satisfy_them(tmp_path, rule):
    source = make_adapter(tmp_path / "in.safetensors", "sd1", "lora", rank=8)
    plan = RankPlan(6, rule=RankRule.from_text(rule))
    out = resize(open_adapter(source), plan).save(tmp_path / "out.safetensors")
    method, value = rule.split(":")
    value = float(value)
    before = dense_deltas(source)
    ranks = {m.stem: m.rank for m in open_adapter(out).modules.values()}
    after = dense_deltas(out)
    for stem, delta in before.items():
        s = torch.linalg.svdvals(delta)[:8]
        if method == "sv_fro":
            share = (s**2).cumsum(0).sqrt() / (s**2).sum().sqrt()
            wanted = int((share < value - 1e-9).sum()) + 1
        elif method == "sv_ratio":
            wanted = int((s >= s[0] / value).sum())
        else:
            wanted = int((s.cumsum(0) / s.sum() < value - 1e-9).sum()) + 1
        assert ranks[stem] == min(wanted, 6), stem
        assert relative_error(after[stem], _truncated(delta, ranks[stem])) < 1e-4


def test_resize_needs_a_target_and_refuses_dora(tmp_path):
    source = make_adapter(tmp_path / "in.safetensors", "sd1", "lora")
    with pytest.raises(BloraError, match="needs"):
        resize(open_adapter(source), RankPlan())
    dora = make_adapter(tmp_path / "dora.safetensors", "sd1", "dora")
    with pytest.raises(BloraError, match="DoRA"):
        resize(open_adapter(dora), RankPlan(2))


def test_resized_file_with_mixed_ranks_loads_exactly_in_diffusers(tmp_path):
    # kohya's own per-block files have alphas that differ by module; diffusers mis-scales those. After a
    # resize (one alpha, ranks differing by block) diffusers gives the U-Net the file's exact ΔW.
    source = make_adapter(
        tmp_path / "in.safetensors", "sd1", "lora", rank=8, per_block=None, blocks="unet",
        alpha=lambda l: 2.0 if "to_q" in l.name else 8.0,
    )
    error, effect = diffusers_unet_error(source)
    assert error > 1e-3  # the trap this guards against
    out = resize(open_adapter(source), rank_plan("in0=2,mid=4,out3=6", "sd1")).save(tmp_path / "out.safetensors")
    assert len({m.rank for m in open_adapter(out).modules.values()}) == 4
    error, effect = diffusers_unet_error(out)
    assert effect > 0.05 and error < 1e-5


@pytest.mark.parametrize("plan", [RankPlan(3), RankPlan(rule=RankRule("sv_fro", 0.9))], ids=["fixed", "dynamic"])
def test_write_from_first_pass_maps_equals_a_second_decomposition(tmp_path, monkeypatch, plan):
    """The write reuses the rank-choosing pass's small maps: one Gram pass per module, not two. With no room to
    keep them (a budget of 0) every module is decomposed again. Both write the same bytes."""
    import blora_tools.ops.lowrank as lowrank
    import blora_tools.ops.merge as merge_module

    grams = []
    gram_core = lowrank._gram_core
    monkeypatch.setattr(lowrank, "_gram_core", lambda up, down: grams.append(up.shape) or gram_core(up, down))
    source = make_adapter(tmp_path / "in.safetensors", "sd1", "locon", rank=6, alpha=3.0)
    modules = len(open_adapter(source).modules)
    first = resize(open_adapter(source), plan, alpha=1.0, dtype="F32").save(tmp_path / "kept.safetensors")
    assert len(grams) == modules
    monkeypatch.setattr(merge_module, "_MAPS_BUDGET", 0)
    second = resize(open_adapter(source), plan, alpha=1.0, dtype="F32").save(tmp_path / "again.safetensors")
    assert len(grams) == 3 * modules  # values first, then the whole decomposition
    assert _data(first) == _data(second)
    if plan.rule is None:
        before, after = dense_deltas(source), dense_deltas(first)
        for stem, delta in before.items():
            assert relative_error(after[stem], _truncated(delta, 3)) < 1e-4, stem


def _data(path) -> dict[str, bytes]:
    from safetensors.numpy import load_file

    return {k: v.tobytes() for k, v in load_file(str(path)).items()}
