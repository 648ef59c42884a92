"""`blora-tools render`: images and labelled grids of adapters on your own model (diffusers)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import click

from rich.text import Text

from blora_tools.cli import output
from blora_tools.cli.params import FINITE_FLOAT
from blora_tools.errors import SelectorError
from blora_tools.render import DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_STEPS, DTYPES, KEEP_ORIGINALS, SAMPLERS
from blora_tools.render.args import Axis, LoraArg, parse_size


class _FromText(click.ParamType):
    def __init__(self, name: str, build):
        self.name = name
        self._build = build

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            return self._build(value)
        except SelectorError as err:
            self.fail(err.message, param, ctx)


LORA = _FromText("[NAME=]FILE[:W][@BLOCKS]", LoraArg.from_text)
AXIS = _FromText("AXIS", Axis.from_text)
SIZE = _FromText("WxH", parse_size)


@click.command("render")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="Base model: a diffusers folder (model_index.json) or a single-file .safetensors checkpoint.")
@click.option("--config", type=click.Path(path_type=Path, file_okay=False),
              help="For a single-file checkpoint offline: a diffusers folder with the components' configs.")
@click.option("--lora", "loras", multiple=True, type=LORA,
              help="An adapter, repeatable: [NAME=]FILE[:WEIGHT][@BLOCKS], e.g. style.safetensors:0.8@upper. NAME (used by "
                   "the axes) defaults to the file stem with characters other than letters, digits and _.+- made _; "
                   "WEIGHT to 1; BLOCKS (a selector) to all.")
@click.option("--prompt", required=True, help="The prompt.")
@click.option("--negative", default="", help="The negative prompt.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True, help="Noise seed (CPU generator).")
@click.option("--steps", type=click.IntRange(1, 1000), default=DEFAULT_STEPS, show_default=True, help="Denoising steps.")
@click.option("--cfg", type=FINITE_FLOAT, default=DEFAULT_CFG, show_default=True, help="Classifier-free guidance scale.")
@click.option("--sampler", type=click.Choice(list(SAMPLERS)), default=DEFAULT_SAMPLER, show_default=True,
              help="SD1/SD2/SDXL scheduler; Flux.1 and SD3 keep their own flow-matching scheduler.")
@click.option("--size", type=SIZE, default=None, help="WIDTHxHEIGHT, multiples of 8 [default: the model's own size].")
@click.option("--grid-x", "grid_x", type=AXIS, default=None, help="Vary this across columns (see AXES above).")
@click.option("--grid-y", "grid_y", type=AXIS, default=None, help="Vary this down rows (see AXES above).")
@click.option("--device", default="auto", show_default=True, help="auto (a CUDA GPU when present), cpu, cuda, cuda:1, mps.")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="auto: fp16 on a GPU, fp32 on the CPU.")
@click.option("--keep-originals", type=click.Choice(KEEP_ORIGINALS), default="auto", show_default=True,
              help="Where the base weights of the layers adapters change wait while a cell renders, to be put back "
                   "bit for bit: 'device' leaves them on the GPU (no copying, fastest, but those layers take twice "
                   "their memory); 'host' copies them to CPU memory and back at each change of adapters (slower, "
                   "the GPU holds one extra layer at a time); auto: device when they fit in the GPU's free memory "
                   "with a margin, else host; on the CPU, device (its memory is the host's: a copy gains nothing).")
@click.option("-o", "--output", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The .png to write.")
@click.option("--force", is_flag=True, help="Replace the output (and its .json) if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Also write OUTPUT.json: every cell's box, labels and settings.")
@click.option("--dry-run", is_flag=True, help="Show the cells and the blocks each adapter is applied to; load no model.")
@click.pass_obj
def render_cmd(app, model_path: Path, config, loras, prompt, negative, seed, steps, cfg, sampler, size,
               grid_x, grid_y, device, dtype, keep_originals, out_path: Path, force, as_json, dry_run) -> None:
    """Render PROMPT on your model with adapters applied exactly as their files define them, one image or
    a labelled grid (one PNG) that compares blocks, weights, seeds or prompts.

    Each adapter's ΔW is merged into a copy of the touched layers in float32 and cast back; cells swap
    adapters without reloading the model, and the base weights are restored bit for bit.

    \b
    AXES (--grid-x / --grid-y; values separated by '|', numbers also by ','):
      NAME@SEL|SEL|…       blocks of adapter NAME: any selector; 'none' renders without it
      weight:NAME@W,W,…    weights of adapter NAME
      lora:NAME|NAME|none  which adapter is on (the others in the list off)
      seed:S,S,…   prompt:P|P|…   cfg:C,C,…   steps:N,N,…

    \b
    Examples:
      blora-tools render --model ./sd15 --lora style.safetensors --prompt "a cat" --seed 7 -o cat.png
      # the paper's ablation: style adapter on upper / middle / bottom / all blocks, three seeds
      blora-tools render --model ./sd15 --lora style=style.safetensors --prompt "a cat" \\
          --grid-x "style@none|upper|middle|bottom|all" --grid-y seed:1,2,3 -o ablation.png --json
      # character on all blocks, style's weight swept
      blora-tools render --model ./sdxl --lora char.safetensors --lora style.safetensors:0.8@style \\
          --prompt "sks person, watercolor" --grid-x weight:style@0,0.5,1 -o sweep.png
      # block-wise inference (one file, upper blocks) beside block-wise training (a file trained on them)
      blora-tools render --model ./sd15 --lora all=style.safetensors --lora inference=style.safetensors@upper \\
          --lora trained=style_upper.safetensors --prompt "a cat" --grid-x "lora:none|all|inference|trained" -o f.png
      # a single-file checkpoint offline: its configs from a local diffusers folder
      blora-tools render --model v1-5.safetensors --config ./sd15-configs --prompt "a cat" -o cat.png
      # Flux.1 (a FluxPipeline folder): double vs single blocks, and SplitFlux's style blocks
      blora-tools render --model ./flux-dev --lora s=style.safetensors --prompt "a cat" --cfg 3.5 \
          --grid-x "s@none|double|single|splitflux-style" -o flux.png
    """
    from blora_tools.render.run import RenderRequest, render

    request = RenderRequest(
        model=model_path, output=out_path, prompt=prompt, loras=tuple(loras), negative=negative, seed=seed,
        steps=steps, cfg=cfg, sampler=sampler, size=size, grid_x=grid_x, grid_y=grid_y, config=config,
        device=device, dtype=dtype, force=force, write_json=as_json, keep_originals=keep_originals,
    )
    result = render(request, dry_run=dry_run, on_warning=partial(output.warn, app), on_note=partial(output.note, app),
                    progress=partial(output.progress, app))
    if dry_run:
        _show_plan(app, result)
        return
    written = " and ".join(str(t) for t in result.written)
    width, height = result.image_size
    cells = len(result.plan.cells)
    app.out.print(Text(f"wrote {written} ({width}x{height}, {cells} cell(s), {result.doc['render_s']:.1f} s, "
                       f"originals kept on the {result.doc['keep_originals']})"))


def _show_plan(app, result) -> None:
    """The dry run's tables: what each selector resolves to, and every cell's adapters."""
    plan = result.plan
    rows = []
    for (name, selector), s in result.selections.items():
        rows.append([name, selector, s.to_json(result.adapters[name].arch)["resolved"], len(s.stems),
                     ", ".join(s.empty_groups)])
    if rows:
        app.out.print(output.table("blocks", ["adapter", "selector", "resolved", "modules", "empty"], rows, right=(3,)))
    cell_rows = []
    for cell in plan.cells:
        active = [f"{u.name}:{u.weight:g}@{u.selector}" for u in cell.settings.adapter_state]
        cell_rows.append([cell.col, cell.row, cell.x_label or "", cell.y_label or "", cell.settings.seed,
                          ", ".join(active) or "(base model)"])
    app.out.print(output.table(f"{len(plan.cells)} cell(s), {plan.columns}x{plan.rows}",
                               ["col", "row", "x", "y", "seed", "adapters"], cell_rows, right=(0, 1, 4)))
