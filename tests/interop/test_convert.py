"""`convert`: kohya ↔ PEFT, SDXL LDM ↔ diffusers names, uniform alpha — round trips on every kind.

Oracle: `adapters.dense_deltas`, which reads files with safetensors and its own arithmetic. Conversions that
only rename must keep every factor byte for byte.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from adapters import KINDS, make_adapter, metadata_of, raw_bytes, relative_error
from adapters import dense_deltas as kohya_deltas
from interop_helpers import deltas as dense_deltas
from interop_helpers import diffusers_written_lora
from safetensors.torch import load_file, save_file

from blora_tools.adapter.formats import ldm_to_diffusers, path_from_stem, stem_from_path, unet_naming
from blora_tools.adapter.model import open_adapter
from blora_tools.cli import main
from blora_tools.errors import BloraError
from blora_tools.ops.convert import convert

PEFT_KINDS = ("lora", "locon")
REFUSED = {"tucker": "tucker", "loha": "loha", "lokr": "lokr", "full": "full", "dora": "dora"}


def mixed_alpha(layer):
    return {"linear": 1.0, "conv1x1": 3.0, "conv3x3": 8.0}[layer.kind]


def mixed_rank(layer):
    return {"linear": 4, "conv1x1": 2, "conv3x3": 3}[layer.kind]


def canonical(deltas: dict, arch: str) -> dict:
    """Stems in one naming (diffusers-style U-Net, te1 for SDXL's first encoder) so files can be compared."""
    out = {}
    for stem, delta in deltas.items():
        component, path = path_from_stem(stem, arch)
        if component.value == "unet" and unet_naming(path) == "ldm":
            path = ldm_to_diffusers(path, arch)
        name = "te1" if arch == "sdxl" and component.value == "te" else component.value
        out[stem_from_path(name, path)] = delta
    return out


def assert_same_deltas(a: dict, b: dict, arch: str, tol: float = 1e-6) -> None:
    a, b = canonical(a, arch), canonical(b, arch)
    assert set(a) == set(b)
    worst = max(relative_error(b[k], a[k]) for k in a)
    assert worst <= tol, worst


def run(adapter_path, out_path, **kwargs):
    result = convert(open_adapter(adapter_path), **kwargs)
    result.save(out_path)
    return result


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("kind", PEFT_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_kohya_peft_kohya_keeps_delta_with_alpha_equal_to_rank(tmp_path, arch, kind, dtype):
    """PEFT output has alpha = rank everywhere (each module's alpha/rank folded into lora_B), so a loader that
    ignores lora_adapter_metadata (ComfyUI) applies the same strength as diffusers; down factors stay byte for
    byte, and so does every up factor whose module already had alpha = rank."""
    src = make_adapter(tmp_path / "src.safetensors", arch, kind, rank=mixed_rank, alpha=mixed_alpha, dtype=dtype)
    peft = tmp_path / "peft.safetensors"
    run(src, peft, to="peft")
    back = tmp_path / "back.safetensors"
    run(peft, back, to="kohya")
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert_same_deltas(dense_deltas(src), dense_deltas(peft), arch, tol)
    assert_same_deltas(dense_deltas(src), dense_deltas(back), arch, tol)
    assert_same_deltas(dense_deltas(src), dense_deltas_alpha_is_rank(peft), arch, tol)  # what a metadata-blind loader applies
    before, after = raw_bytes(src), raw_bytes(back)
    modules = open_adapter(src).modules
    for key, data in before.items():
        stem, _, param = key.partition(".")
        if param == "lora_down.weight" or (param == "lora_up.weight" and modules[stem].scale == 1.0):
            assert after[key] == data, key
    assert {m.alpha for m in open_adapter(back).modules.values()} == {float(m.rank) for m in modules.values()}
    meta = json.loads(metadata_of(peft)["lora_adapter_metadata"])
    fields = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules")
    assert {f"unet.{f}" for f in fields} <= set(meta)  # diffusers builds LoraConfig(**fields) per component
    for component in ("unet", "text_encoder", "text_encoder_2"):
        if f"{component}.r" in meta:
            assert meta[f"{component}.lora_alpha"] == meta[f"{component}.r"]
            assert meta[f"{component}.alpha_pattern"] == meta[f"{component}.rank_pattern"]
    assert all(not k.startswith("text_model.") for k in meta.get("text_encoder.target_modules", []))


def dense_deltas_alpha_is_rank(path) -> dict:
    """ΔW as a loader that ignores lora_adapter_metadata computes it: alpha = rank, scale 1."""
    stripped = path.with_name(path.stem + "-nometa.safetensors")
    save_file(load_file(str(path)), str(stripped))
    return kohya_deltas(stripped)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_peft_kohya_peft_keeps_factors_and_deltas(tmp_path, arch):
    """A file diffusers itself wrote (mixed ranks and alphas in rank_pattern / alpha_pattern) → kohya → PEFT."""
    src = diffusers_written_lora(tmp_path / "src.safetensors", arch)
    kohya = tmp_path / "kohya.safetensors"
    result = run(src, kohya, to="kohya")
    if arch == "sdxl":  # kohya's own SDXL names
        assert result.summary["names"] == "ldm"
        assert any(k.startswith("lora_unet_input_blocks_") for k in raw_bytes(kohya))
    back = tmp_path / "back.safetensors"
    run(kohya, back, to="peft")
    assert_same_deltas(dense_deltas(src), dense_deltas(kohya), arch)
    assert_same_deltas(dense_deltas(src), dense_deltas(back), arch)
    # Text-encoder keys come back in the form every diffusers loads (`text_model.` kept; see adapter/peft.py).
    before = {k.replace(".text_model.", "."): v for k, v in raw_bytes(src).items()}
    after = {k.replace(".text_model.", "."): v for k, v in raw_bytes(back).items()}
    assert set(after) == set(before)
    assert all(after[k] == v for k, v in before.items() if k.endswith("lora_A.weight"))
    scales = {m.path: m.scale for m in open_adapter(src).modules.values()}
    unchanged = [k for k in before if k.endswith("lora_B.weight") and scales[k.split(".", 1)[1].rsplit(".lora_B", 1)[0]] == 1.0]
    assert unchanged and all(after[k] == before[k] for k in unchanged)
    assert open_adapter(back).format.value == "peft"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_uniform_alpha_keeps_every_delta(tmp_path, arch, kind):
    src = make_adapter(tmp_path / "src.safetensors", arch, kind, rank=mixed_rank, alpha=mixed_alpha)
    out = tmp_path / "uniform.safetensors"
    if kind == "full":
        with pytest.raises(BloraError, match="no module has a rank"):
            convert(open_adapter(src), to="kohya", uniform_alpha=True)
        return
    result = run(src, out, to="kohya", uniform_alpha=True)
    assert_same_deltas(dense_deltas(src), dense_deltas(out), arch)
    adapter = open_adapter(out)
    alphas = {m.alpha for m in adapter.modules.values() if m.rank is not None}
    assert len(alphas) == 1 and alphas == {result.summary["uniform_alpha"]}
    if kind == "dora":  # DoRA: ΔW unchanged, so its magnitude vector stays as it is
        before, after = raw_bytes(src), raw_bytes(out)
        assert all(before[k] == after[k] for k in before if k.endswith("dora_scale"))


def test_uniform_alpha_in_half_precision_and_missing_alphas(tmp_path):
    # Half the modules have no alpha (alpha = rank = 4), the rest alpha 1: the majority alpha wins and the
    # modules without an alpha tensor get one.
    src = make_adapter(
        tmp_path / "src.safetensors", "sd1", "locon", alpha=lambda l: None if l.kind == "linear" else 1.0,
        dtype=torch.float16,
    )
    out = tmp_path / "u.safetensors"
    result = run(src, out, to="kohya", uniform_alpha=True)
    assert_same_deltas(dense_deltas(src), dense_deltas(out), "sd1", tol=2e-3)
    adapter = open_adapter(out)
    assert all("alpha" in m.keys for m in adapter.modules.values())
    assert {m.alpha for m in adapter.modules.values()} == {result.summary["uniform_alpha"]}
    assert adapter.metadata["ss_network_alpha"] == f"{result.summary['uniform_alpha']:g}"


@pytest.mark.parametrize("kind", KINDS)
def test_sdxl_names_round_trip_byte_identical(tmp_path, kind):
    src = make_adapter(tmp_path / "src.safetensors", "sdxl", kind, rank=mixed_rank, alpha=mixed_alpha, per_block=1)
    diffusers = tmp_path / "diffusers.safetensors"
    run(src, diffusers, to="kohya", names="diffusers")
    unet_keys = [k for k in raw_bytes(diffusers) if k.startswith("lora_unet_")]
    assert unet_keys and all(unet_naming(path_from_stem(k.split(".")[0], "sdxl")[1]) == "diffusers" for k in unet_keys)
    assert_same_deltas(dense_deltas(src), dense_deltas(diffusers), "sdxl", tol=0.0)
    back = tmp_path / "back.safetensors"
    run(diffusers, back, to="kohya", names="ldm")
    assert raw_bytes(back) == raw_bytes(src)
    assert {m.block for m in open_adapter(diffusers).modules.values()} == {
        m.block for m in open_adapter(src).modules.values()
    }


def test_sd1_ldm_names_round_trip_with_a_warning(tmp_path):
    src = make_adapter(tmp_path / "src.safetensors", "sd1", "locon", per_block=1)
    ldm = tmp_path / "ldm.safetensors"
    result = run(src, ldm, to="kohya", names="ldm")
    assert any("LDM names" in w and "sd-scripts" in w and "LyCORIS" in w for w in result.warnings)
    assert any(k.startswith("lora_unet_input_blocks_3_0_op.") for k in raw_bytes(ldm))  # IN03, the downsampler
    back = tmp_path / "back.safetensors"
    run(ldm, back, to="kohya", names="diffusers")
    assert raw_bytes(back) == raw_bytes(src)


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_kinds_peft_cannot_hold_are_refused(tmp_path, kind):
    src = make_adapter(tmp_path / "src.safetensors", "sd1", kind)
    with pytest.raises(BloraError, match=rf"PEFT LoRA file holds only .* \d+ {REFUSED[kind]} \(e\.g\. lora_"):
        convert(open_adapter(src), to="peft")


def test_refusals(tmp_path):
    src = make_adapter(tmp_path / "src.safetensors", "sd1", "lora")
    adapter = open_adapter(src)
    with pytest.raises(BloraError, match="already kohya format; nothing to convert"):
        convert(adapter, to="kohya")
    with pytest.raises(BloraError, match="--names applies to kohya output"):
        convert(adapter, to="peft", names="ldm")
    with pytest.raises(BloraError, match="unknown naming"):
        convert(adapter, to="kohya", names="sgm")
    with pytest.raises(BloraError, match="unknown target format 'ckpt'; valid: kohya, peft, diffusers, comfyui"):
        convert(adapter, to="ckpt")


def test_passthrough_keys(tmp_path):
    extra = {"bundle_emb.sks.string_to_param.*": torch.randn(2, 32)}
    src = make_adapter(tmp_path / "src.safetensors", "sd1", "lora", alpha=mixed_alpha, extra=extra)
    kept = tmp_path / "kept.safetensors"
    run(src, kept, to="kohya", uniform_alpha=True)
    assert raw_bytes(kept)["bundle_emb.sks.string_to_param.*"] == raw_bytes(src)["bundle_emb.sks.string_to_param.*"]
    result = run(src, tmp_path / "peft.safetensors", to="peft")
    assert any("no place in a PEFT file" in w for w in result.warnings)
    assert not any(k.startswith("bundle_emb") for k in raw_bytes(tmp_path / "peft.safetensors"))


def test_attention_processor_file_to_peft_and_kohya(tmp_path):
    """Old diffusers attention-processor keys (`….processor.to_q_lora.down.weight`) convert too."""
    torch.manual_seed(0)
    tensors = {}
    for proj in ("to_q", "to_out"):
        base = f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.{proj}_lora"
        tensors[f"{base}.down.weight"] = torch.randn(4, 32)
        tensors[f"{base}.up.weight"] = torch.randn(32, 4)
    src = tmp_path / "attn.safetensors"
    save_file(tensors, str(src))
    kohya = tmp_path / "kohya.safetensors"
    run(src, kohya, to="kohya")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in raw_bytes(kohya)
    peft = tmp_path / "peft.safetensors"
    run(src, peft, to="peft")
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight" in raw_bytes(peft)
    assert_same_deltas(dense_deltas(kohya), dense_deltas(peft), "sd1", tol=0.0)


def test_metadata_is_kept_and_history_recorded(tmp_path):
    src = make_adapter(
        tmp_path / "src.safetensors", "sd1", "lora", alpha=mixed_alpha,
        metadata={"ss_output_name": "char", "modelspec.title": "Char"},
    )
    out = tmp_path / "peft.safetensors"
    run(src, out, to="peft")
    meta = metadata_of(out)
    assert meta["ss_output_name"] == "char" and meta["modelspec.title"] == "Char"
    assert meta["ss_network_alpha"] == meta["ss_network_dim"] == "4"  # PEFT output: alpha = rank
    history = json.loads(meta["blora_history"])
    assert history[-1]["operation"] == "convert" and history[-1]["arguments"]["to"] == "peft"
    back = tmp_path / "back.safetensors"
    run(out, back, to="kohya")
    assert "lora_adapter_metadata" not in metadata_of(back)


# --- CLI --------------------------------------------------------------------------------------------------


def test_cli_convert_json_and_exit_codes(runner, tmp_path):
    def sha256(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    src = make_adapter(tmp_path / "char.safetensors", "sd1", "lora", alpha=mixed_alpha)
    checksum = sha256(src)
    out = tmp_path / "char-peft.safetensors"
    result = runner.invoke(main, ["convert", str(src), "--to", "peft", "-o", str(out), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["to"] == "peft" and doc["output"] == str(out) and doc["modules"] == len(open_adapter(src).modules)
    again = runner.invoke(main, ["convert", str(src), "--to", "peft", "-o", str(out)])
    assert again.exit_code == 1 and "output exists" in again.stderr
    loha = make_adapter(tmp_path / "loha.safetensors", "sd1", "loha")
    refused = runner.invoke(main, ["convert", str(loha), "--to", "peft", "-o", str(tmp_path / "x.safetensors")])
    assert refused.exit_code == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {loha}:") and "loha" in lines[0]
    assert not (tmp_path / "x.safetensors").exists()
    fixed = tmp_path / "fixed.safetensors"
    text = runner.invoke(main, ["convert", str(src), "--to", "kohya", "--uniform-alpha", "-o", str(fixed)])
    assert text.exit_code == 0 and "alpha 1 everywhere" in text.stdout
    usage = runner.invoke(main, ["convert", str(src), "--to", "ckpt", "-o", str(fixed)])
    assert usage.exit_code == 2
    assert sha256(src) == checksum
