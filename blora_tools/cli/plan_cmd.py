"""`blora-tools plan`: what a training configuration would create, per block, without a model."""

from __future__ import annotations

import click

from blora_tools.cli import output
from blora_tools.cli.params import FINITE_FLOAT, MAX_RANK
from blora_tools.taxonomy.arch import KNOWN_ARCHS


@click.command("plan")
@click.option("--arch", "arch_name", type=click.Choice([a.value for a in KNOWN_ARCHS]), required=True, help="Architecture to plan for.")
@click.option("--network-args", default="", help='The --network_args you would give sd-scripts, e.g. "preset=style conv_dim=8".')
@click.option("--network-dim", type=click.IntRange(1, MAX_RANK), default=None, help="The trainer's --network_dim (default 4).")
@click.option("--network-alpha", type=FINITE_FLOAT, default=None, help="The trainer's --network_alpha (default 1).")
@click.option("--variant", type=click.Choice(["sd3-medium", "sd3.5-medium", "sd3.5-large"]), default=None,
              help="SD3 family member (default sd3.5-large): depth and SD3.5 Medium's attn2 blocks.")
@click.option("--json", "as_json", is_flag=True, help='Print {"arch", "blocks": {group: {"modules", "params", …}}, "total", "warnings"}.')
@click.pass_obj
def plan_cmd(app, arch_name: str, network_args: str, network_dim: int | None, network_alpha: float | None,
             variant: str | None, as_json: bool) -> None:
    """Show the modules and trainable parameters training would create, per block.

    Builds the full-size U-Net and text encoders on PyTorch's meta device (no weights, no memory) and
    resolves the arguments exactly as `kohya_plugin.blockwise` does in training: a configuration training
    would reject fails here with the same message, before a multi-hour run.

    \b
    Examples:
      blora-tools plan --arch sd1 --network-args "preset=style"
      blora-tools plan --arch sdxl --network-args "preset=style conv_dim=8 conv_alpha=4"
      blora-tools plan --arch sd1 --network-dim 16 --network-args "block_ranks=in0=32,out3=32 te_dim=0" --json
      blora-tools plan --arch flux --network-dim 16 --network-args "block_ranks=double=8,S10-S37=32"
      blora-tools plan --arch sd3 --variant sd3.5-medium --network-args "blocks=J00-J12 split_qkv=true"

    On Flux.1 and SD3 the table has one row per block (D00…S37, J00…, BASE = embedders and final layers).
    """
    from kohya_plugin.plan import plan_network

    if variant is not None and arch_name != "sd3":
        raise click.UsageError("--variant is for --arch sd3")
    plan = plan_network(arch_name, network_args, network_dim, network_alpha, variant)
    doc = plan.to_dict()
    if as_json:
        output.print_json(app, doc)
        output.warn_all(app, doc["warnings"])
        return
    total = max(doc["total"]["params"], 1)
    rows = []
    for group, b in doc["blocks"].items():
        rank = b.get("rank", "")
        conv = b.get("conv_rank", "")
        rows.append([
            group, b["modules"] or "·", rank if rank else "·", conv if conv else "·",
            b.get("lr_weight", ""), f"{b['params']:,}" if b["params"] else "", output.bar(b["params"] / total),
        ])
    app.out.print(output.table(f"{arch_name} · {doc['algo']} · {network_args or '(defaults)'}", ["block", "modules", "rank", "conv rank", "lr ×", "params", ""], rows, right=(1, 2, 3, 4, 5)))
    app.out.print(f"total: {doc['total']['modules']} modules, {doc['total']['params']:,} trainable parameters")
    output.warn_all(app, doc["warnings"])
