"""reweight: every module's ΔW times its block's weight (linear), checked against dense ΔW from the input."""

from __future__ import annotations

import pytest
import torch
from adapters import block_of, dense_deltas, make_adapter, metadata_of, raw_bytes, relative_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blora_tools.adapter.model import open_adapter
from blora_tools.errors import BloraError
from blora_tools.ops.reweight import reweight
from blora_tools.taxonomy.weights import parse_weights, uniform_weights

CASES = [
    ("sd1", "lora", "kohya", torch.float32),
    ("sd1", "locon", "kohya", torch.float32),
    ("sd1", "tucker", "kohya", torch.float32),
    ("sd1", "loha", "kohya", torch.float32),
    ("sd1", "lokr", "kohya", torch.float32),
    ("sd1", "full", "kohya", torch.float32),
    ("sd1", "lora", "peft", torch.float32),
    ("sd1", "locon", "kohya", torch.float16),
    ("sdxl", "locon", "kohya", torch.bfloat16),
]


@pytest.mark.parametrize("arch, kind, fmt, dtype", CASES, ids=[f"{a}-{k}-{f}-{str(d)[6:]}" for a, k, f, d in CASES])
def test_reweight_scales_each_block_linearly(tmp_path, arch, kind, fmt, dtype):
    text = "in0=0.5,out1=-2,mid=0,te=0.25,te1=3" if arch == "sd1" else "in0=0.5,out1=-2,mid=0,te1=0.25,te2=3"
    text = text.replace(",te1=3", "") if arch == "sd1" else text
    source = make_adapter(tmp_path / "in.safetensors", arch, kind, fmt=fmt, dtype=dtype)
    weights = parse_weights(text).resolve(arch)
    out = reweight(open_adapter(source), weights, text=text).save(tmp_path / "out.safetensors")

    before, after = dense_deltas(source), dense_deltas(out)
    expected = {s: weights[block_of(s, arch)] for s in before}
    assert set(after) == {s for s, w in expected.items() if w != 0}
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    for stem, delta in after.items():
        assert relative_error(delta, expected[stem] * before[stem]) < tolerance, stem
    # weight 1 is a byte copy; a module's alpha never changes; dtypes stay
    original, written = raw_bytes(source), raw_bytes(out)
    for key, data in written.items():
        stem = key.split(".")[0]
        if expected.get(stem) == 1.0 or key.endswith(".alpha"):
            assert data == original[key], key
    assert {v.dtype for v in open_adapter(out).header.tensors.values()} == {v.dtype for v in open_adapter(source).header.tensors.values()}


def test_exactly_one_factor_is_scaled(tmp_path):
    source = make_adapter(tmp_path / "in.safetensors", "sd1", "lora")
    out = reweight(open_adapter(source), parse_weights("unet=3,te=1").resolve("sd1")).save(tmp_path / "o.safetensors")
    original, written = raw_bytes(source), raw_bytes(out)
    changed = {k.split(".", 1)[1] for k in written if written[k] != original[k]}
    assert changed == {"lora_up.weight"}


def test_lbw_vector_zero_fills_and_lbws_fills_one(tmp_path):
    source = make_adapter(tmp_path / "in.safetensors", "sd1", "lora")
    vector = "lbw=1,0,0,0,0,0,0,0,0,0,0,0,1,0.5,1,1,1"  # BASE and the last five of the short layout
    spec = parse_weights(vector)
    lbw = reweight(open_adapter(source), spec.resolve("sd1"), text=vector).save(tmp_path / "lbw.safetensors")
    kept = {block_of(s, "sd1") for s in dense_deltas(lbw)}
    assert kept == {"te", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"}
    # a LoCon file has modules in blocks the short layout does not name (IN03, OUT00, …): LBW gives them 0,
    # kohya's --lbws semantics (fill 1) keeps them
    locon = make_adapter(tmp_path / "locon.safetensors", "sd1", "locon")
    filled = reweight(open_adapter(locon), spec.resolve("sd1", fill=1.0)).save(tmp_path / "fill.safetensors")
    zeroed = reweight(open_adapter(locon), spec.resolve("sd1")).save(tmp_path / "zero.safetensors")
    unnamed = {"IN00", "IN03", "IN06", "IN09", "IN10", "IN11", "OUT00", "OUT01", "OUT02", "OTHER"}
    assert {block_of(s, "sd1") for s in dense_deltas(filled)} == kept | (unnamed & {block_of(s, "sd1") for s in dense_deltas(locon)})
    assert {block_of(s, "sd1") for s in dense_deltas(zeroed)} == kept


def test_dora_accepts_only_zero_and_one(tmp_path):
    source = make_adapter(tmp_path / "in.safetensors", "sd1", "dora")
    adapter = open_adapter(source)
    with pytest.raises(BloraError, match="DoRA"):
        reweight(adapter, parse_weights("in0=0.5").resolve("sd1"))
    out = reweight(adapter, parse_weights("in0=0,te=0").resolve("sd1")).save(tmp_path / "o.safetensors")
    original, written = raw_bytes(source), raw_bytes(out)
    assert written and all(original[k] == v for k, v in written.items())
    assert not any(block_of(k.split(".")[0], "sd1") in ("IN01", "IN02", "te") for k in written)


def test_all_zero_is_an_error(tmp_path):
    source = make_adapter(tmp_path / "in.safetensors", "sd1", "lora", blocks="in0")
    with pytest.raises(BloraError, match="0 for every block"):
        reweight(open_adapter(source), uniform_weights("sd1", frozenset(), inside=1.0, outside=0.0))


def test_metadata_records_the_weights(tmp_path):
    source = make_adapter(tmp_path / "in.safetensors", "sd1", "lora", metadata={"ss_network_dim": "4", "ss_network_alpha": "2"})
    out = reweight(open_adapter(source), parse_weights("in0=0.5").resolve("sd1"), text="in0=0.5").save(tmp_path / "o.safetensors")
    meta = metadata_of(out)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert "in0=0.5" in meta["blora_history"] and len(meta["sshs_model_hash"]) == 64


_WEIGHT = st.sampled_from([-1.5, -0.5, 0.25, 0.5, 1.0, 2.0, 3.0])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=_WEIGHT, b=_WEIGHT, block=st.sampled_from(["in0", "mid", "out3", "te", "unet"]))
def test_reweight_a_then_b_equals_reweight_ab(tmp_path_factory, a, b, block):
    tmp = tmp_path_factory.mktemp("rw")
    source = make_adapter(tmp / "in.safetensors", "sd1", "locon", per_block=1)
    once = reweight(open_adapter(source), parse_weights(f"{block}={a}").resolve("sd1")).save(tmp / "a.safetensors")
    twice = reweight(open_adapter(once), parse_weights(f"{block}={b}").resolve("sd1")).save(tmp / "ab.safetensors")
    direct = reweight(open_adapter(source), parse_weights(f"{block}={a * b}").resolve("sd1")).save(tmp / "d.safetensors")
    got, want = dense_deltas(twice), dense_deltas(direct)
    assert set(got) == set(want)
    for stem in want:
        assert relative_error(got[stem], want[stem]) < 1e-6


@pytest.mark.parametrize("kind", ["lora", "locon", "loha", "lokr", "tucker"])
def test_reweight_with_uniform_alpha_scales_and_unifies(tmp_path, kind):
    """The weight and the alpha fold multiply the same factor once: ΔW = weight × ΔW, one alpha."""
    src = make_adapter(tmp_path / "in.safetensors", "sd1", kind,
                       alpha=lambda l: {"linear": 1.0, "conv1x1": 3.0, "conv3x3": 8.0}[l.kind] + (l.block == "IN01"))
    weights = parse_weights("in0=0.5,out3=2,te=0").resolve("sd1")
    plain = reweight(open_adapter(src), weights)
    assert any("different alpha values" in w for w in plain.warnings) == (kind not in ("loha", "lokr"))
    out = tmp_path / "out.safetensors"
    result = reweight(open_adapter(src), weights, uniform_alpha=True)
    result.save(out)
    assert not any("different alpha values" in w for w in result.warnings)
    assert len({m.alpha for m in open_adapter(out).modules.values()}) == 1
    before, after = dense_deltas(src), dense_deltas(out)
    for stem, delta in after.items():
        assert relative_error(delta, weights[block_of(stem, "sd1")] * before[stem]) < 1e-6, stem
