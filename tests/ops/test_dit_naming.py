"""Flux.1 / SD3 naming conversions: fused BFL ↔ split diffusers, exact, in convert, merge and compare.

Expected ΔW comes from `tests/dit_delta.py` (its own key parsing and BFL ↔ diffusers table), from diffusers'
own kohya → diffusers converter at the real width, and from PEFT loading our output into a diffusers model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_adapters import TINY, make_dit_adapter  # noqa: E402
from dit_delta import assert_same_deltas, fused_deltas  # noqa: E402

from blora_tools.adapter.kinds import Kind, delta_weight  # noqa: E402
from blora_tools.cli import main  # noqa: E402
from blora_tools.adapter.model import open_adapter  # noqa: E402
from blora_tools.errors import BloraError  # noqa: E402
from blora_tools.ops.compare import compare  # noqa: E402
from blora_tools.ops.convert import convert  # noqa: E402
from blora_tools.ops.dit_naming import compact_columns, in_naming, select_rows, stack_rows  # noqa: E402
from blora_tools.ops.lowrank import RankPlan  # noqa: E402
from blora_tools.ops.merge import Source, merge  # noqa: E402
from blora_tools.taxonomy.arch import Arch  # noqa: E402
from blora_tools.taxonomy.dit import BFL, DIFFUSERS, FLUX_RECORD  # noqa: E402
from blora_tools.taxonomy.selectors import resolve_selector  # noqa: E402

W = {"flux": TINY["flux"].width, "sd3": TINY["sd3"].width}
SOURCES = [(a, d) for a in ("flux", "sd3") for d in ("kohya", "diffusers", "comfyui", "onetrainer", "xlabs")
           if not (a == "sd3" and d == "xlabs")]
NATIVE = {"kohya": "kohya", "diffusers": "peft", "comfyui": "comfyui"}


def _open(path, arch):
    return open_adapter(path, Arch(arch))


def _convert(path, arch, to, out, **kw):
    convert(_open(path, arch), to=to, **kw).save(out)
    return out


@pytest.mark.parametrize("arch,dialect", SOURCES)
@pytest.mark.parametrize("to", ["kohya", "peft", "comfyui"])
def test_every_dialect_pair_keeps_delta_per_fused_weight(tmp_path, arch, dialect, to):
    src = make_dit_adapter(tmp_path / "in.safetensors", arch, dialect, alpha=None if dialect == "xlabs" else 0.5)
    if NATIVE.get(dialect) == to:
        with pytest.raises(BloraError, match="nothing to convert"):
            convert(_open(src, arch), to=to)
        return
    out = _convert(src, arch, to, tmp_path / "out.safetensors")
    assert_same_deltas(fused_deltas(src, arch), fused_deltas(out, arch))
    back = _convert(out, arch, "kohya" if to != "kohya" else "peft", tmp_path / "back.safetensors")
    assert_same_deltas(fused_deltas(src, arch), fused_deltas(back, arch))


def test_fused_to_split_copies_down_and_slices_up_rows_keeping_alpha(tmp_path):
    src = make_dit_adapter(tmp_path / "k.safetensors", "flux", "kohya", blocks={"S00"}, rank=3, alpha=1.5)
    view = in_naming(_open(src, "flux"), DIFFUSERS, compact=True)  # rank 3 divides 3 parts: no proof, no chunks
    raw = load_file(src)
    up = raw["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    down = raw["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    w = W["flux"]
    for part, (a, b) in {"attn_to_q": (0, w), "attn_to_k": (w, 2 * w), "attn_to_v": (2 * w, 3 * w),
                         "proj_mlp": (3 * w, 7 * w)}.items():
        m = view.modules[f"lora_unet_single_transformer_blocks_0_{part}"]
        t = view.tensors(m)
        assert torch.equal(t["lora_down.weight"], down) and torch.equal(t["lora_up.weight"], up[a:b])
        assert m.rank == 3 and m.alpha == 1.5


def test_split_to_fused_is_block_diagonal_with_alpha_the_new_rank(tmp_path):
    src = make_dit_adapter(tmp_path / "d.safetensors", "flux", "onetrainer", blocks={"D00"}, rank=2, alpha=4.0)
    out = _convert(src, "flux", "kohya", tmp_path / "k.safetensors")
    t = load_file(out)
    up = t["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert up.shape == (3 * W["flux"], 6) and float(t["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 6.0
    raw = load_file(src)
    for i, p in enumerate("qkv"):
        block = up[i * W["flux"] : (i + 1) * W["flux"]]
        torch.testing.assert_close(block[:, 2 * i : 2 * i + 2], raw[f"lora_transformer_transformer_blocks_0_attn_to_{p}.lora_up.weight"] * 2.0)
        assert not block[:, [c for c in range(6) if c // 2 != i]].any()
    # a 1:1 layer keeps its alpha (kohya #2204 is the stacked layers keeping theirs)
    assert float(t["lora_unet_double_blocks_0_img_attn_proj.alpha"]) == 4.0


def test_compact_round_trip_restores_the_same_factors(tmp_path):
    src = make_dit_adapter(tmp_path / "d.safetensors", "flux", "diffusers", blocks={"D00", "S01"}, alpha=None)
    fused = _convert(src, "flux", "kohya", tmp_path / "k.safetensors")
    split = _convert(fused, "flux", "peft", tmp_path / "p.safetensors", compact=True)
    again = _convert(split, "flux", "kohya", tmp_path / "k2.safetensors")
    a, b = load_file(fused), load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_file(split).keys() == load_file(src).keys()  # each part back at rank 2
    loose = _convert(fused, "flux", "peft", tmp_path / "loose.safetensors", compact=False)
    assert load_file(loose)["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape[0] == 6
    assert_same_deltas(fused_deltas(loose, "flux"), fused_deltas(src, "flux"))


def test_compact_needs_the_zero_proof_not_rank_divisibility():
    up = torch.randn(12, 6)
    assert compact_columns(up, [(0, 4), (4, 8), (8, 12)]) is None  # rank 6 = 3·2, yet not block-diagonal (mflux)
    up[4:, :2] = 0
    up[:4, 2:] = 0
    up[8:, 2:4] = 0
    up[4:8, 4:] = 0
    assert compact_columns(up, [(0, 4), (4, 8), (8, 12)]) == [[0, 1], [2, 3], [4, 5]]
    up[4:8, 4:] = 0
    up[:, 2:4] = 0
    assert compact_columns(up, [(0, 4), (4, 8), (8, 12)]) == [[0, 1], [], [4, 5]]


def test_missing_parts_are_zero_rows(tmp_path):
    src = make_dit_adapter(tmp_path / "d.safetensors", "flux", "diffusers", blocks={"D00"}, alpha=None)
    keep = {k: v for k, v in load_file(src).items() if "attn.to_k." not in k and "proj_mlp" not in k}
    save_file(keep, tmp_path / "qv.safetensors")
    out = _convert(tmp_path / "qv.safetensors", "flux", "kohya", tmp_path / "k.safetensors")
    up = load_file(out)["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    w = W["flux"]
    assert up.shape == (3 * w, 4) and not up[w : 2 * w].any()
    assert_same_deltas(fused_deltas(tmp_path / "qv.safetensors", "flux"), fused_deltas(out, "flux"))


def test_xlabs_single_qkv_becomes_linear1_with_zero_mlp_rows_or_three_parts(tmp_path):
    src = make_dit_adapter(tmp_path / "x.safetensors", "flux", "xlabs", blocks={"S00"})
    kohya = load_file(_convert(src, "flux", "kohya", tmp_path / "k.safetensors"))
    up = kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    w = W["flux"]
    assert up.shape == (7 * w, 2) and not up[3 * w :].any()
    assert float(kohya["lora_unet_single_blocks_0_linear1.alpha"]) == 2.0  # XLabs: no alpha, scale 1
    peft = load_file(_convert(src, "flux", "peft", tmp_path / "p.safetensors"))
    assert not any("proj_mlp" in k for k in peft) and "transformer.single_transformer_blocks.0.attn.to_v.lora_B.weight" in peft


def test_sd3_last_block_context_modulation_swaps_shift_and_scale(tmp_path):
    src = make_dit_adapter(tmp_path / "k.safetensors", "sd3", "kohya", rank=2)
    raw = load_file(src)
    w = W["sd3"]
    raw["lora_unet_joint_blocks_0_context_block_adaLN_modulation_1.lora_up.weight"] = torch.randn(6 * w, 2)  # not pre-only
    save_file(raw, src)
    peft = load_file(_convert(src, "sd3", "peft", tmp_path / "p.safetensors"))
    last = raw["lora_unet_joint_blocks_2_context_block_adaLN_modulation_1.lora_up.weight"] * 0.5  # alpha 1 / rank 2
    got = peft["transformer.transformer_blocks.2.norm1_context.linear.lora_B.weight"]
    torch.testing.assert_close(got, torch.cat([last[w:], last[:w]]))
    first = raw["lora_unet_joint_blocks_0_context_block_adaLN_modulation_1.lora_up.weight"] * 0.5
    torch.testing.assert_close(peft["transformer.transformer_blocks.0.norm1_context.linear.lora_B.weight"], first)
    final = raw["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"] * 0.5
    torch.testing.assert_close(peft["transformer.norm_out.linear.lora_B.weight"], torch.cat([final[w:], final[:w]]))


def test_peft_output_alpha_is_rank_in_metadata_and_roots_per_pipeline(tmp_path):
    src = make_dit_adapter(tmp_path / "k.safetensors", "flux", "kohya", blocks={"D00"}, alpha=3.0)
    out = _convert(src, "flux", "peft", tmp_path / "p.safetensors")
    with safe_open(str(out), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
        assert all(k.startswith("transformer.") for k in f.keys())
    assert config["transformer.lora_alpha"] == config["transformer.r"] == 2
    assert not config["transformer.alpha_pattern"] and not config["transformer.rank_pattern"]


def test_rows_not_divisible_by_the_layer_units_are_refused_in_one_line(tmp_path, runner):
    bad = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, 64),
           "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(190, 2)}
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(BloraError, match="190 rows, not a multiple of the 3 parts"):
        convert(_open(tmp_path / "bad.safetensors", "flux"), to="peft")
    result = runner.invoke(main, ["convert", str(tmp_path / "bad.safetensors"), "--to", "peft", "--arch", "flux",
                                  "-o", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "bad.safetensors" in result.output and "190 rows" in result.output
    assert not (tmp_path / "o.safetensors").exists()


def _lycoris(kind: str, rows: int, fan_in: int, gen) -> dict[str, torch.Tensor]:
    if kind == "loha":
        return {"hada_w1_a": torch.randn(rows, 2, generator=gen), "hada_w1_b": torch.randn(2, fan_in, generator=gen),
                "hada_w2_a": torch.randn(rows, 2, generator=gen), "hada_w2_b": torch.randn(2, fan_in, generator=gen)}
    if kind == "full":
        return {"diff": torch.randn(rows, fan_in, generator=gen), "diff_b": torch.randn(rows, generator=gen)}
    return {"lokr_w1": torch.randn(2, 2, generator=gen), "lokr_w2": torch.randn(rows // 2, fan_in // 2, generator=gen)}


@pytest.mark.parametrize("kind", ["loha", "full", "lokr"])
def test_lycoris_kinds_split_by_rows_where_exact(kind):
    gen = torch.Generator().manual_seed(0)
    t = _lycoris(kind, 12, 4, gen)
    k = {"loha": Kind.LOHA, "full": Kind.FULL, "lokr": Kind.LOKR}[kind]
    whole = delta_weight(k, t, 1.0, (12, 4))
    if kind == "lokr":  # rows come in blocks of 6 (W2's rows): a third of 12 is not one
        with pytest.raises(BloraError, match="blocks of 6"):
            select_rows(k, t, 12, [(4, 4)], "m")
        half = select_rows(k, t, 12, [(6, 6), (0, 6)], "m")
        torch.testing.assert_close(delta_weight(k, half, 1.0, (12, 4)), torch.cat([whole[6:], whole[:6]]))
        return
    parts = [select_rows(k, t, 12, [(a, 4)], "m") for a in (0, 4, 8)]
    for a, p in zip((0, 4, 8), parts):
        torch.testing.assert_close(delta_weight(k, p, 1.0, (4, 4)), whole[a : a + 4])
    stacked, rank = stack_rows([(k, p, 1.0, a, (0, 4)) for a, p in zip((0, 4, 8), parts) if a != 4], 12, "m")
    expected = whole.clone()
    expected[4:8] = 0
    assert rank == (None if kind == "full" else 4)  # stacked LoHa: rank 2 + 2, alpha = that rank, scale 1
    torch.testing.assert_close(delta_weight(k, stacked, 1.0, (12, 4)), expected)


def test_lokr_qkv_to_peft_is_refused_by_name(tmp_path):
    gen = torch.Generator().manual_seed(0)
    w = W["flux"]
    t = {f"lora_unet_double_blocks_0_img_attn_qkv.{p}": v for p, v in _lycoris("lokr", 3 * w, w, gen).items()}
    save_file(t, tmp_path / "lokr.safetensors")
    with pytest.raises(BloraError, match="lora_unet_double_blocks_0_img_attn_qkv"):
        in_naming(_open(tmp_path / "lokr.safetensors", "flux"), DIFFUSERS)


@pytest.mark.parametrize("method", ["concat", "svd"])
def test_kohya_and_diffusers_files_merge_per_fused_weight(tmp_path, method):
    a = make_dit_adapter(tmp_path / "a.safetensors", "flux", "kohya", seed=1, alpha=1.0)
    b = make_dit_adapter(tmp_path / "b.safetensors", "flux", "diffusers", seed=2, alpha=None)
    result = merge([Source(_open(a, "flux"), 1.0), Source(_open(b, "flux"), 0.5)], method=method,
                   plan=RankPlan() if method == "svd" else None, dtype="F32")
    result.save(tmp_path / "m.safetensors")
    da, db = fused_deltas(a, "flux"), fused_deltas(b, "flux")
    got = fused_deltas(tmp_path / "m.safetensors", "flux")
    assert_same_deltas({k: da[k] + 0.5 * db[k] for k in da}, got, atol=1e-4)
    keys = load_file(tmp_path / "m.safetensors")
    assert all(k.startswith("lora_unet_") for k in keys) and "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in keys
    if method == "concat":  # rank 2 fused + 3 stacked parts of rank 2
        assert keys["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape[1] == 8


def test_merge_sub_selector_keeps_only_those_rows_of_that_input(tmp_path):
    a = make_dit_adapter(tmp_path / "a.safetensors", "sd3", "kohya", seed=1)
    b = make_dit_adapter(tmp_path / "b.safetensors", "sd3", "diffusers", seed=2, alpha=None)
    chosen = resolve_selector("J01.ctx.attn.k", Arch.SD3)
    merge([Source(_open(a, "sd3"), 1.0), Source(_open(b, "sd3"), 1.0, chosen, "J01.ctx.attn.k")],
          dtype="F32").save(tmp_path / "m.safetensors")
    da, db, got = (fused_deltas(p, "sd3") for p in (a, b, tmp_path / "m.safetensors"))
    w = W["sd3"]
    expected = dict(da)
    key = "joint_blocks_1_context_block_attn_qkv"
    expected[key] = da[key].clone()
    expected[key][w : 2 * w] += db[key][w : 2 * w]
    assert_same_deltas(expected, got)


def test_compare_meets_split_and_fused_files_on_blocks(tmp_path):
    a = make_dit_adapter(tmp_path / "a.safetensors", "flux", "kohya", seed=1)
    same = _convert(a, "flux", "peft", tmp_path / "p.safetensors", compact=False)
    report = compare(_open(a, "flux"), _open(same, "flux"))
    assert set(report["blocks"]) == {"D00", "D01", "S00", "S01", "OTHER"}
    for row in report["blocks"].values():
        assert row["modules_a"] == row["modules_b"] == row["shared"]
        assert row["cosine"] == pytest.approx(1.0, abs=1e-5) and row["overlap"] == pytest.approx(1.0, abs=1e-4)
        assert row["norm_a"] == pytest.approx(row["norm_b"], rel=1e-5)


def test_diffusers_own_converter_agrees_at_the_real_width(tmp_path):
    """diffusers' `_convert_kohya_flux_lora_to_diffusers` hard-codes width 3072: rank 1, blocks D00 and S00."""
    conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    gen = torch.Generator().manual_seed(0)
    raw = {}
    for layer in FLUX_RECORD.layers():
        if layer.naming == BFL and layer.block in ("D00", "S00"):
            raw[f"{layer.stem}.lora_down.weight"] = torch.randn(1, layer.shape[1], generator=gen)
            raw[f"{layer.stem}.lora_up.weight"] = torch.randn(layer.shape[0], 1, generator=gen)
            raw[f"{layer.stem}.alpha"] = torch.tensor(0.5)
    save_file(raw, tmp_path / "k.safetensors")
    theirs = conversion._convert_kohya_flux_lora_to_diffusers(dict(raw))
    ours = load_file(_convert(tmp_path / "k.safetensors", "flux", "peft", tmp_path / "p.safetensors"))
    assert set(ours) == set(theirs)
    probe = torch.randn(3072 * 5, 4, dtype=torch.float64, generator=gen)  # ΔW·x for random x: no dense 21504×3072
    for key in (k for k in ours if k.endswith("lora_A.weight")):
        b = key.replace("lora_A", "lora_B")
        x = probe[: ours[key].shape[1]]
        torch.testing.assert_close(ours[b].double() @ (ours[key].double() @ x), theirs[b].double() @ (theirs[key].double() @ x))


def _tiny_flux():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )


def test_peft_loads_our_diffusers_output_with_the_expected_delta(tmp_path):
    pytest.importorskip("peft")
    src = make_dit_adapter(tmp_path / "k.safetensors", "flux", "kohya", alpha=0.5)
    out = _convert(src, "flux", "peft", tmp_path / "p.safetensors")
    model = _tiny_flux()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".weight")}
    with safe_open(str(out), "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    model.load_lora_adapter(load_file(out), prefix="transformer", metadata=metadata)
    model.fuse_lora(lora_scale=1.0)
    after = {n.replace("base_layer.", ""): p.detach() for n, p in model.named_parameters() if n.endswith(".weight")}
    expected = fused_deltas(src, "flux")
    from dit_delta import _FLUX  # the oracle's own table, to cut the fused ΔW into diffusers rows
    import re

    seen = 0
    for name, weight in before.items():
        path = name[: -len(".weight")]
        for pattern, template, part, units in _FLUX:
            m = re.fullmatch(pattern, path)
            if not m:
                continue
            fused = expected[template.format(*m.groups()).replace(".", "_")]
            w = weight.shape[1]
            rows = fused
            if part == "qkv":
                rows = fused[("qkv".index(m.group(2))) * w : ("qkv".index(m.group(2)) + 1) * w]
            elif part == "mlp":
                rows = fused[3 * w :]
            elif part == "swap":
                rows = torch.cat([fused[w:], fused[:w]])
            torch.testing.assert_close((after[name] - weight).double(), rows, atol=1e-5, rtol=1e-4, msg=lambda s: f"{name}: {s}")
            seen += 1
            break
    assert seen == 50


def test_cli_merges_a_kohya_and_a_diffusers_flux_file_by_blocks(tmp_path, runner):
    a = make_dit_adapter(tmp_path / "char.safetensors", "flux", "kohya", seed=1)
    b = make_dit_adapter(tmp_path / "style.safetensors", "flux", "diffusers", seed=2, alpha=None)
    out = tmp_path / "m.safetensors"
    result = runner.invoke(main, ["merge", str(a), str(b), "--ratios", "1,0.8", "--blocks", "all", "--blocks", "S01",
                                  "-o", str(out)])
    assert result.exit_code == 0, result.output
    da, db, got = fused_deltas(a, "flux"), fused_deltas(b, "flux"), fused_deltas(out, "flux")
    expected = {k: v + (0.8 * db[k] if k.startswith("single_blocks_1_") else 0) for k, v in da.items()}
    assert_same_deltas(expected, got, atol=1e-3)  # fp32 inputs written as fp32 factors
    assert all(k.startswith("lora_unet_") for k in load_file(out))


def test_cli_converts_a_diffusers_sd3_file_with_arch(tmp_path, runner):
    src = make_dit_adapter(tmp_path / "d.safetensors", "sd3", "diffusers", alpha=None)
    out = tmp_path / "k.safetensors"
    result = runner.invoke(main, ["convert", str(src), "--to", "kohya", "--arch", "sd3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "sd3 diffusers → kohya" in result.output
    assert_same_deltas(fused_deltas(src, "sd3"), fused_deltas(out, "sd3"))


def test_merge_takes_the_first_inputs_naming(tmp_path):
    a = make_dit_adapter(tmp_path / "a.safetensors", "flux", "onetrainer", seed=1)
    b = make_dit_adapter(tmp_path / "b.safetensors", "flux", "kohya", seed=2)
    merge([Source(_open(a, "flux")), Source(_open(b, "flux"))], dtype="F32").save(tmp_path / "m.safetensors")
    keys = load_file(tmp_path / "m.safetensors")
    assert "lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight" in keys
    assert not any("double_blocks" in k for k in keys)  # b's fused qkv split into a's parts
    fused = _convert(tmp_path / "m.safetensors", "flux", "kohya", tmp_path / "k.safetensors")
    da, db = fused_deltas(a, "flux"), fused_deltas(b, "flux")
    assert_same_deltas({k: da[k] + db[k] for k in da}, fused_deltas(fused, "flux"), atol=1e-4)
