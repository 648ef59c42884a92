"""Every writing command states the file it writes: `blora_spec` reads back with `BlockSpec.from_json` and matches
the output's modules (independent reading: `spec_oracle`), and `blora_history`'s last entry names the inputs (file
name, short sha256 of the whole file) and the arguments. Every input kind the builders make goes through every
command that accepts it; the others must refuse it with a BloraError."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest
from adapters import KINDS, make_adapter, metadata_of
from spec_oracle import assert_spec_matches_file

from blora_tools.adapter.formats import Format
from blora_tools.adapter.model import open_adapter
from blora_tools.errors import BloraError
from blora_tools.ops.convert import convert
from blora_tools.ops.lowrank import RankPlan
from blora_tools.ops.merge import Source, merge
from blora_tools.ops.prune import prune
from blora_tools.ops.resize import resize
from blora_tools.ops.reweight import reweight
from blora_tools.spec import BlockSetting, BlockSpec, ModuleFacts
from blora_tools.taxonomy.selectors import resolve_selector
from blora_tools.taxonomy.weights import parse_weights


def _rank(layer) -> int:
    return 6 if layer.kind == "conv3x3" else 4


def _alpha(layer) -> float:
    return 2.0 if layer.kind == "linear" else 3.0  # linear and 1×1 layers share a block: mixed alphas there


def _run(command: str, kind: str, path, tmp_path):
    """(result, the arguments the history must hold) of one command on one input."""
    adapter = open_adapter(path)
    if command == "prune":
        return prune(adapter, resolve_selector("in1", "sd1"), keep=False, selector="in1"), {"drop": "in1"}
    if command == "reweight":
        text = "out3=0" if kind == "dora" else "in1=0.5,out3=0"  # DoRA takes only 0 and 1
        return reweight(adapter, parse_weights(text).resolve("sd1"), text=text), {"weights": text}
    if command == "merge":
        other = open_adapter(make_adapter(tmp_path / "b.safetensors", "sd1", kind, blocks="in1,out3", rank=2, seed=5))
        method = "concat" if kind in ("lora", "locon", "tucker", "dora") else "svd"
        plan = RankPlan(3) if method == "svd" else None
        sources = [Source(adapter, 1.0), Source(other, 0.5, resolve_selector("out3", "sd1"), "out3")]
        return merge(sources, method=method, plan=plan, alpha=2.0), {
            "method": method, "ratios": [1.0, 0.5], "blocks": ["all", "out3"],
            "resolved_blocks": [None, ["OUT09", "OUT10", "OUT11"]], "alpha": 2.0, "dtype": "F32"
        }
    if command == "resize":
        return resize(adapter, RankPlan(3), text="3"), {"rank_text": "3", "rank": {"rank": 3}, "method": "svd"}
    if command == "convert-peft":
        return convert(adapter, to=Format.PEFT), {"to": "peft"}
    result = convert(adapter, to=Format.KOHYA, uniform_alpha=True)
    counts = Counter(m.effective_alpha for m in adapter.modules.values() if m.rank is not None)
    common = max(a for a, n in counts.items() if n == max(counts.values()))  # the most frequent; ties: the larger
    return result, {"to": "kohya", "uniform_alpha": common}


COMMANDS = ("prune", "reweight", "merge", "resize", "convert-peft", "convert-uniform")
REFUSED = {
    ("merge", "dora"), ("resize", "dora"),  # a DoRA magnitude depends on the base weight
    *(("convert-peft", k) for k in ("tucker", "loha", "lokr", "full", "dora")),  # PEFT LoRA holds plain factors
    ("convert-uniform", "full"),  # no module has a rank
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", COMMANDS)
def test_output_states_its_modules_and_its_history(tmp_path, command, kind):
    path = make_adapter(tmp_path / "a.safetensors", "sd1", kind, rank=_rank, alpha=_alpha)
    if (command, kind) in REFUSED:
        with pytest.raises(BloraError):
            _run(command, kind, path, tmp_path)
        return
    result, arguments = _run(command, kind, path, tmp_path)
    out = result.save(tmp_path / "out.safetensors")
    assert_spec_matches_file(out, "sd1")
    entry = json.loads(metadata_of(out)["blora_history"])[-1]
    assert entry["operation"] == command.split("-")[0]
    first = entry["inputs"][0]
    assert first == {"file": "a.safetensors", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:10]}
    for key, value in arguments.items():
        assert entry["arguments"][key] == value, key


def test_merge_spec_of_differing_ranks_is_exact_per_block_and_mixed_per_group(tmp_path):
    a = make_adapter(tmp_path / "a.safetensors", "sd1", "locon", rank=8, metadata={"blora_spec": '{"stale": 1}'})
    b = make_adapter(tmp_path / "b.safetensors", "sd1", "lora", blocks="IN01,out3", rank=4, seed=7)
    out = merge([Source(open_adapter(a)), Source(open_adapter(b))]).save(tmp_path / "c.safetensors")
    spec = assert_spec_matches_file(out, "sd1")
    assert spec.blocks["IN01"].rank == 12 and spec.blocks["IN02"].rank == 8 and spec.blocks["IN01"].conv_rank == 8
    summary = json.loads(metadata_of(out)["blora_spec"])["blocks"]
    assert summary["in0"]["rank"] == 12 and summary["in0"]["mixed"] is True
    assert {s.alpha for s in spec.blocks.values() if s.rank} == {12.0}  # one alpha per file: the largest rank


def test_prune_spec_drops_pruned_blocks_at_lbw_level_and_keeps_lr_weights(tmp_path):
    trained = BlockSpec.from_modules("sd1", [])
    lbw = {b: {"rank": 4, "alpha": 2.0, "lr_weight": 0.5 if b == "OUT03" else 1.0} for b in trained.blocks}
    source_spec = json.dumps({"format": "blora-spec/1", "arch": "sd1", "algo": "lora", "lbw": lbw})
    path = make_adapter(tmp_path / "a.safetensors", "sd1", "lora", metadata={"blora_spec": source_spec})
    out = prune(open_adapter(path), resolve_selector("IN01", "sd1"), keep=False).save(tmp_path / "p.safetensors")
    spec = assert_spec_matches_file(out, "sd1")
    assert not spec.blocks["IN01"].trained and spec.blocks["IN02"].trained
    assert spec.blocks["OUT03"].lr_weight == 0.5


def test_old_group_spec_written_by_merge_still_reads(tmp_path):
    # What `merge` wrote before 0.2 (no format, paper groups only), e.g. from an SD1 svd merge at rank 4.
    old = {"alpha": 4.0, "arch": "sd1", "operation": "merge", "blocks": {
        "te": {"rank": 4, "alpha": 4.0, "conv_rank": 0, "conv_alpha": 0},
        "in0": {"rank": 4, "alpha": 4.0, "conv_rank": 2, "conv_alpha": 4.0},
        "out3": {"rank": 0, "alpha": 0, "conv_rank": 0, "conv_alpha": 0},
    }}
    spec = BlockSpec.from_json(json.dumps(old))
    assert [spec.blocks[b].conv_rank for b in ("IN01", "IN02", "IN03")] == [2, 2, 2]
    assert spec.blocks["te"].rank == 4 and not spec.blocks["OUT06"].trained and not spec.blocks["IN00"].trained
    assert spec.algo.value == "locon" and spec.network_alpha == 4.0
    with pytest.raises(BloraError, match="unknown sd1 group"):
        BlockSpec.from_json(json.dumps({**old, "blocks": {"in9": {"rank": 4}}}))


def test_inspect_names_spec_blocks_without_modules_and_an_unreadable_spec(tmp_path):
    from blora_tools.ops.stats import inspect_adapter

    both = open_adapter(make_adapter(tmp_path / "both.safetensors", "sd1", "lora", blocks="in1,out3"))
    spec = BlockSpec.from_modules("sd1", [ModuleFacts.of(m) for m in both.modules.values()]).to_json()
    only_in1 = make_adapter(tmp_path / "in1.safetensors", "sd1", "lora", blocks="in1", metadata={"blora_spec": spec})
    warnings = inspect_adapter(open_adapter(only_in1), with_stats=False)["warnings"]
    assert "blocks out3 are in this file's blora_spec but hold no modules" in warnings
    broken = make_adapter(tmp_path / "b.safetensors", "sd1", "lora", metadata={"blora_spec": '{"format": "x"}'})
    assert any("blora_spec cannot be read" in w for w in inspect_adapter(open_adapter(broken), with_stats=False)["warnings"])


def test_spec_the_plugin_writes_reads_back_with_its_extras_ignored():
    # The shape kohya_plugin.network.save_weights writes (0.1): training alphas per block, file_alpha and
    # module_alphas beside them, no `kinds`, `mixed` only in the group summary.
    lbw = {b: {"rank": 0, "alpha": 1.0, "conv_rank": 0, "conv_alpha": 1.0, "lr_weight": 1.0}
           for b in BlockSpec.from_modules("sd1", []).blocks}
    lbw["IN01"] = {"rank": 8, "alpha": 4.0, "conv_rank": 4, "conv_alpha": 1.0, "lr_weight": 0.5}
    doc = {"format": "blora-spec/1", "arch": "sd1", "algo": "locon", "network_dim": 8, "network_alpha": 4.0,
           "blocks": {"in0": {"rank": 8, "alpha": 4.0, "conv_rank": 4, "conv_alpha": 1.0, "lr_weight": 0.5,
                              "mixed": True}},
           "lbw": lbw, "file_alpha": 4.0, "module_alphas": {"lora_unet_x": 2.0}}
    spec = BlockSpec.from_json(json.dumps(doc))
    assert spec.blocks["IN01"] == BlockSetting(8, 4.0, 4, 1.0, 0.5) and spec.trained_blocks == {"IN01"}
    assert spec.kinds == {} and BlockSpec.from_json(spec.to_json()) == spec


def test_sdxl_middle_block_parts_get_their_own_settings(tmp_path):
    path = make_adapter(tmp_path / "x.safetensors", "sdxl", "locon", blocks="mid,out0", rank=_rank, alpha=_alpha, per_block=None)
    out = prune(open_adapter(path), resolve_selector("out0", "sdxl"), keep=False).save(tmp_path / "p.safetensors")
    spec = assert_spec_matches_file(out, "sdxl")
    assert sorted(spec.slots) == [10, 11, 12]
    by_slot = {}
    for m in open_adapter(out).modules.values():
        by_slot.setdefault(m.placement.kohya_index, set()).add((m.rank, m.effective_alpha, ModuleFacts.of(m).conv))
    for slot, setting in spec.slots.items():
        plain = {(r, a) for r, a, conv in by_slot[slot] if not conv}
        conv = {(r, a) for r, a, c in by_slot[slot] if c}
        assert (setting.rank, setting.alpha) in plain and setting.mixed == (len(plain) > 1 or len(conv) > 1)
        assert setting.conv_rank == (max(r for r, _ in conv) if conv else 0)
    assert BlockSpec.from_json(metadata_of(out)["blora_spec"]).slots == spec.slots
