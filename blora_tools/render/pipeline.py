"""Load a diffusers pipeline once, put adapters' ΔW into it per cell, take them out again, render.

How an adapter is applied (the same for SD1, SD2, SDXL, Flux.1 and SD3, and for every kind the file model
reads): for each touched layer, W' = cast(float32(W) + Σ mᵢ·ΔWᵢ) where ΔWᵢ is the module's dense ΔW exactly as
`adapter.kinds.delta_weight` defines it (scale = alpha/rank folded in) and mᵢ the user's weight. The layer's
parameter then holds W' and W is kept aside, either where it is (the tensor object itself: no copy, but every
touched weight is on the device twice while a cell renders) or as a copy in host memory (`WeightPatcher`,
`keep_originals_where`: when the device lacks room for the second copy); removing the adapters puts W back, so
the base weights are bit-identical by construction.

Flux.1 and SD3 adapters arrive in diffusers' split naming (`render.run` presents them so through
`ops.dit_naming.in_naming`), the naming of the pipelines' layers.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from blora_tools.adapter.formats import stem_from_path
from blora_tools.adapter.layers import layer_id
from blora_tools.adapter.kinds import Kind, delta_weight, lora_factors
from blora_tools.adapter.model import Adapter, Module
from blora_tools.errors import AdapterFileError, BloraError
from blora_tools.inputs import read_text_bounded
from blora_tools.jsonio import loads_strict
from blora_tools.render import DEFAULT_SAMPLER, SAMPLERS, check_keep_originals
from blora_tools.render.draw import draw_grid
from blora_tools.render.files import grid_map
from blora_tools.render.plan import Cell, CellSettings, GridPlan, Selection
from blora_tools.taxonomy.arch import Arch

__all__ = [
    "RenderModel",
    "AttachedAdapter",
    "WeightPatcher",
    "keep_originals_where",
    "touched_bytes",
    "load_model",
    "pipeline_arch",
    "attach_adapter",
    "check_arch",
    "peek_arch",
    "merged_weights",
    "render_cell",
    "cell_uses",
    "render_plan",
    "render_grid",
    "resolve_device",
    "resolve_dtype",
]

_PIPELINES = frozenset({"StableDiffusionPipeline", "StableDiffusionXLPipeline", "FluxPipeline", "StableDiffusion3Pipeline"})
_DIT_PIPELINES = MappingProxyType({"FluxPipeline": Arch.FLUX, "StableDiffusion3Pipeline": Arch.SD3})
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_CONFIG_HINT = (
    "pass --config FOLDER: a local diffusers folder of the same model family (model_index.json plus the "
    "config and tokenizer files of each component; weights are not needed), e.g. a copy of "
    "stable-diffusion-v1-5 or stable-diffusion-xl-base-1.0 from the Hugging Face cache"
)


# --- device and dtype -----------------------------------------------------------------------------


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` → the first CUDA GPU when present, else the CPU; otherwise the device named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BloraError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BloraError(f"--device {name}: this torch has no CUDA device; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` → float16 on a GPU, float32 on the CPU; else fp32 / fp16 / bf16."""
    if name == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if name not in _DTYPES:
        raise BloraError(f"--dtype {name!r}: use auto, fp32, fp16 or bf16")
    return _DTYPES[name]


# --- loading --------------------------------------------------------------------------------------


@dataclass
class RenderModel:
    """A loaded pipeline and the index of its adaptable layers by kohya stem (diffusers-style names)."""

    pipe: object
    arch: Arch
    device: torch.device
    dtype: torch.dtype
    source: Path
    layers: dict[str, nn.Module]
    sampler: str = DEFAULT_SAMPLER

    @property
    def dtype_name(self) -> str:
        return _DTYPE_NAMES.get(self.dtype, str(self.dtype))

    @classmethod
    def from_pipeline(cls, pipe, sampler: str | None = DEFAULT_SAMPLER, source: str | Path = "<in memory>") -> "RenderModel":
        """Wrap a pipeline already loaded (StableDiffusionPipeline, StableDiffusionXLPipeline, FluxPipeline or
        StableDiffusion3Pipeline); with `sampler`, its scheduler is replaced by that sampler's (None keeps the
        pipeline's; Flux.1 and SD3 always keep their flow-matching scheduler)."""
        class_name = type(pipe).__name__
        if class_name not in _PIPELINES:
            raise BloraError(f"{class_name} is not supported: {_SUPPORTED}")
        if class_name in _DIT_PIPELINES:
            sampler = None
        if sampler is not None:
            if sampler not in SAMPLERS:
                raise BloraError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
            pipe.scheduler = _scheduler(sampler, pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        denoiser = _denoiser(pipe)
        model = cls(pipe, pipeline_arch(pipe), denoiser.device, denoiser.dtype, Path(source), {}, sampler or "")
        model.layers = _layer_index(model)
        return model

    def default_size(self) -> tuple[int, int]:
        """(width, height) the model was trained at: the denoiser's sample size × VAE scale factor."""
        sample = getattr(self.pipe, "default_sample_size", None) if self.arch in (Arch.FLUX, Arch.SD3) else None
        side = int(sample or self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)
        return side, side

    def components(self) -> dict[str, nn.Module]:
        """The networks adapters can touch: the denoiser (`unet`) and the text encoders under their kohya
        component names (Flux.1: CLIP-L `te1`, T5 `te3`; SD3: `te1`, `te2`, `te3`)."""
        pipe = self.pipe
        found = {"unet": _denoiser(pipe)}
        if self.arch is Arch.FLUX:
            found |= {"te1": pipe.text_encoder, "te3": pipe.text_encoder_2}
        elif self.arch is Arch.SD3:
            found |= {"te1": pipe.text_encoder, "te2": pipe.text_encoder_2, "te3": pipe.text_encoder_3}
        elif self.arch is Arch.SDXL:
            found |= {"te1": pipe.text_encoder, "te2": pipe.text_encoder_2}
        else:
            found["te"] = pipe.text_encoder
        return {k: v for k, v in found.items() if v is not None}


_SUPPORTED = (
    "render needs a StableDiffusionPipeline (SD1/SD2), StableDiffusionXLPipeline (SDXL), FluxPipeline (Flux.1) or "
    "StableDiffusion3Pipeline (SD3/SD3.5) model"
)


def _denoiser(pipe) -> nn.Module:
    """The pipeline's U-Net, or its transformer (Flux.1, SD3)."""
    return pipe.transformer if type(pipe).__name__ in _DIT_PIPELINES else pipe.unet


def pipeline_arch(pipe) -> Arch:
    """The family of a loaded pipeline: Flux.1, SD3 and SDXL by pipeline class, else SD1 or SD2 from its U-Net's
    widths (`taxonomy.detect.arch_from_widths`)."""
    if type(pipe).__name__ in _DIT_PIPELINES:
        return _DIT_PIPELINES[type(pipe).__name__]
    config = pipe.unet.config
    return _family(type(pipe).__name__, config.cross_attention_dim, getattr(config, "use_linear_projection", False))


def _family(class_name: str, context_width, linear_projection) -> Arch:
    from blora_tools.taxonomy.detect import arch_from_widths

    candidates = (Arch.SDXL,) if class_name == "StableDiffusionXLPipeline" else (Arch.SD1, Arch.SD2)
    width = context_width if isinstance(context_width, int) else None
    return arch_from_widths(candidates, context_width=width, linear_projection=bool(linear_projection))[0]


@contextlib.contextmanager
def _quiet_loading():
    """Silence diffusers' and transformers' loading bars and info logs while a model loads."""
    import diffusers
    import transformers

    d_level = diffusers.utils.logging.get_verbosity()
    t_level = transformers.utils.logging.get_verbosity()
    d_bar = diffusers.utils.logging.is_progress_bar_enabled()
    t_bar = transformers.utils.logging.is_progress_bar_enabled()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # `torch_dtype` is deprecated in newer diffusers but the only spelling older ones know
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        diffusers.utils.logging.set_verbosity(d_level)
        transformers.utils.logging.set_verbosity(t_level)
        if d_bar:
            diffusers.utils.logging.enable_progress_bar()
        if t_bar:
            transformers.utils.logging.enable_progress_bar()


def _pipeline_class(name: str, where: Path):
    import diffusers

    if name not in _PIPELINES:
        raise BloraError(f"{name or 'an unknown pipeline'} is not supported: {_SUPPORTED}", where)
    return getattr(diffusers, name)


_CONFIG_LIMIT = 1 << 20
"""The largest model config JSON read (diffusers' are a few KB)."""


def _config(path: Path) -> dict:
    """A model config JSON object, read like every other input: a bounded regular file, strict JSON."""
    text = read_text_bounded(path, _CONFIG_LIMIT, BloraError, "a model config")
    try:
        doc = loads_strict(text)
    except ValueError as err:
        raise BloraError(f"is not valid JSON: {err}", path) from None
    if not isinstance(doc, dict):
        raise BloraError("is not a JSON object", path)
    return doc


def _class_in(folder: Path) -> str:
    return str(_config(folder / "model_index.json").get("_class_name", ""))


def _check_checkpoint(path: Path) -> None:
    """BloraError unless the file has a readable safetensors header."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        raise BloraError(f"not a readable .safetensors checkpoint ({err})", path) from None


def peek_arch(path: str | Path, config: str | Path | None = None) -> Arch | None:
    """The model family of a diffusers folder (or of `config`) from its JSON files alone, without loading
    weights; None when the files do not say."""
    folder = Path(config) if config is not None else Path(path)
    if not (folder / "model_index.json").is_file():
        return None
    class_name = _class_in(folder)
    if class_name in _DIT_PIPELINES:
        return _DIT_PIPELINES[class_name]
    if class_name == "StableDiffusionXLPipeline":
        return Arch.SDXL
    if class_name != "StableDiffusionPipeline":
        return None
    try:
        unet = _config(folder / "unet" / "config.json")
    except BloraError:
        return None
    return _family(class_name, unet.get("cross_attention_dim"), unet.get("use_linear_projection"))


def _extra_kwargs(class_name: str) -> dict:
    if class_name in _DIT_PIPELINES:
        return {}
    if class_name == "StableDiffusionXLPipeline":
        return {"add_watermarker": False}
    return {"safety_checker": None, "requires_safety_checker": False}


def load_model(
    path: str | Path,
    *,
    config: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    sampler: str = DEFAULT_SAMPLER,
) -> RenderModel:
    """Load a diffusers folder or a single-file `.safetensors` checkpoint (with `config`: a local diffusers
    folder giving the components' configs), offline, onto `device` in `dtype`, with `sampler`'s scheduler."""
    path = Path(path)
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        raise BloraError(f"render needs diffusers and transformers ({err}); pip install diffusers transformers") from None
    if not path.exists():
        raise BloraError("model not found; give a diffusers folder (with model_index.json) or a .safetensors checkpoint", path)
    if sampler not in SAMPLERS:
        raise BloraError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if config is not None:
        config = Path(config)
        if not (config / "model_index.json").is_file():
            raise BloraError("--config must be a diffusers folder with model_index.json", config)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BloraError("folder has no model_index.json: not a diffusers pipeline folder", path)
        class_name = _class_in(path)
        load = lambda: _pipeline_class(class_name, path).from_pretrained(  # noqa: E731
            str(path), torch_dtype=torch_dtype, local_files_only=True, **_extra_kwargs(class_name)
        )
    else:
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise BloraError(
                "pickle checkpoints can run code when loaded and are refused; convert it to .safetensors first "
                "(e.g. with a trusted copy of diffusers' convert scripts) or use a diffusers folder",
                path,
            )
        if path.suffix.lower() != ".safetensors":
            raise BloraError("expected a diffusers folder or a .safetensors checkpoint", path)
        if config is None:
            # diffusers would fetch the checkpoint's original config from the internet: never do that silently
            raise BloraError(f"a single-file checkpoint needs its components' configs; {_CONFIG_HINT}", path)
        _check_checkpoint(path)
        class_name = _class_in(config)
        kwargs = dict(torch_dtype=torch_dtype, local_files_only=True, config=str(config), **_extra_kwargs(class_name))
        load = lambda: _pipeline_class(class_name, config).from_single_file(str(path), **kwargs)  # noqa: E731
    with _quiet_loading():
        try:
            pipe = load()
        except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise BloraError(f"cannot load the model ({first})", path) from None
    pipe.to(torch_device)
    return RenderModel.from_pipeline(pipe, sampler, path)


def _scheduler(name: str, config):
    import diffusers

    class_name, overrides = SAMPLERS[name]
    return getattr(diffusers, class_name).from_config(config, **overrides)


def _layer_index(model: RenderModel) -> dict[str, nn.Module]:
    """Every layer with a weight, by the kohya stem of its path (text encoders in transformers 4's form)."""
    index: dict[str, nn.Module] = {}
    for component, network in model.components().items():
        for path, module in network.named_modules():
            if path and isinstance(module._parameters.get("weight"), nn.Parameter):
                index.setdefault(stem_from_path(component, path), module)
    return index


# --- adapters -------------------------------------------------------------------------------------


@dataclass
class AttachedAdapter:
    """An adapter checked against a loaded model: its modules' target layers and tensors (on the model's device)."""

    name: str
    adapter: Adapter
    layers: dict[str, nn.Module] = field(default_factory=dict)
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def check_arch(adapter: Adapter, arch: Arch) -> None:
    """AdapterFileError unless the adapter is for `arch`."""
    if adapter.arch is not arch:
        raise AdapterFileError(
            f"is a {adapter.arch.value} adapter but the model is {arch.value}; use an adapter trained for {arch.value}",
            adapter.path,
        )


def _layer_for(model: RenderModel, stem: str) -> nn.Module | None:
    """The model's layer a module adapts, whichever naming the file uses (`layers.layer_id`)."""
    layer = model.layers.get(stem)
    return layer if layer is not None else model.layers.get(layer_id(stem, model.arch))


def attach_adapter(model: RenderModel, name: str, adapter: Adapter, stems: Iterable[str]) -> AttachedAdapter:
    """Check an adapter against the model and load the tensors of the modules `stems` on the model's device.

    Raises AdapterFileError for an adapter of another architecture, a module with no layer in the model or a
    ΔW whose size does not fit its layer, and a DoRA module (its ΔW depends on the base weight's norm).
    """
    path = adapter.path
    check_arch(adapter, model.arch)
    attached = AttachedAdapter(name, adapter)
    missing: list[str] = []
    for stem in stems:
        module = adapter.modules[stem]
        if module.dora:
            raise AdapterFileError(f"module {stem} is DoRA (dora_scale); render does not apply DoRA yet", path)
        layer = _layer_for(model, stem)
        if layer is None:
            missing.append(stem)
            continue
        want = layer._parameters["weight"].shape
        if _numel(module.weight_shape) != want.numel():
            raise AdapterFileError(
                f"module {stem} changes a {list(module.weight_shape)} weight but the model's layer is {list(want)}: "
                f"the adapter was trained for a different {model.arch.value} model size",
                path,
            )
        attached.layers[stem] = layer
        attached.tensors[stem] = {
            p: t.to(model.device) for p, t in adapter.tensors(module).items() if p not in ("alpha",)
        }
    if missing:
        raise AdapterFileError(
            f"{len(missing)} module(s) have no layer in the model, e.g. {missing[0]}; is this adapter for "
            f"another {model.arch.value} model?",
            path,
        )
    return attached


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def merged_weights(
    uses: Iterable[tuple[AttachedAdapter, Module, float]],
) -> Iterator[tuple[nn.Module, dict[str, torch.Tensor]]]:
    """Per touched layer, its new parameters: cast(float32(W) + Σ mᵢ·ΔWᵢ) in the layer's dtype (weight and, for
    full/norm kinds, bias). LoRA-family modules are added straight from their factors (one fused
    multiply-add, W + m·scale·up@down, no separate dense ΔW); other kinds through `delta_weight`.

    Layers are merged one at a time as the iterator is advanced, so that a caller can put each in place (and
    drop its original) before the next one takes memory."""
    grouped: dict[int, list[tuple[AttachedAdapter, Module, float]]] = defaultdict(list)
    layers: dict[int, nn.Module] = {}
    for attached, module, weight in uses:
        layer = attached.layers[module.stem]
        grouped[id(layer)].append((attached, module, weight))
        layers[id(layer)] = layer
    for key, items in grouped.items():
        yield layers[key], _merge_layer(layers[key], items)


def _merge_layer(layer: nn.Module, items: list[tuple[AttachedAdapter, Module, float]]) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}

    def base(name: str, module: Module, attached: AttachedAdapter) -> tuple[torch.Tensor, bool]:
        """The layer's parameter as float32 (2-D for weights) and whether that is a copy we may add into."""
        param = layer._parameters.get(name)
        if param is None:
            raise AdapterFileError(f"module {module.stem} changes the {name} of a layer that has none", attached.adapter.path)
        original = param.data.reshape(param.shape[0], -1) if name == "weight" else param.data
        as_float = original.float()
        return as_float, as_float.data_ptr() != original.data_ptr()

    for attached, module, weight in items:
        tensors = attached.tensors[module.stem]
        if module.kind.is_lora:
            up, down = lora_factors(module.kind, tensors)
            alpha = weight * module.scale
            if "weight" in sums:
                sums["weight"].addmm_(up, down, alpha=alpha)
            else:
                start, owned = base("weight", module, attached)
                sums["weight"] = start.addmm_(up, down, alpha=alpha) if owned else torch.addmm(start, up, down, alpha=alpha)
            continue
        parts = {"weight": delta_weight(module.kind, tensors, module.scale, module.weight_shape)}
        bias_key = {Kind.FULL: "diff_b", Kind.NORM: "b_norm"}.get(module.kind)
        if bias_key and bias_key in tensors:
            parts["bias"] = tensors[bias_key].float()
        for name, delta in parts.items():
            if name in sums:
                sums[name].add_(delta.reshape(sums[name].shape), alpha=weight)
            else:
                start, owned = base(name, module, attached)
                delta = delta.reshape(start.shape)
                sums[name] = start.add_(delta, alpha=weight) if owned else torch.add(start, delta, alpha=weight)
    result = {}
    for name, total in sums.items():
        param = layer._parameters[name]
        result[name] = total.reshape(param.shape).to(param.dtype)
    return result


KEEP_MARGIN = 4 << 30
"""Device memory `auto` leaves free beyond the kept originals: a cell's activations and the VAE decode (a few
GiB for SDXL and Flux.1 at 1024²)."""


def keep_originals_where(mode: str, needed: int, free: int | None, margin: int = KEEP_MARGIN) -> str:
    """Where `WeightPatcher` keeps the original weights: "device" or "host".

    `mode` "device" or "host" is the answer; "auto" is "device" when `needed` bytes (the touched layers'
    originals) plus `margin` fit in the device's `free` bytes, else "host". `free` None means a device whose
    memory is the host's (the CPU, MPS): there a copy gains nothing, and the originals stay where they are.
    """
    if check_keep_originals(mode) != "auto":
        return mode
    return "device" if free is None or needed + margin <= free else "host"


def touched_bytes(adapters: Iterable[AttachedAdapter]) -> int:
    """Bytes of the weights and biases of every layer the adapters may change: what keeping their originals
    on the device costs at most (a cell touching fewer layers costs less)."""
    layers = {id(layer): layer for attached in adapters for layer in attached.layers.values()}
    return sum(
        p.nbytes for layer in layers.values() for name in ("weight", "bias")
        if (p := layer._parameters.get(name)) is not None
    )


def _free_device_bytes(device: torch.device) -> int | None:
    """Memory a CUDA device can still give: its free memory (`torch.cuda.mem_get_info`) plus what torch's
    caching allocator holds unused. None for devices whose memory is the host's."""
    if device.type != "cuda":
        return None
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return torch.cuda.mem_get_info(device)[0] + cached


class WeightPatcher:
    """Puts merged weights into layers and the original tensors back, bit for bit.

    `apply` replaces each touched parameter's data with cast(float32(W) + ΔW), one layer at a time, and keeps W:
    with `keep="device"` the tensor object itself (no copy, the fastest; each touched weight is on the device
    twice until `restore`); with `keep="host"` a copy in CPU memory (pinned on CUDA for fast copies), the
    device's W dropped as soon as W' replaces it, so the device holds at most one extra layer while applying.
    `restore` reassigns each kept tensor, or copies it back into a new tensor of W's device, dtype and strides.
    """

    def __init__(self, keep: str = "device") -> None:
        if keep not in ("device", "host"):
            raise BloraError(f"WeightPatcher keeps originals on 'device' or 'host', not {keep!r}")
        self.keep = keep
        self._saved: list[tuple[nn.Parameter, torch.Tensor]] = []

    @property
    def active(self) -> bool:
        return bool(self._saved)

    @torch.no_grad()
    def apply(self, uses: Iterable[tuple[AttachedAdapter, Module, float]]) -> int:
        """Merge the adapters' ΔW; returns the number of layers touched. Restores first if still applied, and
        restores before re-raising anything raised part-way (an error, out of memory, Ctrl-C)."""
        self.restore()
        touched = 0
        try:
            for layer, merged in merged_weights(uses):
                for name, tensor in merged.items():
                    param = layer._parameters[name]
                    self._saved.append((param, self._kept(param.data)))  # kept before W' replaces it
                    param.data = tensor
                touched += 1
        except BaseException:
            self.restore()
            raise
        return touched

    def _kept(self, original: torch.Tensor) -> torch.Tensor:
        if self.keep == "device":
            return original
        return torch.empty_like(original, device="cpu", pin_memory=original.is_cuda).copy_(original)

    @torch.no_grad()
    def restore(self) -> None:
        """Put every original tensor back (latest first, so a layer touched twice ends at its base weight). An
        entry is dropped only once it is back, so a restore cut short by an interrupt can be run again."""
        while self._saved:
            param, kept = self._saved[-1]
            param.data = kept if kept.device == param.device else torch.empty_like(kept, device=param.device).copy_(kept)
            self._saved.pop()


# --- rendering ------------------------------------------------------------------------------------


def render_cell(
    model: RenderModel,
    settings: CellSettings,
    size: tuple[int, int],
    on_step: Callable[[], None] | None = None,
):
    """One image (float32 numpy array H×W×3 in [0, 1]) with the weights as they are now.

    Noise comes from a CPU generator seeded with `settings.seed`, so a seed gives the same start on any device.
    """
    width, height = size
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    kwargs = {}
    if on_step is not None:

        def callback(pipe, step, timestep, callback_kwargs):
            on_step()
            return callback_kwargs

        kwargs["callback_on_step_end"] = callback
    with torch.inference_mode():
        result = model.pipe(
            prompt=settings.prompt,
            negative_prompt=settings.negative or None,
            num_inference_steps=settings.steps,
            guidance_scale=settings.cfg,
            width=width,
            height=height,
            generator=generator,
            output_type="np",
            **kwargs,
        )
    return result.images[0]


def cell_uses(
    settings: CellSettings,
    adapters: Mapping[str, AttachedAdapter],
    selections: Mapping[tuple[str, str], Selection],
) -> list[tuple[AttachedAdapter, Module, float]]:
    """(adapter, module, weight) for every module a cell applies."""
    uses = []
    for use in settings.adapter_state:
        attached = adapters[use.name]
        for stem in selections[(use.name, use.selector)].stems:
            uses.append((attached, attached.adapter.modules[stem], use.weight))
    return uses


def render_plan(
    model: RenderModel,
    plan: GridPlan,
    adapters: Mapping[str, AttachedAdapter],
    selections: Mapping[tuple[str, str], Selection],
    size: tuple[int, int],
    *,
    on_step: Callable[[], None] | None = None,
    on_cell: Callable[[Cell], None] | None = None,
    keep: str = "device",
) -> list:
    """Images for every cell of `plan`, in plan order. Cells run grouped by adapter state (one merge per
    group); the base weights are restored when the function returns, also on error or interrupt. `keep`:
    where the originals wait (`WeightPatcher`)."""
    images: dict[int, object] = {}
    patcher = WeightPatcher(keep)
    state = None
    index = {id(c): i for i, c in enumerate(plan.cells)}
    try:
        for cell in plan.run_order():
            if cell.settings.adapter_state != state:
                patcher.restore()
                uses = cell_uses(cell.settings, adapters, selections)
                if uses:
                    patcher.apply(uses)
                state = cell.settings.adapter_state
            if on_cell is not None:
                on_cell(cell)
            images[index[id(cell)]] = render_cell(model, cell.settings, size, on_step)
    finally:
        patcher.restore()
    return [images[i] for i in range(len(plan.cells))]


def to_pil(image):
    """A float H×W×3 array in [0, 1] as an 8-bit PIL image (diffusers' rounding)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.clip(image, 0.0, 1.0) * 255).round().astype("uint8"))


def render_grid(
    model: RenderModel,
    plan: GridPlan,
    adapters: Mapping[str, Adapter],
    selections: Mapping[tuple[str, str], Selection],
    size: tuple[int, int] | None = None,
    *,
    on_step: Callable[[], None] | None = None,
    keep_originals: str = "auto",
):
    """Attach the adapters, render every cell and draw the labelled grid; `keep_originals` (auto, device, host)
    says where the touched layers' original weights wait (`keep_originals_where`, decided once adapters are
    on the device).

    Returns the grid (a PIL image; a single cell without axes is the image itself) and its map (`grid_map`,
    schema blora-render/1: model, sampler, size, adapters, resolved selections, where the originals were kept,
    and per cell its box, labels and settings)."""
    stems: dict[str, set[str]] = {name: set() for name in adapters}
    for (name, _), selection in selections.items():
        stems[name].update(selection.stems)
    attached = {name: attach_adapter(model, name, adapter, sorted(stems[name])) for name, adapter in adapters.items()}
    size = size or model.default_size()
    keep = keep_originals_where(keep_originals, touched_bytes(attached.values()), _free_device_bytes(model.device))
    started = time.perf_counter()
    images = render_plan(model, plan, attached, selections, size, on_step=on_step, keep=keep)
    seconds = time.perf_counter() - started
    grid, layout = draw_grid(plan, [to_pil(i) for i in images])
    common = {
        "model": str(model.source),
        "arch": model.arch.value,
        "device": str(model.device),
        "dtype": model.dtype_name,
        "sampler": model.sampler,
        "size": list(size),
        "adapters": [{"name": name, "file": str(a.path)} for name, a in adapters.items()],
        "selections": [s.to_json(adapters[name].arch) for (name, _), s in selections.items()],
        "render_s": round(seconds, 3),
        "keep_originals": keep,
    }
    return grid, grid_map(plan, layout, common)
