"""prune: kept modules byte-identical, dropped modules gone with every key, checked against the layer table."""

from __future__ import annotations

import pytest
import torch
from adapters import block_of, dense_deltas, make_adapter, metadata_of, raw_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blora_tools.adapter.model import open_adapter
from blora_tools.errors import AdapterFileError, BloraError
from blora_tools.ops.prune import prune
from blora_tools.taxonomy.selectors import resolve_selector

CASES = [
    ("sd1", "lora", "kohya"),
    ("sd1", "locon", "kohya"),
    ("sd1", "tucker", "kohya"),
    ("sd1", "loha", "kohya"),
    ("sd1", "lokr", "kohya"),
    ("sd1", "full", "kohya"),
    ("sd1", "dora", "kohya"),
    ("sd1", "lora", "peft"),
    ("sdxl", "locon", "kohya"),
    ("sdxl", "lora", "peft"),
]


def _stem_of(key: str, stems: set[str]) -> str:
    return next(s for s in stems if key.startswith(s + "."))


@pytest.mark.parametrize("arch, kind, fmt", CASES, ids=[f"{a}-{k}-{f}" for a, k, f in CASES])
@pytest.mark.parametrize("mode, selector", [("keep", "style"), ("drop", "te,te1,in1,mid"), ("keep", "IN04-OUT05")])
def test_prune_keeps_exactly_the_selected_blocks(tmp_path, arch, kind, fmt, mode, selector):
    if arch == "sd1" and "te1" in selector:
        selector = selector.replace("te,te1", "te")
    elif arch == "sdxl":
        selector = selector.replace("te,te1", "te1")
        if kind == "lora" and selector == "style":
            selector = "style,middle"  # SDXL's outer level has no attention layers
    source = make_adapter(tmp_path / "in.safetensors", arch, kind, fmt=fmt, metadata={"ss_output_name": "x"})
    adapter = open_adapter(source)
    blocks = resolve_selector(selector, arch)
    result = prune(adapter, blocks, keep=mode == "keep", selector=selector)
    out = result.save(tmp_path / "out.safetensors")

    before, after = dense_deltas(source), dense_deltas(out)
    expected = {s for s in before if (block_of(s, arch) in blocks) == (mode == "keep")}
    assert set(after) == expected
    for stem in expected:
        assert torch.equal(after[stem], before[stem])
    # byte identity, and every key of a dropped module is gone (no orphan alpha, dora_scale, …)
    original, written = raw_bytes(source), raw_bytes(out)
    assert all(written[k] == original[k] for k in written)
    removed = set(original) - set(written)
    kept_modules = {m.stem for m in open_adapter(out).modules.values()}
    assert not any(k.startswith(tuple(s + "." for s in kept_modules)) for k in removed)
    meta = metadata_of(out)
    assert meta["ss_output_name"] == "x" and "prune" in meta["blora_history"]
    assert meta["sshs_model_hash"] != metadata_of(source).get("sshs_model_hash")


def test_prune_keeps_alpha_dora_and_mid_keys_with_their_module(tmp_path):
    source = make_adapter(tmp_path / "in.safetensors", "sd1", "tucker")
    out = prune(open_adapter(source), resolve_selector("in1", "sd1"), keep=True).save(tmp_path / "o.safetensors")
    keys = raw_bytes(out)
    assert any(k.endswith(".lora_mid.weight") for k in keys)
    for stem in {k.split(".")[0] for k in keys}:
        assert {f"{stem}.lora_up.weight", f"{stem}.lora_down.weight", f"{stem}.alpha"} <= set(keys)

    dora = make_adapter(tmp_path / "dora.safetensors", "sd1", "dora")
    out = prune(open_adapter(dora), resolve_selector("te", "sd1"), keep=False).save(tmp_path / "d.safetensors")
    keys = raw_bytes(out)
    stems = {k.split(".")[0] for k in keys}
    assert stems and all(f"{s}.dora_scale" in keys and f"{s}.alpha" in keys for s in stems)


def test_prune_to_nothing_is_an_error(tmp_path):
    source = make_adapter(tmp_path / "in.safetensors", "sd1", "lora", blocks="in1,out1")
    with pytest.raises(BloraError, match="leaves no module"):
        prune(open_adapter(source), resolve_selector("style", "sd1"), keep=True, selector="style")
    with pytest.raises(BloraError, match="leaves no module"):
        prune(open_adapter(source), resolve_selector("all", "sd1"), keep=False, selector="all")


def test_attention_only_sdxl_style_names_the_empty_blocks(tmp_path):
    source = make_adapter(tmp_path / "in.safetensors", "sdxl", "lora")
    with pytest.raises(BloraError, match="leaves no module"):
        prune(open_adapter(source), resolve_selector("style", "sdxl"), keep=True, selector="style")
    result = prune(open_adapter(source), resolve_selector("style,mid", "sdxl"), keep=True)
    assert any("in0" in w and "no modules" in w for w in result.warnings)


def test_passthrough_and_unplaced_modules_are_kept(tmp_path):
    extra = {
        "bundle_emb.mytoken.string_to_param.*": torch.randn(2, 32),
        "lora_unet_time_embedding_linear_1.lora_down.weight": torch.randn(2, 32),
        "lora_unet_time_embedding_linear_1.lora_up.weight": torch.randn(128, 2),
        "lora_unet_something_else.lora_down.weight": torch.randn(2, 32),
        "lora_unet_something_else.lora_up.weight": torch.randn(32, 2),
    }
    source = make_adapter(tmp_path / "in.safetensors", "sd1", "lora", extra=extra)
    result = prune(open_adapter(source), resolve_selector("in0", "sd1"), keep=True)
    keys = raw_bytes(result.save(tmp_path / "o.safetensors"))
    assert "bundle_emb.mytoken.string_to_param.*" in keys
    assert "lora_unet_something_else.lora_up.weight" in keys  # unplaced: kept
    assert "lora_unet_time_embedding_linear_1.lora_up.weight" not in keys  # OTHER is a block: not in in0
    assert any("pass through" in w for w in result.warnings)
    assert any("fit no" in w for w in result.warnings)


def test_a_file_of_no_supported_family_is_refused_at_open(tmp_path):
    """Was: opened with architecture `unknown` and refused only by prune. Since issue #12 the architecture comes
    from evidence: a module no supported family has is refused when the file is opened, so no command ever
    works on blocks that mean nothing; a text-encoder module (`te` exists only on SD1/SD2) is SD1 by the rule."""
    from adapters import save

    path = save({"lora_unet_foo.lora_down.weight": torch.randn(2, 4), "lora_unet_foo.lora_up.weight": torch.randn(4, 2)}, tmp_path / "u.safetensors")
    with pytest.raises(AdapterFileError, match="no module fits SD1, SD2, SDXL, Flux.1 or SD3 \\(e.g. lora_unet_foo\\)"):
        open_adapter(path)
    path = save({"lora_te_foo.lora_down.weight": torch.randn(2, 4), "lora_te_foo.lora_up.weight": torch.randn(4, 2)}, tmp_path / "t.safetensors")
    assert open_adapter(path).arch.value == "sd1"


def test_prune_updates_dim_and_alpha(tmp_path):
    source = make_adapter(
        tmp_path / "in.safetensors", "sd1", "lora", rank=lambda l: 8 if l.block == "IN01" else 4,
        metadata={"ss_network_dim": "Dynamic", "ss_network_alpha": "2"},
    )
    out = prune(open_adapter(source), resolve_selector("IN01", "sd1"), keep=False).save(tmp_path / "o.safetensors")
    meta = metadata_of(out)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"


_SELECTORS = ["in0", "in1", "in2", "mid", "out1", "out2", "out3", "te", "IN04-OUT05", "NOT mid", "style", "unet"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=st.sampled_from(_SELECTORS), second=st.sampled_from(_SELECTORS))
def test_prune_twice_equals_prune_of_the_intersection(tmp_path_factory, first, second):
    tmp = tmp_path_factory.mktemp("pp")
    source = make_adapter(tmp / "in.safetensors", "sd1", "locon", per_block=1)
    a, b = resolve_selector(first, "sd1"), resolve_selector(second, "sd1")
    present = {m.block for m in open_adapter(source).modules.values()}
    if not (a & b & present):
        with pytest.raises(BloraError):
            once = prune(open_adapter(source), a, keep=True).save(tmp / "once.safetensors")
            prune(open_adapter(once), b, keep=True)
        return
    once = prune(open_adapter(source), a, keep=True).save(tmp / "once.safetensors")
    twice = prune(open_adapter(once), b, keep=True).save(tmp / "twice.safetensors")
    direct = prune(open_adapter(source), a & b, keep=True).save(tmp / "direct.safetensors")
    assert raw_bytes(twice) == raw_bytes(direct)


# --- what loaders will do with the output ------------------------------------------------------------------


def _mixed_alpha(layer):
    return {"linear": 1.0, "conv1x1": 3.0, "conv3x3": 8.0}[layer.kind]


@pytest.mark.parametrize("kind", ["lora", "locon", "tucker", "loha", "lokr", "dora"])
def test_prune_of_mixed_alphas_warns_and_uniform_alpha_repairs(tmp_path, kind):
    """diffusers mis-scales files whose modules have different alphas: prune says so, like inspect, and
    --uniform-alpha gives the kept modules one alpha with every ΔW unchanged."""
    src = make_adapter(tmp_path / "in.safetensors", "sd1", kind, alpha=lambda l: _mixed_alpha(l) + (l.block == "IN01"))
    blocks = resolve_selector("te", "sd1")
    plain = prune(open_adapter(src), blocks, keep=False)
    mixed = any("different alpha values" in w and "--uniform-alpha" in w for w in plain.warnings)
    assert mixed == (kind not in ("loha", "lokr"))  # diffusers refuses LoHa/LoKr whatever their alphas
    out = tmp_path / "out.safetensors"
    result = prune(open_adapter(src), blocks, keep=False, uniform_alpha=True)
    result.save(out)
    assert not any("different alpha values" in w for w in result.warnings)
    adapter = open_adapter(out)
    assert len({m.alpha for m in adapter.modules.values()}) == 1
    before, after = dense_deltas(src), dense_deltas(out)
    assert set(after) == {s for s in before if not s.startswith("lora_te_")}
    for stem, delta in after.items():
        assert torch.allclose(delta, before[stem], rtol=1e-5, atol=1e-7), stem


def test_uniform_alpha_never_picks_alpha_zero(tmp_path):
    """Issue #12: the most common alpha being 0 made --uniform-alpha divide by zero."""
    from blora_tools.ops.convert import convert

    src = make_adapter(tmp_path / "in.safetensors", "sd1", "locon", alpha=lambda l: 0.0 if l.kind != "conv3x3" else 2.0)
    out = tmp_path / "out.safetensors"
    convert(open_adapter(src), to="kohya", uniform_alpha=True).save(out)
    assert {m.alpha for m in open_adapter(out).modules.values()} == {2.0}
    before, after = dense_deltas(src), dense_deltas(out)
    assert all(torch.allclose(after[s], before[s], atol=1e-7) for s in before)
    zero = make_adapter(tmp_path / "zero.safetensors", "sd1", "lora", alpha=0.0)
    with pytest.raises(BloraError, match="every module has alpha 0"):
        prune(open_adapter(zero), resolve_selector("te", "sd1"), keep=False, uniform_alpha=True)


def test_uniform_alpha_of_a_peft_file_points_to_convert(tmp_path):
    src = make_adapter(tmp_path / "in.safetensors", "sd1", "lora", fmt="peft", alpha=_mixed_alpha)
    with pytest.raises(BloraError, match="convert"):
        prune(open_adapter(src), resolve_selector("te", "sd1"), keep=False, uniform_alpha=True)


def test_pruned_locon_is_not_called_attention_only(tmp_path):
    """inspect named in3/out0 "attention-only" for a LoCon file pruned to attention blocks, which still holds
    their resnet convolutions."""
    from blora_tools.ops.stats import inspect_adapter

    src = make_adapter(tmp_path / "in.safetensors", "sd1", "locon")
    out = tmp_path / "out.safetensors"
    prune(open_adapter(src), resolve_selector("in3,out0", "sd1"), keep=False).save(out)
    assert not any("attention-only" in w for w in inspect_adapter(open_adapter(out), with_stats=False)["warnings"])
    lora = make_adapter(tmp_path / "lora.safetensors", "sd1", "lora")
    assert any("attention-only" in w for w in inspect_adapter(open_adapter(lora), with_stats=False)["warnings"])
