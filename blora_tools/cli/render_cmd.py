"""`blora-tools render`: images and labelled grids of adapters on your own model (diffusers)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from rich.text import Text

from blora_tools.cli import output
from blora_tools.cli.params import FINITE_FLOAT
from blora_tools.errors import BloraError, SelectorError
from blora_tools.render import DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_STEPS, DTYPES, SAMPLERS
from blora_tools.render.grid import Axis, LoraArg


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


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not m:
        raise SelectorError(f"{text!r} is not WIDTHxHEIGHT, e.g. 512x768")
    width, height = int(m.group(1)), int(m.group(2))
    if width < 8 or height < 8 or width % 8 or height % 8:
        raise SelectorError(f"{text!r}: width and height must be multiples of 8 (at least 8)")
    return width, height


LORA = _FromText("[NAME=]FILE[:W][@BLOCKS]", LoraArg.from_text)
AXIS = _FromText("AXIS", Axis.from_text)
SIZE = _FromText("WxH", _size)


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
@click.option("--sampler", type=click.Choice(list(SAMPLERS)), default=DEFAULT_SAMPLER, show_default=True)
@click.option("--size", type=SIZE, default=None, help="WIDTHxHEIGHT, multiples of 8 [default: the model's own size].")
@click.option("--grid-x", "grid_x", type=AXIS, default=None, help="Vary this across columns (see AXES above).")
@click.option("--grid-y", "grid_y", type=AXIS, default=None, help="Vary this down rows (see AXES above).")
@click.option("--device", default="auto", show_default=True, help="auto (a CUDA GPU when present), cpu, cuda, cuda:1, mps.")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="auto: fp16 on a GPU, fp32 on the CPU.")
@click.option("-o", "--output", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The .png to write.")
@click.option("--force", is_flag=True, help="Replace the output (and its .json) if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Also write OUTPUT.json: every cell's box, labels and settings.")
@click.option("--dry-run", is_flag=True, help="Show the cells and the blocks each adapter is applied to; load no model.")
@click.pass_obj
def render_cmd(app, model_path: Path, config, loras, prompt, negative, seed, steps, cfg, sampler, size,
               grid_x, grid_y, device, dtype, out_path: Path, force, as_json, dry_run) -> None:
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
    """
    from blora_tools.adapter.model import open_adapter
    from blora_tools.render.grid import CellSettings, LoraUse, check_image_output, plan_grid, resolve_plan

    names = [a.name for a in loras]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise BloraError(f"two adapters are named {duplicate!r}; name them with --lora NAME=FILE")
    targets = check_image_output(out_path, force, with_json=as_json and not dry_run,
                                 inputs=[model_path, *(a.path for a in loras)])
    from blora_tools.inputs import refuse_special_file

    for given, what in ((model_path, "a model folder or checkpoint"), (config, "a config folder")):
        if given is not None:
            refuse_special_file(given, BloraError, what)
    if not dry_run and not model_path.exists():
        raise BloraError("model not found; give a diffusers folder (with model_index.json) or a .safetensors checkpoint", model_path)
    adapters = {a.name: open_adapter(a.path) for a in loras}
    archs = {a.arch.value for a in adapters.values()}
    if len(archs) > 1:
        raise BloraError(f"adapters of different model families given ({', '.join(sorted(archs))}); use one family")
    base = CellSettings(prompt, negative, seed, steps, cfg, tuple(LoraUse(a.name, a.weight, a.selector) for a in loras))
    plan = plan_grid(base, grid_x, grid_y)
    selections, warnings = resolve_plan(plan, adapters)
    for adapter in adapters.values():
        output.warn_all(app, (f"{adapter.path.name}: {w}" for w in adapter.warnings))
    output.warn_all(app, warnings)
    if dry_run:
        _show_plan(app, plan, selections, adapters)
        return

    from blora_tools.adapter.writer import write_bytes_atomic as write_atomic
    from blora_tools.render.grid import dumps, json_path_for, png_bytes
    from blora_tools.render.pipeline import check_arch, load_model, peek_arch, render_grid

    arch = peek_arch(model_path, config)
    if arch is not None:  # refuse an adapter of another family before a long load
        for adapter in adapters.values():
            check_arch(adapter, arch)
    output.note(app, f"loading {model_path}")
    model = load_model(model_path, config=config, device=device, dtype=dtype, sampler=sampler)
    width, height = size or model.default_size()
    output.note(app, f"{model.arch.value} model on {model.device} ({model.dtype_name}), {width}x{height}, "
                     f"{len(plan.cells)} cell(s), {sampler}")
    with output.progress(app, f"rendering {len(plan.cells)} cell(s)", plan.total_steps) as advance:
        grid, doc = render_grid(model, plan, adapters, selections, (width, height), on_step=advance)
    write_atomic(targets[0], png_bytes(grid, doc), force=force)
    if as_json:
        write_atomic(json_path_for(out_path), (dumps(doc) + "\n").encode(), force=force)
    written = " and ".join(str(t) for t in targets)
    app.out.print(Text(f"wrote {written} ({grid.width}x{grid.height}, {len(plan.cells)} cell(s), {doc['render_s']:.1f} s)"))


def _show_plan(app, plan, selections, adapters) -> None:
    rows = []
    for (name, selector), s in selections.items():
        rows.append([name, selector, s.to_json(adapters[name].arch)["resolved"], len(s.stems),
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
