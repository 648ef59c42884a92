"""merge: concat equals Σ wᵢ·ΔWᵢ on the selected blocks; svd equals the truncated dense SVD of that sum."""

from __future__ import annotations


import pytest
import torch
from adapters import block_of, dense_deltas, diffusers_unet_error, make_adapter, metadata_of, raw_bytes, relative_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blora_tools.adapter.model import open_adapter
from blora_tools.errors import BloraError
from blora_tools.ops.lowrank import RankPlan, rank_plan
from blora_tools.ops.merge import Source, merge
from blora_tools.ops.reweight import reweight
from blora_tools.taxonomy.selectors import resolve_selector
from blora_tools.taxonomy.weights import parse_weights


def _expected(paths, ratios, selectors, arch):
    """Σ ratioᵢ·ΔWᵢ over the modules each input contributes (dense, from the raw files)."""
    total: dict[str, torch.Tensor] = {}
    for path, ratio, selector in zip(paths, ratios, selectors):
        blocks = resolve_selector(selector, arch)
        for stem, delta in dense_deltas(path).items():
            if block_of(stem, arch) in blocks and ratio != 0:
                total[stem] = total.get(stem, 0) + ratio * delta
    return total


def _truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vt = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def _alphas(path) -> set[float]:
    from safetensors.torch import load_file

    return {float(t) for k, t in load_file(str(path)).items() if k.endswith(".alpha")}


CONCAT = [
    ("sd1", "lora", "lora", "kohya"),
    ("sd1", "locon", "lora", "kohya"),
    ("sd1", "tucker", "locon", "kohya"),
    ("sd1", "lora", "lora", "peft"),
    ("sdxl", "locon", "locon", "kohya"),
]


@pytest.mark.parametrize("arch, kind_a, kind_b, fmt", CONCAT, ids=["-".join(c) for c in CONCAT])
def test_concat_is_the_exact_weighted_sum(tmp_path, arch, kind_a, kind_b, fmt):
    style = "in0,out3" if arch == "sd1" else "in0,out2"
    a = make_adapter(tmp_path / "a.safetensors", arch, kind_a, rank=4, alpha=2.0, fmt=fmt, seed=1)
    # (a tiny SDXL file needs a deep attention block, out0, to be told from SD2 by its names)
    b = make_adapter(
        tmp_path / "b.safetensors", arch, kind_b, blocks=f"{style},mid" + (",out0" if arch == "sdxl" else ""), seed=2,
        rank=lambda l: 8 if l.kind != "conv3x3" else 2, alpha=lambda l: 1.0 if "attn" in l.name else None,
    )
    sources = [Source(open_adapter(a), 1.0), Source(open_adapter(b), 0.8, resolve_selector(style, arch), style)]
    result = merge(sources, method="concat")
    out = result.save(tmp_path / "m.safetensors")

    expected = _expected([a, b], [1.0, 0.8], ["all", style], arch)
    got = dense_deltas(out)
    assert set(got) == set(expected)
    for stem in expected:
        assert relative_error(got[stem], expected[stem]) < 1e-5, stem
    # rank = Σ rᵢ, one alpha for the whole file
    ranks = {m.stem: m.rank for m in open_adapter(out).modules.values()}
    inputs = [open_adapter(a).modules, open_adapter(b).modules]
    for stem, rank in ranks.items():
        contributing = [inputs[0].get(stem)] + [inputs[1].get(stem) if block_of(stem, arch) in resolve_selector(style, arch) else None]
        assert rank == sum(m.rank for m in contributing if m is not None)
    assert len(_alphas(out)) == 1
    assert result.summary["alpha"] == max(ranks.values())
    meta = metadata_of(out)
    assert meta["ss_network_alpha"] == f"{max(ranks.values())}" and meta["ss_network_dim"] == "Dynamic"
    assert "lora_adapter_metadata" not in meta


SVD = [
    ("sd1", "lora", "lora", 3),
    ("sd1", "locon", "tucker", 5),
    ("sd1", "loha", "lora", 3),
    ("sd1", "lokr", "lora", 4),
    ("sd1", "full", "lora", 6),
    ("sdxl", "locon", "lora", 2),
]


@pytest.mark.parametrize("arch, kind_a, kind_b, rank", SVD, ids=[f"{a}-{k}-{l}-r{r}" for a, k, l, r in SVD])
def test_svd_equals_the_truncated_dense_svd(tmp_path, arch, kind_a, kind_b, rank):
    a = make_adapter(tmp_path / "a.safetensors", arch, kind_a, rank=4, seed=3)
    b = make_adapter(tmp_path / "b.safetensors", arch, kind_b, rank=6, alpha=3.0, seed=4)
    sources = [Source(open_adapter(a), 0.7), Source(open_adapter(b), -0.4)]
    result = merge(sources, method="svd", plan=RankPlan(rank), alpha=1.0, dtype="F32")
    out = result.save(tmp_path / "m.safetensors")
    expected = _expected([a, b], [0.7, -0.4], ["all", "all"], arch)
    got = dense_deltas(out)
    assert set(got) == set(expected)
    for stem, delta in expected.items():
        assert relative_error(got[stem], _truncated(delta, rank)) < 1e-4, stem
    assert _alphas(out) == {1.0}
    if kind_a in ("loha", "lokr", "full"):
        assert any("made dense" in w for w in result.warnings)


def test_svd_conv_rank_and_per_block_ranks(tmp_path):
    a = make_adapter(tmp_path / "a.safetensors", "sd1", "locon", rank=6)
    plan = rank_plan("unet=4,in0=2,mid=0", "sd1", conv=1)
    out = merge([Source(open_adapter(a))], method="svd", plan=plan).save(tmp_path / "m.safetensors")
    modules = open_adapter(out).modules
    assert not any(m.block == "M00" for m in modules.values())
    for m in modules.values():
        if m.kind.value == "locon":
            assert m.rank == 1
        elif m.group == "in0":
            assert m.rank == 2
        elif m.group == "te":
            assert m.rank == 6  # not named: every rank kept
        else:
            assert m.rank == 4


def test_concat_refuses_loha_and_svd_takes_it(tmp_path):
    a = make_adapter(tmp_path / "a.safetensors", "sd1", "loha")
    with pytest.raises(BloraError, match="--method svd"):
        merge([Source(open_adapter(a))], method="concat")


def test_different_architectures_are_an_error(tmp_path):
    a = make_adapter(tmp_path / "a.safetensors", "sd1", "lora")
    b = make_adapter(tmp_path / "b.safetensors", "sdxl", "lora")
    with pytest.raises(BloraError, match="different architectures"):
        merge([Source(open_adapter(a)), Source(open_adapter(b))])


def test_different_base_models_warn_and_strict_refuses(tmp_path):
    a = make_adapter(tmp_path / "a.safetensors", "sd1", "lora", metadata={"ss_sd_model_hash": "aaaa"})
    b = make_adapter(tmp_path / "b.safetensors", "sd1", "lora", metadata={"ss_sd_model_hash": "bbbb"}, seed=5)
    sources = [Source(open_adapter(a)), Source(open_adapter(b))]
    result = merge(sources)
    assert any("different base models" in w and "bbbb" in w for w in result.warnings)
    with pytest.raises(BloraError, match="different base models"):
        merge(sources, strict=True)


def test_dora_cannot_be_merged(tmp_path):
    a = make_adapter(tmp_path / "a.safetensors", "sd1", "dora")
    with pytest.raises(BloraError, match="DoRA"):
        merge([Source(open_adapter(a))])


def test_merge_with_itself_equals_reweight_by_the_sum(tmp_path):
    a = make_adapter(tmp_path / "a.safetensors", "sd1", "locon", rank=3)
    adapter = open_adapter(a)
    merged = merge([Source(adapter, 0.3), Source(adapter, 0.45)]).save(tmp_path / "m.safetensors")
    scaled = reweight(adapter, parse_weights("all=0.75").resolve("sd1")).save(tmp_path / "r.safetensors")
    got, want = dense_deltas(merged), dense_deltas(scaled)
    assert set(got) == set(want)
    for stem in want:
        assert relative_error(got[stem], want[stem]) < 1e-5


def test_fp16_output_keeps_its_range(tmp_path):
    # a tiny file alpha puts a large gain rank/alpha into the factors: split as √ it stays in fp16 range
    a = make_adapter(tmp_path / "a.safetensors", "sd1", "lora", rank=4, alpha=0.5, dtype=torch.float16)
    b = make_adapter(tmp_path / "b.safetensors", "sd1", "lora", rank=8, alpha=16.0, dtype=torch.float16, seed=9)
    for method, plan in (("concat", None), ("svd", RankPlan(6))):
        out = merge([Source(open_adapter(a)), Source(open_adapter(b), 2.0)], method=method, plan=plan, alpha=2**-10).save(tmp_path / f"{method}.safetensors")
        got = dense_deltas(out)
        expected = _expected([a, b], [1.0, 2.0], ["all", "all"], "sd1")
        for stem, delta in expected.items():
            target = delta if method == "concat" else _truncated(delta, 6)
            assert relative_error(got[stem], target) < 5e-3, (method, stem)
        assert open_adapter(out).dtypes().keys() == {"F16"}


def test_clamp_quantile_bounds_the_factors(tmp_path):
    a = make_adapter(tmp_path / "a.safetensors", "sd1", "lora", rank=8)
    plain = merge([Source(open_adapter(a))], method="svd", plan=RankPlan(8)).save(tmp_path / "p.safetensors")
    clamped = merge([Source(open_adapter(a))], method="svd", plan=RankPlan(8), clamp_quantile=0.9).save(tmp_path / "c.safetensors")
    from safetensors.torch import load_file

    p, c = load_file(str(plain)), load_file(str(clamped))
    for stem in {k.split(".")[0] for k in p}:
        up, down = p[f"{stem}.lora_up.weight"], p[f"{stem}.lora_down.weight"]
        limit = torch.cat([up.flatten(), down.flatten()]).abs().kthvalue(int(0.9 * (up.numel() + down.numel())) + 1).values
        assert float(c[f"{stem}.lora_up.weight"].abs().max()) <= float(limit) + 1e-6
    with pytest.raises(BloraError):
        merge([Source(open_adapter(a))], method="concat", clamp_quantile=0.9)


def test_unplaced_modules_come_only_from_inputs_taken_whole(tmp_path):
    extra = {
        "lora_unet_something_else.lora_down.weight": torch.randn(2, 32),
        "lora_unet_something_else.lora_up.weight": torch.randn(32, 2),
        "bundle_emb.tok.string_to_param.*": torch.randn(2, 32),
    }
    a = make_adapter(tmp_path / "a.safetensors", "sd1", "lora", extra=extra)
    b = make_adapter(tmp_path / "b.safetensors", "sd1", "lora", extra=extra, seed=3)
    whole = merge([Source(open_adapter(a)), Source(open_adapter(b), 1.0, resolve_selector("in0", "sd1"), "in0")])
    keys = raw_bytes(whole.save(tmp_path / "w.safetensors"))
    assert "lora_unet_something_else.lora_up.weight" in keys and "bundle_emb.tok.string_to_param.*" in keys
    assert open_adapter(tmp_path / "w.safetensors").modules["lora_unet_something_else"].rank == 2  # from a only
    assert any("left out" in w for w in whole.warnings)


_RATIO = st.sampled_from([-1.0, -0.3, 0.0, 0.5, 1.0, 1.7])


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(r1=_RATIO, r2=_RATIO, sel=st.sampled_from(["all", "style", "in1,mid", "NOT te"]))
def test_concat_delta_is_the_sum(tmp_path_factory, r1, r2, sel):
    tmp = tmp_path_factory.mktemp("cc")
    a = make_adapter(tmp / "a.safetensors", "sd1", "locon", rank=2, per_block=1, seed=11)
    b = make_adapter(tmp / "b.safetensors", "sd1", "locon", rank=3, per_block=1, seed=12, alpha=None)
    blocks = None if sel == "all" else resolve_selector(sel, "sd1")
    sources = [Source(open_adapter(a), r1), Source(open_adapter(b), r2, blocks, sel)]
    expected = _expected([a, b], [r1, r2], ["all", sel], "sd1")
    if not expected:
        with pytest.raises(BloraError):
            merge(sources)
        return
    got = dense_deltas(merge(sources).save(tmp / "m.safetensors"))
    assert set(got) == set(expected)
    for stem in expected:
        assert relative_error(got[stem], expected[stem]) < 1e-5


def test_character_plus_style_merge_loads_exactly_in_diffusers(tmp_path):
    # modules of rank 4 (character only) and 12 (character + style), from inputs whose alphas differ by module
    character = make_adapter(tmp_path / "c.safetensors", "sd1", "lora", rank=4, alpha=1.0, per_block=None, blocks="unet")
    style = make_adapter(
        tmp_path / "s.safetensors", "sd1", "lora", blocks="style", rank=8, seed=2, per_block=None,
        alpha=lambda l: 2.0 if "to_q" in l.name else 8.0,
    )
    sources = [Source(open_adapter(character)), Source(open_adapter(style), 0.8, resolve_selector("style", "sd1"), "style")]
    for method, plan in (("concat", None), ("svd", rank_plan("unet=4,style=6", "sd1"))):
        out = merge(sources, method=method, plan=plan).save(tmp_path / f"{method}.safetensors")
        assert len({m.rank for m in open_adapter(out).modules.values()}) == 2
        error, effect = diffusers_unet_error(out)
        assert effect > 0.05 and error < 1e-5, method


def test_concat_copies_modules_it_would_not_change(tmp_path):
    # character-only modules at ratio 1 whose alpha is the file's alpha keep their bytes
    a = make_adapter(tmp_path / "a.safetensors", "sd1", "lora", rank=4, alpha=8.0)
    b = make_adapter(tmp_path / "b.safetensors", "sd1", "lora", blocks="style", rank=4, alpha=8.0, seed=5)
    out = merge([Source(open_adapter(a)), Source(open_adapter(b), 0.5)], alpha=8.0).save(tmp_path / "m.safetensors")
    original, written = raw_bytes(a), raw_bytes(out)
    style = resolve_selector("style", "sd1")
    for key, data in original.items():
        if block_of(key.split(".")[0], "sd1") not in style:
            assert written[key] == data, key
    expected = _expected([a, b], [1.0, 0.5], ["all", "all"], "sd1")
    got = dense_deltas(out)
    for stem in expected:
        assert relative_error(got[stem], expected[stem]) < 1e-5


# --- one layer, two names ----------------------------------------------------------------------------------


def _sdxl_pair(tmp_path):
    """An SDXL file with kohya's LDM names and its copy with diffusers-style names (same ΔW per layer)."""
    from blora_tools.ops.convert import convert

    ldm = make_adapter(tmp_path / "ldm.safetensors", "sdxl", "locon", per_block=None)
    diffusers = tmp_path / "diffusers.safetensors"
    convert(open_adapter(ldm), to="kohya", names="diffusers").save(diffusers)
    return ldm, diffusers


@pytest.mark.parametrize("method", ["concat", "svd"])
def test_ldm_and_diffusers_names_of_one_layer_merge_into_one_module(tmp_path, method):
    """x merged with −x (its diffusers-named copy) cancels: one module per layer, ΔW ≈ 0, first input's names."""
    ldm, diffusers = _sdxl_pair(tmp_path)
    layers = len(open_adapter(ldm).modules)
    out = tmp_path / "zero.safetensors"
    result = merge([Source(open_adapter(ldm)), Source(open_adapter(diffusers), ratio=-1.0)], method=method)
    result.save(out)
    merged = open_adapter(out)
    assert len(merged.modules) == layers == result.summary["modules"]
    assert set(merged.modules) == set(open_adapter(ldm).modules)  # the first input's (LDM) names
    before = dense_deltas(ldm)
    for stem, delta in dense_deltas(out).items():
        assert float(delta.norm()) <= 1e-5 * float(before[stem].norm()), stem


def test_merge_names_follow_the_first_input_or_names(tmp_path):
    ldm, diffusers = _sdxl_pair(tmp_path)
    merge([Source(open_adapter(diffusers)), Source(open_adapter(ldm))]).save(tmp_path / "d.safetensors")
    assert set(open_adapter(tmp_path / "d.safetensors").modules) == set(open_adapter(diffusers).modules)
    forced = merge([Source(open_adapter(diffusers)), Source(open_adapter(ldm))], names="ldm")
    forced.save(tmp_path / "l.safetensors")
    assert set(open_adapter(tmp_path / "l.safetensors").modules) == set(open_adapter(ldm).modules)
    want = {s: 2 * d for s, d in dense_deltas(ldm).items()}
    got = dense_deltas(tmp_path / "l.safetensors")
    assert max(relative_error(got[s], want[s]) for s in want) < 1e-6
    with pytest.raises(BloraError, match="unknown naming"):
        merge([Source(open_adapter(ldm))], names="sgm")


def test_one_file_naming_one_layer_twice_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    ldm, diffusers = _sdxl_pair(tmp_path)
    both = tmp_path / "both.safetensors"
    save_file({**load_file(str(ldm)), **load_file(str(diffusers))}, str(both))
    with pytest.raises(BloraError, match="adapt the same layer"):
        merge([Source(open_adapter(both))])


def test_merge_warns_what_sd_scripts_skips(tmp_path):
    """A diffusers-named SDXL output is skipped by sd-scripts (its SDXL U-Net has LDM names): say so."""
    ldm, diffusers = _sdxl_pair(tmp_path)
    result = merge([Source(open_adapter(diffusers))], method="concat")
    assert any("diffusers-style names" in w and "sd-scripts" in w for w in result.warnings)
    assert not any("sd-scripts" in w for w in merge([Source(open_adapter(ldm))]).warnings)
