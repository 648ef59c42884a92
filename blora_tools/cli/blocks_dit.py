"""`blora-tools blocks --arch flux|sd3`: the diffusion-transformer block table and its exports.

The table lists the groups (double/single or joint blocks, BASE, the text encoders), the words sub-selectors
use inside a block, kohya's block arguments, the research presets with their sources and the weight vector
lengths users paste from other tools. Exports turn weights into kohya's `train_*_block_indices`, a weight
vector or diffusers module names (`taxonomy.weights`).
"""

from __future__ import annotations

import click
from rich.text import Text

from blora_tools.cli import output
from blora_tools.taxonomy.arch import Arch
from blora_tools.taxonomy.blocks import OTHER, table
from blora_tools.taxonomy.dit import block_leaves, dit_record
from blora_tools.taxonomy.encoders import T5Encoder
from blora_tools.taxonomy.selectors import RESEARCH_PRESETS
from blora_tools.taxonomy.weights import (
    BlockWeights,
    dit_vectors,
    to_dit_diffusers,
    to_dit_vector,
    to_kohya_dit_indices,
)

_KOHYA_ARGUMENT = {"double": "train_double_block_indices", "single": "train_single_block_indices",
                   "joint": "train_block_indices"}


def _words(arch: Arch, block: str | None) -> list[str]:
    """The words a sub-selector may use inside `block` (None: the layers outside the blocks)."""
    return sorted({tag for leaf in block_leaves(arch, block) for tag in leaf.tags})


def dit_table(arch: Arch) -> dict:
    """The block table of a Flux.1/SD3 family as JSON: groups, every block, presets, vector lengths."""
    layout = table(arch)
    groups: dict[str, dict] = {}
    for encoder in dit_record(arch).text_encoders:
        te = encoder.component.value
        kind = "T5" if isinstance(encoder, T5Encoder) else "CLIP"
        groups[te] = {"blocks": [te], "words": [], "kohya": f"lora_{te}_ ({kind})"}
    for group, members in layout.group_members.items():
        groups[group] = {"blocks": list(members), "words": _words(arch, members[0]),
                         "kohya": f"{_KOHYA_ARGUMENT[group]}=0-{len(members) - 1}"}
    groups["base"] = {"blocks": [OTHER], "words": _words(arch, None), "kohya": None}
    blocks = [{"block": b, "group": layout.group_of(b), "kohya_index": i,
               "parts": [leaf.name for leaf in block_leaves(arch, b)]} for i, b in enumerate(layout.unet_lbw)]
    presets = {name: {"selector": sel, "source": source} for name, (sel, source) in RESEARCH_PRESETS.get(arch.value, {}).items()}
    vectors = {str(n): {"values": [list(t) for t in terms], "unnamed": keep, "source": source}
               for n, (terms, keep, source) in sorted(dit_vectors(layout).items())}
    base = [c.value for c in layout.text_encoders] + ["base layers (embedders, final layer)"]
    return {"arch": arch.value, "base": base, "groups": groups, "blocks": blocks, "presets": presets, "vectors": vectors}


def show_dit_table(app, arch: Arch, as_json: bool) -> None:
    doc = dit_table(arch)
    if as_json:
        output.print_json(app, doc)
        return
    rows = []
    for group, g in doc["groups"].items():
        members = g["blocks"]
        if group == "base":
            name = "base layers"
        else:
            name = members[0] if len(members) == 1 else f"{members[0]}–{members[-1]} ({len(members)})"
        rows.append([group, name, " ".join(g["words"]) or "—"])
    app.out.print(output.table(f"{arch.value} blocks", ["group", "blocks", "sub-selector words"], rows))
    example = "D05.img.q, S10.linear1.mlp, D00-D18.txt" if arch is Arch.FLUX else "J03.ctx, J02.x.attn2, J00-J09.x.q"
    app.out.print(Text(f"BASE = {', '.join(doc['base'])} (Inspire-Pack's BASE). "
                       f"Sub-selectors BLOCK.word[.word] choose rows of fused layers: {example}"))
    kohya = ", ".join(g["kohya"] for g in doc["groups"].values() if g["kohya"])
    app.out.print(Text(f"kohya: {kohya}"))
    if doc["presets"]:
        app.out.print(Text("research presets (they hold as far as their sources show):", style="bold"))
        for name, p in doc["presets"].items():
            app.out.print(Text(f"  {name} = {p['selector']}: {p['source']}"))
    app.out.print(Text("weight vectors (every value by absolute block index, whatever blocks a file holds):", style="bold"))
    for n, v in doc["vectors"].items():
        app.out.print(Text(f"  {n:>2} values: {v['source']}"))


def export_dit(app, weights: BlockWeights, as_format: str, length: int | None, as_json: bool) -> None:
    """Print weights in one convention: table (a grid), kohya block arguments, a vector, diffusers names."""
    if as_format == "kohya":
        arguments = to_kohya_dit_indices(weights)
        if as_json:
            output.print_json(app, arguments)
        else:
            click.echo(" ".join(f"{k}={v}" for k, v in arguments.items()))
        layout = table(weights.arch)
        outside = [b for b in (*(c.value for c in layout.text_encoders), OTHER) if weights.values[b] == 0.0]
        if outside:
            output.note(app, "kohya's block indices do not cover the text encoders and base layers: train them "
                             "or not with its own flags (--network_train_unet_only, train_t5xxl, in_dims)")
        return
    if as_format == "lbw-short":
        raise click.UsageError("Flux/SD3 vectors are chosen with --as lbw --length N")
    if as_format == "lbw":
        values = to_dit_vector(weights, length)
        if as_json:
            output.print_json(app, values)
        else:
            click.echo(",".join(output.number(v) for v in values))
        return
    if as_format == "diffusers":
        output.print_json(app, to_dit_diffusers(weights))
        return
    _show_weights(app, weights, as_json)


def _show_weights(app, weights: BlockWeights, as_json: bool) -> None:
    layout = table(weights.arch)
    if as_json:
        parts = {a.replace(":", "."): w for a, w in weights.parts.items()}
        output.print_json(app, {"arch": weights.arch.value, "weights": dict(weights.values), "parts": parts})
        return
    outside = [[b if b != OTHER else "base layers", output.number(weights.values[b])] for b in layout.blocks if b not in layout.unet_lbw]
    app.out.print(output.table(f"{weights.arch.value} weights", ["block", "weight"], outside, right=(1,)))
    app.out.print(output.block_grid(None, layout.group_members.values(), lambda b: output.number(weights.values[b])))
    for atom, w in sorted(weights.parts.items()):
        app.out.print(Text(f"{atom.replace(':', '.')} = {output.number(w)}"))

