"""prune, reweight and convert scale factors and write alphas on the stored bytes (`adapter.floats`): their files
hold the same tensor bytes as the torch route writes, and the commands never import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from adapters import make_adapter, raw_bytes, torch_scalar_bytes, torch_scaled
from dit_adapters import make_dit_adapter

import blora_tools.ops.uniform as uniform_module
from blora_tools.adapter.model import open_adapter
from blora_tools.adapter.writer import Entry
from blora_tools.ops.convert import convert
from blora_tools.ops.prune import prune
from blora_tools.ops.reweight import reweight
from blora_tools.taxonomy.selectors import resolve_selector
from blora_tools.taxonomy.weights import parse_weights

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _mixed_alpha(layer) -> float:
    """Two alphas in one file, so --uniform-alpha folds a ratio into some modules."""
    return 3.0 if "attn" in layer.name else 0.7


def _torch_scaled_entry(adapter, key, name, ratio, rows=(), axis=0) -> Entry:
    """The entry the torch route made: the tensor as `Adapter.tensor` reads it (stored, or made in float32 on read),
    scaled by torch (`adapters.torch_scaled`)."""
    info = adapter.info(key)
    return Entry(name, info.dtype, info.shape, lambda: torch_scaled(adapter.tensor(key), info.dtype, ratio, rows, axis))


def _torch_scalar_entry(name, dtype, value) -> Entry:
    return Entry(name, dtype, (), lambda: torch_scalar_bytes(value, dtype))


def _both_routes(monkeypatch, tmp_path, make_result) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """The tensors `make_result()` writes, by the numpy route and by the torch route (the seam: the entries
    `ops.uniform` makes, swapped for the torch computation the commands used before)."""
    tmp_path.mkdir()
    ours = raw_bytes(make_result().save(tmp_path / "numpy.safetensors"))
    with monkeypatch.context() as patch:
        patch.setattr(uniform_module, "scaled", _torch_scaled_entry)
        patch.setattr(uniform_module, "scalar", _torch_scalar_entry)
        theirs = raw_bytes(make_result().save(tmp_path / "torch.safetensors"))
    return ours, theirs


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_reweight_and_convert_write_the_torch_routes_bytes(monkeypatch, tmp_path, dtype):
    source = make_adapter(tmp_path / "in.safetensors", "sdxl", "lora", dtype=dtype, alpha=_mixed_alpha)
    adapter = open_adapter(source)
    text = "te1=0.5,te2=-1,in1=0.3,mid=1.7,out0=0"
    weights = parse_weights(text).resolve("sdxl")
    makers = {
        "reweight": lambda: reweight(adapter, weights, text=text),
        "reweight --uniform-alpha": lambda: reweight(adapter, weights, text=text, uniform_alpha=True),
        "convert --to kohya --uniform-alpha": lambda: convert(adapter, to="kohya", uniform_alpha=True),
        "convert --to peft": lambda: convert(adapter, to="peft"),
    }
    for what, make in makers.items():
        ours, theirs = _both_routes(monkeypatch, tmp_path / what.replace(" ", "_"), make)
        assert ours == theirs, what
        original = raw_bytes(source)
        assert any(ours[k] != original.get(k) for k in ours), what  # something was computed, not only copied


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=lambda d: str(d)[6:])
def test_rows_of_fused_layers_write_the_torch_routes_bytes(monkeypatch, tmp_path, dtype):
    source = make_dit_adapter(tmp_path / "flux.safetensors", "flux", blocks={"D00", "S00", "S01"}, alpha=0.5,
                              dtype=dtype)
    adapter = open_adapter(source)
    text = "D00.img.q=0.5,S01.linear1.mlp=0,S00=0.25"
    weights = parse_weights(text).resolve("flux")
    kept = resolve_selector("D00.img.k,S00", "flux")
    for what, make in {
        "reweight": lambda: reweight(adapter, weights, text=text, uniform_alpha=True),
        "prune": lambda: prune(adapter, kept, keep=True, uniform_alpha=True),
    }.items():
        ours, theirs = _both_routes(monkeypatch, tmp_path / what, make)
        assert ours == theirs, what


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_folds_into_factors_made_on_read_round_once(monkeypatch, tmp_path, dtype):
    """Split diffusers layers fused for kohya (block-diagonal, made in float32) with one alpha folded in: the
    fold multiplies the made float32 factor before its one rounding, as the torch route did."""
    source = make_dit_adapter(tmp_path / "split.safetensors", "flux", "diffusers", blocks={"D00", "S00"}, alpha=0.75,
                              dtype=dtype)
    adapter = open_adapter(source)
    ours, theirs = _both_routes(monkeypatch, tmp_path / "fused", lambda: convert(adapter, to="kohya",
                                                                                uniform_alpha=True))
    assert ours == theirs
    made = _both_routes(monkeypatch, tmp_path / "plain", lambda: convert(adapter, to="kohya"))[0]
    assert any(ours[k] != made[k] for k in ours if k.endswith("lora_up.weight"))  # a fold was applied


def test_copy_commands_never_import_torch(tmp_path):
    source = make_adapter(tmp_path / "in.safetensors", "sdxl", "lora", dtype=torch.float16, alpha=_mixed_alpha)
    commands = [
        ["prune", str(source), "--drop", "te1", "-o", str(tmp_path / "p.safetensors")],
        ["reweight", str(source), "--weights", "te1=0.5,in1=0.3", "--uniform-alpha", "-o", str(tmp_path / "r.safetensors")],
        ["convert", str(source), "--to", "kohya", "--uniform-alpha", "-o", str(tmp_path / "k.safetensors")],
        ["convert", str(source), "--to", "peft", "-o", str(tmp_path / "peft.safetensors")],
    ]
    for args in commands:
        code = (
            "import sys; from blora_tools.cli import main\n"
            f"try: main({args!r})\n"
            "except SystemExit as done: assert not done.code, done.code\n"
            "print('torch' in sys.modules)\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (args, done.stderr)
        assert done.stdout.strip().splitlines()[-1] == "False", args
