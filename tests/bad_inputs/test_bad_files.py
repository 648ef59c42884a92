"""Bad input files, through every command that reads adapters: one clean line, exit 1, nothing written or changed.

Also the inputs that look odd but are valid and must work everywhere: bf16/fp16/fp32 mixed in one file, and an
alpha stored as a 0-d tensor or as a 1-element vector.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from adapters import block_of, dense_deltas, make_adapter, raw_bytes, relative_error
from battery import READERS, WRITERS, assert_refused, invoke, reading_args, require, snapshot
from corrupt_files import ATTN, FILE_CASES, down, f32, module_file, up
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("good")
    return make_adapter(folder / "good.safetensors", "sd1", "lora", rank=2, per_block=1).read_bytes()


@pytest.fixture
def good(tmp_path, good_bytes):
    """A valid SD1 adapter in its own folder under tmp_path (the other input of merge and compare)."""
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "good.safetensors"
    path.write_bytes(good_bytes)
    return path


# --- broken files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", READERS)
@pytest.mark.parametrize("case", FILE_CASES, ids=[c.id for c in FILE_CASES])
def test_broken_file_is_refused_in_one_line(runner, tmp_path, good, case, command):
    require(command)
    bad = case.make(good, tmp_path)
    before = snapshot(tmp_path)
    result = invoke(runner, reading_args(command, bad, good, tmp_path / "out.safetensors"))
    fragment = "folder holds no .safetensors" if (command == "inspect" and case.id == "directory") else case.fragment
    assert_refused(result, tmp_path, before, str(bad), fragment)


# --- well-formed files whose modules are broken ----------------------------------------------------------

_SCALAR = ("F32", (), f32(2.0))

MODULE_CASES = [
    ("up-without-down", {"lora_up.weight": up()}, "has lora_up but no lora_down"),
    ("down-without-up", {"lora_down.weight": down()}, "has lora_down but no lora_up"),
    ("orphan-alpha", {"alpha": _SCALAR}, "orphan alpha"),
    ("rank-0", {"lora_down.weight": down(0), "lora_up.weight": up(0), "alpha": _SCALAR}, "rank 0"),
    ("factors-do-not-fit", {"lora_down.weight": down(2), "lora_up.weight": up(3)}, "does not fit"),
    ("down-0d", {"lora_down.weight": ("F32", (), f32(1.0)), "lora_up.weight": up(1)}, "does not fit"),
    ("alpha-two-values", {"lora_down.weight": down(), "lora_up.weight": up(), "alpha": ("F32", (2,), f32(1, 2))},
     "single value"),
    ("alpha-nan", {"lora_down.weight": down(), "lora_up.weight": up(), "alpha": ("F32", (), f32(float("nan")))},
     "alpha is nan"),
    ("alpha-bool", {"lora_down.weight": down(), "lora_up.weight": up(), "alpha": ("BOOL", (), b"\x01")},
     "expected a number"),
    ("loha-halves-differ", {"hada_w1_a": up(2), "hada_w1_b": down(2), "hada_w2_a": up(2, 16), "hada_w2_b": down(2)},
     "Hadamard halves"),
    ("lokr-3d-factor", {"lokr_w1": ("F32", (2, 2), f32(1, 2, 3, 4)), "lokr_w2_a": up(2, 16),
                        "lokr_w2_b": ("F32", (2, 16, 1), f32(*range(32)))}, "not factor shapes"),
    ("locon-up-with-kernel", {"lora_down.weight": ("F32", (2, 32, 1, 1), f32(*range(64))),
                              "lora_up.weight": ("F32", (4, 2, 2, 2), f32(*range(32)))}, "does not fit"),
    # issue #12: a Tucker core must be square in its rank dimensions, and no factor may have a zero-size side
    ("tucker-core-not-square", {"lora_down.weight": ("F32", (2, 32, 1, 1), f32(*range(64))),
                                "lora_mid.weight": ("F32", (3, 2, 1, 1), f32(*range(6))),
                                "lora_up.weight": ("F32", (32, 3, 1, 1), f32(*range(96)))}, "lora_mid [3, 2, 1, 1] does not fit"),
    ("zero-size-out", {"lora_down.weight": down(), "lora_up.weight": up(2, 0)}, "lora_up.weight has a zero-size dimension"),
]


@pytest.mark.parametrize("command", READERS)
@pytest.mark.parametrize("params, fragment", [c[1:] for c in MODULE_CASES], ids=[c[0] for c in MODULE_CASES])
def test_broken_module_is_refused_naming_it(runner, tmp_path, good, params, fragment, command):
    require(command)
    bad = module_file(tmp_path, params)
    before = snapshot(tmp_path)
    result = invoke(runner, reading_args(command, bad, good, tmp_path / "out.safetensors"))
    assert_refused(result, tmp_path, before, str(bad), ATTN, fragment)


# --- unreadable files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", READERS)
def test_unreadable_file(runner, tmp_path, good, monkeypatch, command):
    """chmod 000 where that blocks reading; as root (it does not) the file's open() is made to fail instead."""
    require(command)
    bad = tmp_path / "locked.safetensors"
    shutil.copy(good, bad)
    before = snapshot(tmp_path)
    args = reading_args(command, bad, good, tmp_path / "out.safetensors")
    if os.name == "posix" and os.geteuid() != 0:
        bad.chmod(0)
        try:
            result = invoke(runner, args)
        finally:
            bad.chmod(0o644)
    else:
        real_open = os.open  # inputs are opened with os.open (blora_tools.inputs.open_regular)

        def denied(name, *a, **k):
            if os.fspath(name) == str(bad):
                raise PermissionError(13, "Permission denied", str(name))
            return real_open(name, *a, **k)

        with monkeypatch.context() as patch:
            patch.setattr(os, "open", denied)
            result = invoke(runner, args)
    assert_refused(result, tmp_path, before, str(bad), "Permission denied")


# --- odd but valid: these must work everywhere --------------------------------------------------------------

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _mixed_dtypes(path):
    """Each module's factors in a different dtype, down and up of one module differing too, alphas in all three."""
    source = make_adapter(path.with_name("f32.safetensors"), "sd1", "locon", rank=2, per_block=1, seed=5)
    tensors = load_file(source)
    stems = sorted({k.split(".")[0] for k in tensors})
    mixed = {}
    for i, stem in enumerate(stems):
        for key in (k for k in tensors if k.split(".")[0] == stem):
            shift = 1 if key.endswith("lora_up.weight") else 2 if key.endswith("alpha") else 0
            mixed[key] = tensors[key].to(_DTYPES[(i + shift) % 3])
    source.unlink()
    save_file(mixed, path)
    return path


def group_of(stem: str, arch: str) -> str | None:
    from blora_tools.taxonomy.blocks import table

    block = block_of(stem, arch)
    return None if block is None else table(arch).group_of(block)


def _writer_args(command: str, file, other, out) -> list:
    return {
        "prune": ["prune", file, "--drop", "te", "-o", out],
        "reweight": ["reweight", file, "--weights", "in0=0.5,out3=2", "-o", out],
        "merge": ["merge", file, other, "--ratios", "1,0.5", "-o", out],
        "resize": ["resize", file, "--rank", "1", "-o", out],
        "convert": ["convert", file, "--to", "peft", "-o", out],
    }[command]


@pytest.mark.parametrize("command", READERS)
def test_mixed_bf16_fp16_fp32_in_one_file_works(runner, tmp_path, good, command):
    require(command)
    mixed = _mixed_dtypes(tmp_path / "mixed.safetensors")
    before = {mixed: mixed.read_bytes(), good: good.read_bytes()}
    out = tmp_path / "out.safetensors"
    if command in WRITERS:
        result = invoke(runner, _writer_args(command, mixed, good, out))
    else:
        result = invoke(runner, reading_args(command, mixed, good, out) + (["--json"] if command == "inspect" else []))
    assert result.exit_code == 0, result.stderr
    assert all(path.read_bytes() == data for path, data in before.items())
    if command == "inspect":
        (report,) = json.loads(result.stdout)
        assert set(report["dtypes"]) == {"BF16", "F16", "F32"} and report["norm"] > 0
    if command == "prune":  # every kept tensor byte for byte, in its own dtype
        kept, source = raw_bytes(out), raw_bytes(mixed)
        assert kept and all(kept[k] == source[k] for k in kept)
        assert {t.dtype for t in load_file(out).values()} == set(_DTYPES)
    if command == "reweight":  # ×0.5 and ×2 are exact in every float dtype
        got, want = dense_deltas(out), dense_deltas(mixed)
        weights = {"in0": 0.5, "out3": 2.0}
        assert set(got) == set(want)
        for stem, delta in want.items():
            expected = delta * weights.get(group_of(stem, "sd1"), 1.0)
            assert relative_error(got[stem], expected) < 1e-9, stem
        assert {t.dtype for t in load_file(out).values()} == set(_DTYPES)
    if command in ("merge", "resize", "convert"):
        assert dense_deltas(out)


def _alpha_variants(folder):
    """The same adapter twice: alphas as 0-d tensors, and as 1-element vectors (both are seen in the wild)."""
    zero_d = make_adapter(folder / "alpha0d.safetensors", "sd1", "locon", rank=2, per_block=1, alpha=1.0, seed=9)
    tensors = {k: (v.reshape(1) if k.endswith(".alpha") else v) for k, v in load_file(zero_d).items()}
    one = folder / "alpha1el.safetensors"
    save_file(tensors, one)
    return zero_d, one


@pytest.mark.parametrize("command", READERS)
def test_zero_d_and_one_element_alpha_mean_the_same(runner, tmp_path, good, command):
    require(command)
    zero_d, one = _alpha_variants(tmp_path)
    outputs = []
    for source in (zero_d, one):
        out = tmp_path / f"out-{source.stem}.safetensors"
        if command in WRITERS:
            args = _writer_args(command, source, good, out)
        else:
            args = reading_args(command, source, good, out) + (["--json"] if command in ("inspect", "compare") else [])
        result = invoke(runner, args)
        assert result.exit_code == 0, result.stderr
        outputs.append(out if command in WRITERS else result.stdout)
    if command in WRITERS:
        first, second = (dense_deltas(o) for o in outputs)
        assert set(first) == set(second) and first
        assert all(relative_error(second[s], first[s]) < 1e-6 for s in first)
    elif command in ("inspect", "compare"):
        first, second = (json.loads(o) for o in outputs)
        if command == "inspect":
            assert first[0]["norm"] == pytest.approx(second[0]["norm"], rel=1e-6)
            assert first[0]["blocks"] == second[0]["blocks"]
        else:
            assert {g: b["norm_b"] for g, b in first["blocks"].items()} == pytest.approx(
                {g: b["norm_b"] for g, b in second["blocks"].items()}, rel=1e-6
            )


def test_tucker_lokr_module_opens_and_resizes(runner, tmp_path):
    """LoKr with a Tucker core (lokr_t2, a 3×3 conv): its rank (so its alpha/rank strength: 8× too weak here) and
    its weight shape were misread, and torch.kron failed on the strided core product; now inspect and resize
    agree with LyCORIS' rebuild of ΔW."""
    conv = "lora_unet_down_blocks_1_resnets_0_conv1"  # 32 → 32, 3×3 in the tiny SD1 U-Net
    g = torch.Generator().manual_seed(0)
    w1, w2a, w2b, t2 = (torch.randn(*s, generator=g) for s in ((2, 2), (2, 16), (2, 16), (2, 2, 3, 3)))
    tensors = {f"{conv}.lokr_w1": w1, f"{conv}.lokr_w2_a": w2a, f"{conv}.lokr_w2_b": w2b, f"{conv}.lokr_t2": t2,
               f"{conv}.alpha": torch.tensor(2.0)}
    tensors.update({f"{ATTN}.lora_down.weight": torch.randn(2, 32, generator=g),
                    f"{ATTN}.lora_up.weight": torch.randn(32, 2, generator=g)})
    path = tmp_path / "lokr_t2.safetensors"
    save_file(tensors, path)
    w2 = torch.einsum("ijhw,jr,ip->prhw", t2.double(), w2b.double(), w2a.double())  # LyCORIS' Tucker rebuild
    delta = torch.kron(w1.double()[:, :, None, None], w2.contiguous())  # (torch.kron needs it) scale alpha/rank = 2/2 (rank = w2_a's 2nd dim)
    (report,) = json.loads(invoke(runner, ["inspect", "--json", path]).stdout)
    assert report["blocks"]["in1"]["norm"] == pytest.approx(float(delta.norm()), rel=1e-5)
    out = tmp_path / "out.safetensors"
    result = invoke(runner, ["resize", path, "--rank", "32", "-o", out])
    assert result.exit_code == 0, result.stderr
    resized = dense_deltas(out)[conv]
    assert relative_error(resized, delta.reshape(32, -1)) < 1e-5


def test_concat_refusal_names_the_file_with_the_loha_module(runner, tmp_path, good):
    """It named the first input, which is plain LoRA."""
    require("merge")
    loha = make_adapter(tmp_path / "loha.safetensors", "sd1", "loha", rank=2, per_block=1)
    before = snapshot(tmp_path)
    result = invoke(runner, ["merge", good, loha, "-o", tmp_path / "o.safetensors"])
    line = assert_refused(result, tmp_path, before, "--method svd")
    assert line.startswith(f"error: {loha}:"), line
