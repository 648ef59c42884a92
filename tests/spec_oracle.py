"""An independent reading of what a written file holds per block, to check its `blora_spec` against.

It reads the file with `safetensors` (not `blora_tools.adapter`), takes each module's rank from its factor shapes,
its alpha from its `alpha` tensor or the PEFT config (missing = rank), and its block from the tiny-model layer
table (`adapters.block_of`), then states what `BlockSpec.from_modules` must have said.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from adapters import block_of, metadata_of
from safetensors.torch import load_file

from blora_tools.spec import BlockSpec


def _peft_alpha(config: dict, component: str, dotted: str) -> float | None:
    """PEFT's alpha of one module: its `alpha_pattern` entry (matching a dotted suffix), else `lora_alpha`."""
    for pattern, value in config.get(f"{component}.alpha_pattern", {}).items():
        if dotted == pattern or dotted.endswith("." + pattern):
            return float(value)
    value = config.get(f"{component}.lora_alpha")
    return None if value is None else float(value)


def _modules(path: Path) -> dict[str, dict]:
    """stem → {param: tensor} for kohya keys; PEFT keys mapped to kohya stems, their alpha from the config."""
    tensors = load_file(str(path))
    config = json.loads(metadata_of(path).get("lora_adapter_metadata", "{}"))
    modules: dict[str, dict] = defaultdict(dict)
    for key, tensor in tensors.items():
        if key.startswith("lora_"):
            stem, _, param = key.partition(".")
        else:  # PEFT: <component>.<dotted path>.lora_A.weight
            head, _, rest = key.partition(".")
            dotted, _, tail = rest.rpartition(".lora_")
            component = {"unet": "unet", "text_encoder": "te", "text_encoder_2": "te2"}[head]
            stem = f"lora_{component}_" + dotted.replace(".", "_")
            param = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[tail]
            alpha = _peft_alpha(config, head, dotted)
            if alpha is not None:
                modules[stem]["peft_alpha"] = alpha
        modules[stem][param] = tensor
    return modules


def _rank_alpha_conv(params: dict) -> tuple[int | None, float | None, bool]:
    if "lora_down.weight" in params:
        down = params["lora_down.weight"]
        rank = down.shape[0]
        conv = "lora_mid.weight" in params or (down.dim() == 4 and down.shape[2] * down.shape[3] > 1)
    elif "hada_w1_b" in params:
        rank, conv = params["hada_w1_b"].shape[0], False
    elif "lokr_w2_a" in params:
        rank, conv = params["lokr_w2_a"].shape[1], False
    else:
        return None, None, False
    alpha = float(params["alpha"]) if "alpha" in params else params.get("peft_alpha", float(rank))
    return rank, alpha, conv


def expected_blocks(path: str | Path, arch: str) -> dict[str, dict]:
    """Block → {"plain": {(rank, alpha)…}, "conv": {…}, "rankless": bool} for every block holding a module."""
    path = Path(path)
    blocks: dict[str, dict] = {}
    for stem, params in _modules(path).items():
        te2_as_te1 = stem.replace("lora_te_", "lora_te1_") if arch == "sdxl" else stem
        block = block_of(stem, arch) or block_of(te2_as_te1, arch)
        if block is None:
            continue
        rank, alpha, conv = _rank_alpha_conv(params)
        entry = blocks.setdefault(block, {"plain": set(), "conv": set(), "rankless": False})
        if rank is None:
            entry["rankless"] = True
        else:
            entry["conv" if conv else "plain"].add((rank, alpha))
    return blocks


def assert_spec_matches_file(path: str | Path, arch: str) -> BlockSpec:
    """The file's `blora_spec` reads back with `BlockSpec.from_json` and states exactly its blocks, ranks, alphas."""
    spec = BlockSpec.from_json(metadata_of(path)["blora_spec"])
    assert spec.arch.value == arch
    expected = expected_blocks(path, arch)
    for block, setting in spec.blocks.items():
        entry = expected.get(block, {"plain": set(), "conv": set(), "rankless": False})
        for pairs, rank, alpha in ((entry["plain"], setting.rank, setting.alpha), (entry["conv"], setting.conv_rank, setting.conv_alpha)):
            if pairs:
                top = max(r for r, _ in pairs)
                assert rank == top, (block, pairs, setting)
                assert (rank, alpha) in pairs, (block, pairs, setting)
            else:
                assert rank == 0, (block, setting)
        assert setting.mixed == (len(entry["plain"]) > 1 or len(entry["conv"]) > 1), (block, entry, setting)
        assert setting.rankless == entry["rankless"], (block, setting)
        assert setting.trained == (block in expected), block
    return spec
