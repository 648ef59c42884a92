"""prune, reweight and resize on Flux.1 and SD3 files of every dialect, checked against ΔW computed from the
raw tensors (`raw_deltas`): whole blocks, parts of fused layers (rows of the up factor), vectors by absolute
block index, and the one-line errors of bad selectors."""

from __future__ import annotations

import json

import pytest
import torch
from dit_adapters import make_dit_adapter
from raw_deltas import CASES, WIDTH, arch_args, block_of, deltas, read, rows_mask
from safetensors.torch import save_file

from blora_tools.cli import main


def _run(runner, *args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def _one_error_line(result, *mentions: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error"), result.stderr
    assert all(m in lines[0] for m in mentions), lines[0]


def _prefix(key: str) -> str:
    """A tensor key without its parameter (`.lora_up.weight`, `.lora_B.weight`, `.up.weight`, `.alpha`)."""
    return key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0]


def _expected(before: dict, parts: dict) -> dict:
    """Input ΔW with the row factors of `parts` applied; modules no pattern matches get factor 0."""
    result = {}
    for prefix, delta in before.items():
        mask = rows_mask(prefix, delta.shape[0], parts)
        if mask is not None and bool(mask.any()):
            result[prefix] = mask[:, None] * delta
    return result


def _assert_deltas(out_path, expected: dict) -> None:
    after = deltas(out_path)
    assert set(after) == set(expected)
    for prefix, delta in expected.items():
        assert torch.allclose(after[prefix], delta, rtol=1e-6, atol=1e-9), prefix


def _keep_parts(arch: str) -> tuple[str, dict]:
    """A selector choosing part of fused layers, and its row factors per module (prune --keep: others 0)."""
    w = WIDTH[arch]
    if arch == "flux":
        return "D00.img.q,S01.linear1.mlp", {
            r"double_blocks[._]0[._]img_attn[._]qkv$": (0, w, 1, 0),
            r"double_blocks\.0\.processor\.qkv_lora1$": (0, w, 1, 0),
            r"(?<!single_)transformer_blocks[._]0[._]attn[._]to_q$": (0, -1, 1, 0),
            r"single_blocks[._]1[._]linear1$": (3 * w, 7 * w, 1, 0),
            r"single_transformer_blocks[._]1[._]proj_mlp$": (0, -1, 1, 0),
        }
    return "J00.x.q,J01.ctx", {  # x.q: the q rows of both image attentions (attn, and attn2 of SD3.5 Medium)
        r"joint_blocks[._]0[._]x_block[._]attn2?[._]qkv$": (0, w, 1, 0),
        r"transformer_blocks[._]0[._]attn2?[._]to_q$": (0, -1, 1, 0),
        r"joint_blocks[._]1[._]context_block[._]": (0, -1, 1, 0),
        r"transformer_blocks[._]1[._](attn[._](add_[qkv]_proj|to_add_out)|ff_context|norm1_context)": (0, -1, 1, 0),
    }


@pytest.mark.parametrize("arch,dialect", CASES)
def test_prune_keep_part_of_fused_layers(runner, tmp_path, arch, dialect):
    src = make_dit_adapter(tmp_path / "in.safetensors", arch, dialect, seed=1)
    out = tmp_path / "out.safetensors"
    selector, parts = _keep_parts(arch)
    result = _run(runner, "prune", src, "--keep", selector, "-o", out, "--json", *arch_args(arch, dialect))
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["arch"] == arch and doc["mode"] == "keep"
    expected = _expected(deltas(src), parts)
    _assert_deltas(out, expected)
    before, after = read(src), read(out)
    assert set(after) <= set(before)
    for key, tensor in after.items():  # kept rows of up factors, and every other tensor, are the input's bits
        if key.endswith(("up.weight", "lora_B.weight")):
            kept = rows_mask(_prefix(key), tensor.shape[0], parts).bool()
            assert torch.equal(tensor[kept], before[key][kept]) and not tensor[~kept].any(), key
        else:
            assert torch.equal(tensor, before[key]), key
    spec = json.loads(__import__("safetensors").safe_open(str(out), "pt").metadata()["blora_spec"])
    assert spec["arch"] == arch and {b for b, s in spec["lbw"].items() if s["rank"]} == {block_of(p, arch) for p in expected}


@pytest.mark.parametrize("arch,dialect", CASES)
def test_prune_drop_part_zeroes_only_those_rows(runner, tmp_path, arch, dialect):
    src = make_dit_adapter(tmp_path / "in.safetensors", arch, dialect, seed=2)
    out = tmp_path / "out.safetensors"
    w = WIDTH[arch]
    selector = "D01.img.k" if arch == "flux" else "J01.x.v"
    row = (w, 2 * w) if arch == "flux" else (2 * w, 3 * w)
    fused = r"double_blocks[._]1[._]img_attn[._]qkv$|double_blocks\.1\.processor\.qkv_lora1$" if arch == "flux" else r"joint_blocks[._]1[._]x_block[._]attn2?[._]qkv$"
    split = r"(?<!single_)transformer_blocks[._]1[._]attn[._]to_k$" if arch == "flux" else r"transformer_blocks[._]1[._]attn2?[._]to_v$"
    parts = {fused: (row[0], row[1], 0, 1), split: (0, -1, 0, 0), r".": (0, -1, 1, 1)}
    result = _run(runner, "prune", src, "--drop", selector, "-o", out, *arch_args(arch, dialect))
    assert result.exit_code == 0, result.stderr
    _assert_deltas(out, _expected(deltas(src), parts))


@pytest.mark.parametrize("arch,dialect", CASES)
def test_reweight_parts_and_blocks(runner, tmp_path, arch, dialect):
    src = make_dit_adapter(tmp_path / "in.safetensors", arch, dialect, seed=3)
    out = tmp_path / "out.safetensors"
    w = WIDTH[arch]
    if arch == "flux":
        weights = "D00.img.q=0.5,S01.linear1.mlp=0,S00=0.25"
        parts = {
            r"double_blocks[._]0[._]img_attn[._]qkv$|double_blocks\.0\.processor\.qkv_lora1$": (0, w, 0.5, 1),
            r"(?<!single_)transformer_blocks[._]0[._]attn[._]to_q$": (0, -1, 0.5, 0.5),
            r"single_blocks[._]1[._]linear1$": (3 * w, 7 * w, 0, 1),
            r"single_transformer_blocks[._]1[._]proj_mlp$": (0, -1, 0, 0),
            r"single_(transformer_)?blocks[._]0[._]": (0, -1, 0.25, 0.25),
            r".": (0, -1, 1, 1),
        }
    else:
        weights = "J00.x.q=0.5,J01.ctx=0,J02=0.25"
        parts = {
            r"joint_blocks[._]0[._]x_block[._]attn2?[._]qkv$": (0, w, 0.5, 1),
            r"transformer_blocks[._]0[._]attn2?[._]to_q$": (0, -1, 0.5, 0.5),
            r"joint_blocks[._]1[._]context_block[._]": (0, -1, 0, 0),
            r"transformer_blocks[._]1[._](attn[._](add_[qkv]_proj|to_add_out)|ff_context|norm1_context)": (0, -1, 0, 0),
            r"(joint|transformer)_blocks[._]2[._]": (0, -1, 0.25, 0.25),
            r".": (0, -1, 1, 1),
        }
    result = _run(runner, "reweight", src, "--weights", weights, "-o", out, "--json", *arch_args(arch, dialect))
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    split = dialect in ("diffusers", "onetrainer")  # weight 0 on a whole split layer removes it (proj_mlp)
    assert doc["arch"] == arch and (doc["removed"] > 0) == (split or arch == "sd3")  # SD3: J01.ctx=0
    _assert_deltas(out, _expected(deltas(src), parts))
    before, after = read(src), read(out)
    named = {p: v for p, v in parts.items() if p != "."}
    untouched = [k for k in after if rows_mask(_prefix(k), 1, named) is None]
    assert untouched and all(torch.equal(after[k], before[k]) for k in untouched)  # copied bit for bit


@pytest.mark.parametrize("arch,dialect", CASES)
def test_resize_keeps_every_delta_at_full_rank(runner, tmp_path, arch, dialect):
    src = make_dit_adapter(tmp_path / "in.safetensors", arch, dialect, seed=4)
    out = tmp_path / "out.safetensors"
    result = _run(runner, "resize", src, "--rank", 2, "-o", out, *arch_args(arch, dialect))
    assert result.exit_code == 0, result.stderr
    before, after = deltas(src), list(deltas(out).values())
    assert len(after) == len(before)
    for delta in before.values():  # names change to kohya's; every input ΔW is one output ΔW
        assert any(d.shape == delta.shape and torch.allclose(d, delta, rtol=1e-4, atol=1e-6) for d in after)


def test_resize_lowers_the_rank_of_sd3_conv_embedder(runner, tmp_path):
    src = make_dit_adapter(tmp_path / "in.safetensors", "sd3", "kohya", rank=4, blocks={None})
    out = tmp_path / "out.safetensors"
    assert _run(runner, "resize", src, "--rank", 1, "-o", out).exit_code == 0
    conv = read(out)["lora_unet_x_embedder_proj.lora_down.weight"]
    assert conv.dim() == 4 and conv.shape[0] == 1
    delta = deltas(src)["lora_unet_x_embedder_proj"]
    best = torch.linalg.svdvals(delta)
    error = torch.linalg.norm(deltas(out)["lora_unet_x_embedder_proj"] - delta)
    assert torch.isclose(error, best[1:].norm(), rtol=1e-4)  # Eckart–Young: the best rank-1 approximation


def _flux_vector(values: dict[int, float], length: int = 58) -> str:
    return ",".join(str(values.get(i, 1.0)) for i in range(length))


def test_vectors_resolve_by_absolute_block_index_on_a_file_lacking_blocks(runner, tmp_path):
    """Inspire-Pack #191: counting the blocks a file holds would give D01 value 1 and S01 value 2."""
    src = make_dit_adapter(tmp_path / "in.safetensors", "flux", "kohya", blocks={"D01", "S01"}, seed=5)
    before = deltas(src)
    for length, index, expect in ((58, {2: 0.5, 1 + 19 + 1: 0.25, 1: 3.0, 3: 4.0}, {"D01": 0.5, "S01": 0.25}),
                                  (57, {1: 0.5, 19 + 1: 0.25, 0: 3.0}, {"D01": 0.5, "S01": 0.25}),
                                  (19, {1: 0.5, 0: 0.25}, {"D01": 0.5, "S01": 0.25})):
        out = tmp_path / f"out{length}.safetensors"
        result = _run(runner, "reweight", src, "--lbw", _flux_vector(index, length), "-o", out)
        assert result.exit_code == 0, result.stderr
        after = deltas(out)
        for prefix, delta in before.items():
            assert torch.allclose(after[prefix], expect[block_of(prefix, "flux")] * delta), (length, prefix)


def test_short_vector_never_repeats_its_last_value(runner, tmp_path):
    """Inspire-Pack #165: a 20-value vector (BASE, D00..D18) leaves the single blocks at 1, not its last value."""
    src = make_dit_adapter(tmp_path / "in.safetensors", "flux", "kohya", blocks={"D01", "S01"}, seed=6)
    out = tmp_path / "out.safetensors"
    vector = ",".join(["1", "1", "0.5"] + ["0"] * 17)
    assert _run(runner, "reweight", src, "--lbw", vector, "-o", out).exit_code == 0
    before, after = deltas(src), deltas(out)
    for prefix, delta in before.items():
        factor = 0.5 if block_of(prefix, "flux") == "D01" else 1.0
        assert torch.allclose(after[prefix], factor * delta), prefix


def test_sd3_vector_by_absolute_index(runner, tmp_path):
    src = make_dit_adapter(tmp_path / "in.safetensors", "sd3", "kohya", blocks={"J02"}, seed=7)
    out = tmp_path / "out.safetensors"
    vector = ",".join(["1", "2", "3", "0.5"] + ["9"] * 21)  # 25 values: BASE, J00..J23
    assert _run(runner, "reweight", src, "--lbw", vector, "-o", out).exit_code == 0
    before, after = deltas(src), deltas(out)
    assert before and all(torch.allclose(after[p], 0.5 * d) for p, d in before.items())


def test_base_weight_covers_text_encoders_and_base_layers(runner, tmp_path):
    src = make_dit_adapter(tmp_path / "in.safetensors", "flux", "kohya", blocks={None, "D00"}, seed=8)
    out = tmp_path / "out.safetensors"
    assert _run(runner, "reweight", src, "--weights", "BASE=0.5", "-o", out).exit_code == 0
    before, after = deltas(src), deltas(out)
    for prefix, delta in before.items():
        factor = 0.5 if block_of(prefix, "flux") == "BASE" else 1.0
        assert torch.allclose(after[prefix], factor * delta), prefix


# --- LyCORIS kinds on a fused layer ---------------------------------------------------------------------


def _lycoris_file(path, kind: str):
    """One kohya-named Flux module on `double_blocks.0.img_attn.qkv` (192 × 64 at the tiny width)."""
    g = torch.Generator().manual_seed(9)
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    if kind == "loha":
        t = {"hada_w1_a": (192, 2), "hada_w1_b": (2, 64), "hada_w2_a": (192, 2), "hada_w2_b": (2, 64)}
        tensors = {f"{stem}.{p}": torch.randn(s, generator=g) for p, s in t.items()}
        tensors[f"{stem}.alpha"] = torch.tensor(1.0)
    elif kind == "lokr":
        tensors = {f"{stem}.lokr_w1": torch.randn(3, 2, generator=g), f"{stem}.lokr_w2": torch.randn(64, 32, generator=g)}
    else:
        tensors = {f"{stem}.diff": torch.randn(192, 64, generator=g)}
    tensors["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"] = torch.randn(2, 64, generator=g)
    tensors["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"] = torch.randn(64, 2, generator=g)
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("kind", ["loha", "full"])
def test_part_prune_of_loha_and_full_is_exact(runner, tmp_path, kind):
    """LoHa: ΔW = (W1a·W1b) ⊙ (W2a·W2b) row by row, so zeroing rows of W1a alone zeroes those ΔW rows."""
    src = _lycoris_file(tmp_path / "in.safetensors", kind)
    out = tmp_path / "out.safetensors"
    assert _run(runner, "prune", src, "--keep", "D00.img.v,D00.img.proj", "-o", out).exit_code == 0
    parts = {r"img_attn_qkv$": (128, 192, 1, 0), r".": (0, -1, 1, 1)}
    _assert_deltas(out, _expected(deltas(src), parts))
    if kind == "loha":
        assert torch.equal(read(out)["lora_unet_double_blocks_0_img_attn_qkv.hada_w2_a"],
                           read(src)["lora_unet_double_blocks_0_img_attn_qkv.hada_w2_a"])


def test_reweight_rows_of_loha(runner, tmp_path):
    src = _lycoris_file(tmp_path / "in.safetensors", "loha")
    out = tmp_path / "out.safetensors"
    assert _run(runner, "reweight", src, "--weights", "D00.img.k=0.5", "-o", out).exit_code == 0
    _assert_deltas(out, _expected(deltas(src), {r"img_attn_qkv$": (64, 128, 0.5, 1), r".": (0, -1, 1, 1)}))


@pytest.mark.parametrize("command", [("prune", "--keep", "D00.img.q"), ("reweight", "--weights", "D00.img.q=0.5")])
def test_part_of_lokr_is_refused(runner, tmp_path, command):
    src = _lycoris_file(tmp_path / "in.safetensors", "lokr")
    result = _run(runner, command[0], src, *command[1:], "-o", tmp_path / "out.safetensors")
    _one_error_line(result, "lokr", "Kronecker", "in.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_whole_lokr_module_prunes_as_before(runner, tmp_path):
    src = _lycoris_file(tmp_path / "in.safetensors", "lokr")
    out = tmp_path / "out.safetensors"
    assert _run(runner, "prune", src, "--keep", "D00.img.attn.qkv", "-o", out).exit_code == 0
    assert set(read(out)) == {"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1", "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2"}


# --- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,mentions",
    [
        (("prune", "--keep", "in0"), ("U-Net", "flux")),
        (("prune", "--keep", "D19"), ("D19",)),
        (("prune", "--drop", "D05.foo"), ("D05.foo",)),
        (("prune", "--keep", "J01"), ("J01",)),
        (("reweight", "--weights", "S38=0"), ("S38",)),
        (("reweight", "--lbw", ",".join(["1"] * 17)), ("17 values", "58")),
        (("reweight", "--lbw", ",".join(["1"] * 26)), ("26 values",)),
        (("prune", "--keep", "D02"), ("leaves no module",)),
    ],
)
def test_bad_selectors_are_one_line_errors(runner, tmp_path, args, mentions):
    src = make_dit_adapter(tmp_path / "in.safetensors", "flux", "kohya", blocks={"D00", "D01", "S00"})
    result = _run(runner, args[0], src, *args[1:], "-o", tmp_path / "out.safetensors")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and lines and "Traceback" not in result.stderr
    assert all(m in result.stderr for m in mentions), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_unsplittable_rows_are_an_error(runner, tmp_path):
    """A fused qkv module whose rows are no multiple of 3 cannot be cut by part (a hostile or broken file)."""
    g = torch.Generator().manual_seed(10)
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    src = tmp_path / "in.safetensors"
    save_file({f"{stem}.lora_down.weight": torch.randn(2, 64, generator=g),
               f"{stem}.lora_up.weight": torch.randn(100, 2, generator=g)}, str(src))
    result = _run(runner, "prune", src, "--keep", "D00.img.q", "-o", tmp_path / "out.safetensors")
    _one_error_line(result, "100 output rows", "3 parts")


def test_dry_run_names_the_rows_it_would_zero(runner, tmp_path):
    src = make_dit_adapter(tmp_path / "in.safetensors", "flux", "kohya", blocks={"D00", "S00"})
    result = _run(runner, "prune", src, "--drop", "D00.img.q,S00.linear1.mlp", "--dry-run", "--json")
    doc = json.loads(result.stdout)
    assert doc["output"] is None and doc["dropped_modules"] == []
    assert doc["zeroed_rows"] == {"lora_unet_double_blocks_0_img_attn_qkv": ["img.attn.q"],
                                  "lora_unet_single_blocks_0_linear1": ["linear1.mlp"]}
    assert doc["partial"] == {"double": 1, "single": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_uniform_alpha_with_rows_keeps_the_part_deltas(runner, tmp_path):
    """--uniform-alpha folds each module's scale into the same factor whose rows the weights scale."""
    src = tmp_path / "in.safetensors"
    make_dit_adapter(src, "flux", "kohya", blocks={"D00"}, seed=13)
    tensors = read(src)
    tensors["lora_unet_double_blocks_0_img_attn_qkv.alpha"] = torch.tensor(0.5)  # alphas differ
    save_file(tensors, str(src))
    out = tmp_path / "out.safetensors"
    assert _run(runner, "reweight", src, "--weights", "D00.img.v=3", "--uniform-alpha", "-o", out).exit_code == 0
    after = read(out)
    assert {float(after[k]) for k in after if k.endswith(".alpha")} == {1.0}
    w = WIDTH["flux"]
    _assert_deltas(out, _expected(deltas(src), {r"img_attn_qkv$": (2 * w, 3 * w, 3, 1), r".": (0, -1, 1, 1)}))


def test_part_of_dora_is_refused(runner, tmp_path):
    src = tmp_path / "in.safetensors"
    make_dit_adapter(src, "flux", "kohya", blocks={"D00"})
    tensors = read(src)
    tensors["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"] = torch.ones(1, 64)
    save_file(tensors, str(src))
    result = _run(runner, "prune", src, "--keep", "D00.img.k", "-o", tmp_path / "out.safetensors")
    _one_error_line(result, "DoRA", "lora_unet_double_blocks_0_img_attn_qkv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_dit_spec_reads_back_with_its_base_group(tmp_path, runner):
    from safetensors import safe_open

    from blora_tools.spec import BlockSpec

    src = make_dit_adapter(tmp_path / "in.safetensors", "flux", "kohya", blocks={None, "S01"}, rank=3)
    out = tmp_path / "out.safetensors"
    assert _run(runner, "prune", src, "--drop", "te", "-o", out).exit_code == 0
    raw = safe_open(str(out), "pt").metadata()["blora_spec"]
    spec = BlockSpec.from_json(raw)
    assert spec.trained_blocks == {"OTHER", "S01"} and spec.blocks["S01"].rank == 3
    assert json.loads(raw)["blocks"]["base"]["rank"] == 3 and json.loads(raw)["blocks"]["double"]["rank"] == 0
