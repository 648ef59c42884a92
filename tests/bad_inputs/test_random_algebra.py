"""The algebra on random valid adapters (hypothesis).

tests/ops already checks prune∘prune, reweight a-then-b and concat ΔW = Σ with random selectors and weights on
one fixed SD1 LoCon file. Here the adapters themselves are drawn: architecture, kind (LoRA, LoCon, Tucker, LoHa,
LoKr, full, DoRA), kohya or PEFT keys, dtype, per-layer ranks and alphas (or none). A few examples run by
default, many more with `-m slow`.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from adapters import block_of, dense_deltas, make_adapter, raw_bytes, relative_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blora_tools.adapter.model import open_adapter
from blora_tools.errors import BloraError
from blora_tools.ops.merge import Source, merge
from blora_tools.ops.prune import prune
from blora_tools.ops.reweight import reweight
from blora_tools.taxonomy.blocks import table
from blora_tools.taxonomy.selectors import resolve_selector
from blora_tools.taxonomy.weights import parse_weights

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TOLERANCE = {"fp32": 1e-6, "fp16": 3e-3, "bf16": 3e-2}
"""Relative ΔW error allowed where a factor is rounded to its dtype twice instead of once."""
_SELECTORS = {
    "sd1": ["in0", "in1", "in2", "in3", "mid", "out0", "out1", "out2", "out3", "te", "style", "unet", "IN04-OUT05",
            "NOT mid", "middle,te", "OUT11"],
    "sdxl": ["in0", "in1", "in2", "mid", "out0", "out1", "out2", "te1", "te2", "style", "unet", "NOT te1",
             "bottom", "IN07-OUT02"],
}


def _per_layer(seed: int, choices):
    """A deterministic per-layer choice (random across layers, the same for one layer)."""
    return lambda layer: choices[zlib.crc32(f"{seed}:{layer.name}".encode()) % len(choices)]


@st.composite
def adapters(draw, kinds=("lora", "locon", "tucker", "loha", "lokr", "full", "dora"), arch=None):
    """make_adapter arguments for a random valid adapter."""
    kind = draw(st.sampled_from(kinds))
    spec = {
        "arch": arch or draw(st.sampled_from(["sd1", "sdxl"])),
        "kind": kind,
        "fmt": draw(st.sampled_from(["kohya", "peft"])) if kind == "lora" else "kohya",
        "dtype": draw(st.sampled_from(list(_DTYPES))),
        "seed": draw(st.integers(0, 10_000)),
        "per_block": draw(st.sampled_from([1, 2])),
    }
    spec["rank"] = draw(st.sampled_from([1, 2, 4, "mixed"]))
    spec["alpha"] = draw(st.sampled_from([None, 1.0, 2.5, "mixed"]))
    return spec


def _write(folder, name: str, spec: dict):
    seed = spec["seed"]
    rank = _per_layer(seed, [1, 2, 3, 4]) if spec["rank"] == "mixed" else spec["rank"]
    alpha = _per_layer(seed + 1, [None, 0.5, 1.0, 3.0]) if spec["alpha"] == "mixed" else spec["alpha"]
    return make_adapter(
        folder / name, spec["arch"], spec["kind"], rank=rank, alpha=alpha, dtype=_DTYPES[spec["dtype"]],
        fmt=spec["fmt"], seed=seed, per_block=spec["per_block"],
    )


def _group(stem: str, arch: str) -> str | None:
    block = block_of(stem, arch)
    return None if block is None else table(arch).group_of(block)


_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --- prune ∘ prune = prune of the intersection -------------------------------------------------------------------


def _prune_twice(folder, spec, first: str, second: str) -> None:
    arch = spec["arch"]
    source = _write(folder, "in.safetensors", spec)
    a, b = resolve_selector(first, arch), resolve_selector(second, arch)
    present = {m.block for m in open_adapter(source).modules.values()}
    if spec["fmt"] == "peft" and arch == "sdxl" and present & a <= {"te1"}:
        # Known limit, not tested here: an SDXL PEFT file holding only `text_encoder.` keys reads as SD1 (those
        # keys are CLIP-L's on both; nothing in the file tells them apart), so the second prune sees SD1 blocks.
        return
    try:
        direct = prune(open_adapter(source), a & b, keep=True).save(folder / "direct.safetensors", force=True)
    except BloraError:
        assert not (a & b & present), "prune refused a selection that keeps modules"
        return
    once = prune(open_adapter(source), a, keep=True).save(folder / "once.safetensors", force=True)
    twice = prune(open_adapter(once), b, keep=True).save(folder / "twice.safetensors", force=True)
    got, want, original = raw_bytes(twice), raw_bytes(direct), raw_bytes(source)
    assert got == want
    assert all(original[k] == v for k, v in got.items()), "kept tensors are the input's bytes"
    assert {open_adapter(twice).modules[s].block for s in open_adapter(twice).modules} <= a & b


@settings(max_examples=6, **_SETTINGS)
@given(spec=adapters(), data=st.data())
def test_prune_twice_on_random_adapters(tmp_path_factory, spec, data):
    first, second = (data.draw(st.sampled_from(_SELECTORS[spec["arch"]])) for _ in range(2))
    _prune_twice(tmp_path_factory.mktemp("pp"), spec, first, second)


@pytest.mark.slow
@settings(max_examples=150, **_SETTINGS)
@given(spec=adapters(), data=st.data())
def test_prune_twice_on_random_adapters_many(tmp_path_factory, spec, data):
    first, second = (data.draw(st.sampled_from(_SELECTORS[spec["arch"]])) for _ in range(2))
    _prune_twice(tmp_path_factory.mktemp("pp"), spec, first, second)


# --- reweight by a, then by b = reweight by ab ---------------------------------------------------------------------

_WEIGHT = st.sampled_from([-2.0, -1.0, -0.5, 0.3, 0.5, 1.0, 1.5, 2.0, 3.0])
_REWEIGHT_KINDS = ("lora", "locon", "tucker", "loha", "lokr", "full")  # DoRA takes only 0 and 1 (tests/ops)


def _reweight_twice(folder, spec, group: str, a: float, b: float) -> None:
    arch = spec["arch"]
    source = _write(folder, "in.safetensors", spec)
    once = reweight(open_adapter(source), parse_weights(f"{group}={a}").resolve(arch)).save(folder / "a.safetensors")
    twice = reweight(open_adapter(once), parse_weights(f"{group}={b}").resolve(arch)).save(folder / "ab.safetensors")
    direct = reweight(open_adapter(source), parse_weights(f"{group}={a * b}").resolve(arch)).save(folder / "d.safetensors")
    got, want, original = dense_deltas(twice), dense_deltas(direct), dense_deltas(source)
    assert set(got) == set(want) == set(original)
    for stem in want:
        weight = a * b if _group(stem, arch) == group or group == "unet" and _group(stem, arch) not in (
            "te", "te1", "te2") else 1.0
        assert relative_error(got[stem], want[stem]) < _TOLERANCE[spec["dtype"]], stem
        assert relative_error(want[stem], weight * original[stem]) < _TOLERANCE[spec["dtype"]], stem


def _groups(arch: str) -> list[str]:
    layout = table(arch)
    return [c.value for c in layout.text_encoders] + list(layout.unet_groups) + ["unet"]


@settings(max_examples=6, **_SETTINGS)
@given(spec=adapters(kinds=_REWEIGHT_KINDS), a=_WEIGHT, b=_WEIGHT, data=st.data())
def test_reweight_twice_on_random_adapters(tmp_path_factory, spec, a, b, data):
    group = data.draw(st.sampled_from(_groups(spec["arch"])))
    _reweight_twice(tmp_path_factory.mktemp("rw"), spec, group, a, b)


@pytest.mark.slow
@settings(max_examples=150, **_SETTINGS)
@given(spec=adapters(kinds=_REWEIGHT_KINDS), a=_WEIGHT, b=_WEIGHT, data=st.data())
def test_reweight_twice_on_random_adapters_many(tmp_path_factory, spec, a, b, data):
    group = data.draw(st.sampled_from(_groups(spec["arch"])))
    _reweight_twice(tmp_path_factory.mktemp("rw"), spec, group, a, b)


# --- concat merge: ΔW = Σ ratioᵢ·ΔWᵢ ---------------------------------------------------------------------------------

_RATIO = st.sampled_from([-1.5, -0.5, 0.25, 0.8, 1.0, 2.0])
_CONCAT_KINDS = ("lora", "locon", "tucker")


def _concat(folder, first: dict, second: dict, r1: float, r2: float, selector: str) -> None:
    arch = first["arch"]
    paths = [_write(folder, "a.safetensors", first), _write(folder, "b.safetensors", second)]
    blocks = resolve_selector(selector, arch)
    sources = [Source(open_adapter(paths[0]), r1), Source(open_adapter(paths[1]), r2, blocks, selector)]
    expected: dict[str, torch.Tensor] = {}
    for path, ratio, chosen in zip(paths, (r1, r2), (None, blocks)):
        for stem, delta in dense_deltas(path).items():
            if chosen is None or block_of(stem, arch) in chosen:
                expected[stem] = expected.get(stem, 0) + ratio * delta
    got = dense_deltas(merge(sources, dtype="F32").save(folder / "m.safetensors"))
    assert set(got) == set(expected)
    for stem, delta in expected.items():
        assert relative_error(got[stem], delta) < 1e-5, stem


@settings(max_examples=6, **_SETTINGS)
@given(data=st.data(), r1=_RATIO, r2=_RATIO)
def test_concat_merge_of_random_adapters_is_the_sum(tmp_path_factory, data, r1, r2):
    first = data.draw(adapters(kinds=_CONCAT_KINDS))
    second = data.draw(adapters(kinds=_CONCAT_KINDS, arch=first["arch"]))
    selector = data.draw(st.sampled_from(_SELECTORS[first["arch"]]))
    _concat(tmp_path_factory.mktemp("cc"), first, second, r1, r2, selector)


@pytest.mark.slow
@settings(max_examples=150, **_SETTINGS)
@given(data=st.data(), r1=_RATIO, r2=_RATIO)
def test_concat_merge_of_random_adapters_is_the_sum_many(tmp_path_factory, data, r1, r2):
    first = data.draw(adapters(kinds=_CONCAT_KINDS))
    second = data.draw(adapters(kinds=_CONCAT_KINDS, arch=first["arch"]))
    selector = data.draw(st.sampled_from(_SELECTORS[first["arch"]]))
    _concat(tmp_path_factory.mktemp("cc"), first, second, r1, r2, selector)
