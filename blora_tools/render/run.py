"""`render`: check a render request, plan its cells, and — unless it is a dry run — load the model, render every
cell and write the PNG (and its JSON map).

Every check that can fail runs before the model loads: adapter names, the output files, the model path, the
adapters' model family (also against the model's, when it can be read without loading), the axes and the
selectors. A dry run stops after planning and imports neither torch's models nor diffusers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from blora_tools.errors import BloraError
from blora_tools.render import DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_STEPS, check_keep_originals
from blora_tools.render.args import Axis, LoraArg
from blora_tools.render.files import check_image_output
from blora_tools.render.plan import CellSettings, GridPlan, LoraUse, Selection, plan_grid, resolve_plan

if TYPE_CHECKING:
    from blora_tools.adapter.model import Adapter

Progress = Callable[[str, int], AbstractContextManager[Callable[[], None]]]
"""`progress(description, total)`: a context manager yielding `advance()`, called once per denoising step."""


@dataclass(frozen=True)
class RenderRequest:
    """What to render and where: the command line of `blora-tools render`, parsed."""

    model: Path
    output: Path
    prompt: str
    loras: tuple[LoraArg, ...] = ()
    negative: str = ""
    seed: int = 0
    steps: int = DEFAULT_STEPS
    cfg: float = DEFAULT_CFG
    sampler: str = DEFAULT_SAMPLER
    size: tuple[int, int] | None = None
    """(width, height); None: the model's own size."""
    grid_x: Axis | None = None
    grid_y: Axis | None = None
    config: Path | None = None
    """For a single-file checkpoint offline: a diffusers folder with the components' configs."""
    device: str = "auto"
    dtype: str = "auto"
    force: bool = False
    write_json: bool = False
    """Also write the cell map as OUTPUT.json."""
    keep_originals: str = "auto"
    """Where the touched layers' original weights wait while cells render: auto, device or host
    (`pipeline.keep_originals_where`)."""


@dataclass
class RenderResult:
    """The plan of a render and, unless it was a dry run, what it wrote."""

    plan: GridPlan
    adapters: dict[str, Adapter]
    selections: dict[tuple[str, str], Selection]
    written: list[Path] = field(default_factory=list)
    image_size: tuple[int, int] | None = None
    doc: dict | None = None
    """The cell map (schema blora-render/1), also in the PNG's `blora-render` text chunk."""


@contextmanager
def _no_progress(_description: str, _total: int) -> Iterator[Callable[[], None]]:
    yield lambda: None


def render(
    request: RenderRequest,
    *,
    dry_run: bool = False,
    on_warning: Callable[[str], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> RenderResult:
    """Check `request`, plan it and (unless `dry_run`) render it and write the PNG.

    Warnings (an adapter's own, selected groups where an adapter has no modules) go to `on_warning` before
    anything loads; `on_note` gets what is being done. Raises BloraError (or a subclass) with a one-line
    message on bad input, before any output is written.
    """
    from blora_tools.adapter.model import open_adapter
    from blora_tools.inputs import refuse_special_file

    warn = on_warning or (lambda _message: None)
    note = on_note or (lambda _message: None)
    check_keep_originals(request.keep_originals)
    names = [a.name for a in request.loras]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise BloraError(f"two adapters are named {duplicate!r}; name them with --lora NAME=FILE")
    targets = check_image_output(request.output, request.force, with_json=request.write_json and not dry_run,
                                 inputs=[request.model, *(a.path for a in request.loras)])
    for given, what in ((request.model, "a model folder or checkpoint"), (request.config, "a config folder")):
        if given is not None:
            refuse_special_file(given, BloraError, what)
    if not dry_run and not request.model.exists():
        raise BloraError("model not found; give a diffusers folder (with model_index.json) or a .safetensors checkpoint",
                         request.model)
    adapters = {a.name: in_pipeline_naming(open_adapter(a.path)) for a in request.loras}
    archs = {a.arch.value for a in adapters.values()}
    if len(archs) > 1:
        raise BloraError(f"adapters of different model families given ({', '.join(sorted(archs))}); use one family")
    base = CellSettings(request.prompt, request.negative, request.seed, request.steps, request.cfg,
                        tuple(LoraUse(a.name, a.weight, a.selector) for a in request.loras))
    plan = plan_grid(base, request.grid_x, request.grid_y)
    selections, warnings = resolve_plan(plan, adapters)
    for adapter in adapters.values():
        for message in adapter.warnings:
            warn(f"{adapter.path.name}: {message}")
    for message in warnings:
        warn(message)
    result = RenderResult(plan, adapters, selections)
    if dry_run:
        return result
    return _render(request, result, targets, note, progress or _no_progress)


def in_pipeline_naming(adapter: "Adapter") -> "Adapter":
    """A Flux.1/SD3 adapter in diffusers' split naming (`ops.dit_naming.in_naming`, ΔW unchanged), the naming of
    the pipelines render loads: every row part a sub-selector names is then a whole layer. Others as they are."""
    from blora_tools.taxonomy.arch import is_dit

    if not is_dit(adapter.arch):
        return adapter
    from blora_tools.ops.dit_naming import in_naming
    from blora_tools.taxonomy.dit import DIFFUSERS

    return in_naming(adapter, DIFFUSERS)


def _render(request: RenderRequest, result: RenderResult, targets: list[Path], note, progress: Progress) -> RenderResult:
    """Load the model, render the planned cells and write `targets` (the PNG, then the JSON map)."""
    from blora_tools.adapter.writer import write_bytes_atomic
    from blora_tools.render.files import dumps, png_bytes
    from blora_tools.render.pipeline import check_arch, load_model, peek_arch, render_grid

    arch = peek_arch(request.model, request.config)
    if arch is not None:  # refuse an adapter of another family before a long load
        for adapter in result.adapters.values():
            check_arch(adapter, arch)
    note(f"loading {request.model}")
    model = load_model(request.model, config=request.config, device=request.device, dtype=request.dtype,
                       sampler=request.sampler)
    width, height = request.size or model.default_size()
    cells = len(result.plan.cells)
    note(f"{model.arch.value} model on {model.device} ({model.dtype_name}), {width}x{height}, {cells} cell(s), "
         f"{request.sampler}")
    with progress(f"rendering {cells} cell(s)", result.plan.total_steps) as advance:
        grid, doc = render_grid(model, result.plan, result.adapters, result.selections, (width, height),
                                on_step=advance, keep_originals=request.keep_originals)
    write_bytes_atomic(targets[0], png_bytes(grid, doc), force=request.force)
    if request.write_json:
        write_bytes_atomic(targets[1], (dumps(doc) + "\n").encode(), force=request.force)
    result.written = targets
    result.image_size = grid.size
    result.doc = doc
    return result
