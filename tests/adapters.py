"""Synthetic adapter files with real kohya names, and an independent dense-ΔW oracle for tests.

`make_adapter` takes module names and layer shapes from the tiny model trees (`blora_tools.models`) through
the plugin's target finder, so names are exactly what kohya writes, and fills the factors with random values.
`dense_deltas` reads a file with `safetensors` (not with `blora_tools.adapter`) and computes each module's dense
ΔW with its own arithmetic: it is the oracle the operations are checked against.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

KINDS = ("lora", "locon", "tucker", "loha", "lokr", "full", "dora")
"""`lora`: linear + 1×1 conv (attention); `locon`: also 3×3 convs; `tucker`: 3×3 convs with a `lora_mid` core;
`loha`/`lokr`/`full`: LyCORIS kinds on linear layers; `dora`: LoRA with `dora_scale`."""


@dataclass(frozen=True)
class Layer:
    """One layer a kohya network would wrap in a tiny model."""

    name: str  # kohya stem
    path: str  # dotted path inside its network (for PEFT names)
    component: str  # unet, te, te1, te2
    kind: str  # linear, conv1x1, conv3x3
    shape: tuple[int, ...]  # base weight shape
    block: str


def layers(arch: str, conv: bool) -> tuple[Layer, ...]:
    """Every layer kohya's LoRA (or with `conv`, LoCon) wraps in the tiny `arch` models."""
    return _layer_tables(arch)[conv]


@functools.cache
def _layer_tables(arch: str) -> dict[bool, tuple[Layer, ...]]:
    from blora_tools.models import build_text_encoders, build_unet
    from kohya_plugin.targets import find_targets

    unet = build_unet(arch, "tiny")
    encoders = build_text_encoders(arch, "tiny")
    return {conv: _layers(unet, encoders, find_targets(encoders, unet, include_conv=conv)[1]) for conv in (False, True)}


def _layers(unet, encoders, targets) -> tuple[Layer, ...]:
    paths: dict[str, str] = {}
    for name, _ in unet.named_modules():
        paths["lora_unet_" + name.replace(".", "_")] = name
    components = ("te",) if len(encoders) == 1 else ("te1", "te2")
    for component, encoder in zip(components, encoders):
        for name, _ in encoder.named_modules():
            canonical = name if name.startswith("text_model.") else "text_model." + name
            paths[f"lora_{component}_" + canonical.replace(".", "_")] = name
    return tuple(
        Layer(t.name, paths[t.name], t.placement.component.value, t.kind, tuple(t.layer.weight.shape), t.placement.block)
        for t in targets
    )


def pick(arch: str, conv: bool, blocks: str | None = "all", per_block: int | None = 2) -> list[Layer]:
    """Layers in the blocks a selector names, at most `per_block` of each layer kind per block."""
    from blora_tools.taxonomy.selectors import resolve_selector

    chosen = resolve_selector(blocks or "all", arch)
    counts: dict[tuple[str, str], int] = {}
    out = []
    for layer in layers(arch, conv):
        if layer.block not in chosen:
            continue
        key = (layer.block, layer.kind)
        if per_block is not None and counts.get(key, 0) >= per_block:
            continue
        counts[key] = counts.get(key, 0) + 1
        out.append(layer)
    return out


def _randn(gen: torch.Generator, *shape: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def _lokr_split(n: int) -> int:
    for f in (4, 2):
        if n % f == 0 and n // f >= 2:
            return f
    return 1


def make_adapter(
    path: str | Path,
    arch: str = "sd1",
    kind: str = "lora",
    blocks: str | None = "all",
    rank: int | Callable[[Layer], int] = 4,
    dtype: torch.dtype = torch.float32,
    alpha: float | None | Callable[[Layer], float | None] = 2.0,
    fmt: str = "kohya",
    seed: int = 0,
    per_block: int | None = 2,
    metadata: dict[str, str] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
    on: str = "linear",
) -> Path:
    """Write a random adapter with real kohya module names for the tiny `arch` models.

    Args:
        kind: one of KINDS. LoHa/LoKr/full/dora modules go on linear layers only (their conv forms keep no kernel).
        blocks: a selector of the blocks that get modules (`all`, `in0,out3`, `te`, …).
        rank: an int or a function of the layer.
        alpha: a number, None (no alpha key: alpha = rank), or a function of the layer.
        fmt: `kohya` or `peft` (LoRA only; alphas go to `lora_adapter_metadata`).
        per_block: at most this many layers of each layer kind per LBW block (None = every layer).
        extra: pass-through tensors to add as they are.
        on: the layers LoHa/LoKr/full/dora modules go on: `linear`, or `conv` (3×3 and 1×1 convolutions, stored as
            LyCORIS stores them without a Tucker core: LoHa/LoKr `_b` factors flattened to r×(in·k·k), full `diff`
            with the conv weight's shape).
    """
    if kind not in KINDS:
        raise ValueError(kind)
    conv = kind in ("locon", "tucker") or on == "conv"
    chosen = pick(arch, conv, blocks, per_block)
    if kind in ("loha", "lokr", "full", "dora"):
        chosen = [l for l in chosen if (l.kind == "linear") == (on == "linear")]
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in chosen:
        r = rank(layer) if callable(rank) else rank
        a = alpha(layer) if callable(alpha) else alpha
        out, fan_in = layer.shape[0], layer.shape[1]
        kernel = tuple(layer.shape[2:])
        params: dict[str, torch.Tensor] = {}
        if kind in ("lora", "locon", "tucker", "dora"):
            down_std = 1.0 / math.sqrt(fan_in * math.prod(kernel or (1,)))
            if layer.kind == "conv3x3" and kind == "tucker":
                params["lora_down.weight"] = _randn(gen, r, fan_in, 1, 1, std=1 / math.sqrt(fan_in))
                params["lora_mid.weight"] = _randn(gen, r, r, *kernel, std=1 / math.sqrt(r * math.prod(kernel)))
            else:
                params["lora_down.weight"] = _randn(gen, r, fan_in, *kernel, std=down_std)
            params["lora_up.weight"] = _randn(gen, out, r, *((1, 1) if kernel else ()), std=0.1)
            if kind == "dora":
                params["dora_scale"] = _randn(gen, out, 1).abs() + 0.5
        elif kind == "loha":
            for i in ("1", "2"):
                params[f"hada_w{i}_a"] = _randn(gen, out, r, std=0.3)
                params[f"hada_w{i}_b"] = _randn(gen, r, fan_in * math.prod(kernel), std=0.3)
        elif kind == "lokr":
            f_out, f_in = _lokr_split(out), _lokr_split(fan_in)
            r = min(r, out // f_out, fan_in // f_in)
            params["lokr_w1"] = _randn(gen, f_out, f_in, std=0.5)
            params["lokr_w2_a"] = _randn(gen, out // f_out, r, std=0.3)
            params["lokr_w2_b"] = _randn(gen, r, fan_in // f_in * math.prod(kernel), std=0.3)
        elif kind == "full":
            params["diff"] = _randn(gen, out, fan_in, *kernel, std=0.01)
        if a is not None and kind != "full" and fmt == "kohya":
            params["alpha"] = torch.tensor(float(a))
        for param, tensor in params.items():
            tensors[_key(layer, param, fmt)] = tensor.to(dtype).contiguous()
    meta = dict(metadata or {})
    if fmt == "peft":
        if kind != "lora":
            raise ValueError("the PEFT format holds LoRA only")
        meta["lora_adapter_metadata"] = json.dumps(_peft_config(chosen, rank, alpha))
    tensors.update(extra or {})
    path = Path(path)
    save_file(tensors, str(path), metadata=meta or None)
    return path


def _peft_config(chosen: list[Layer], rank, alpha) -> dict:
    """PEFT's config: one lora_alpha and an alpha_pattern of the exceptions (full dotted paths)."""
    alphas = {}
    for layer in chosen:
        a = alpha(layer) if callable(alpha) else alpha
        r = rank(layer) if callable(rank) else rank
        alphas[layer] = float(r if a is None else a)
    common = max(set(alphas.values()), key=list(alphas.values()).count) if alphas else 1.0
    pattern = {}
    for layer, a in alphas.items():
        if a != common:
            pattern[layer.path] = a
    return {"r": 4, "lora_alpha": common, "alpha_pattern": pattern}


_PEFT_COMPONENT = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}


def _key(layer: Layer, param: str, fmt: str) -> str:
    if fmt == "kohya":
        return f"{layer.name}.{param}"
    peft = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}[param]
    return f"{_PEFT_COMPONENT[layer.component]}.{layer.path}.{peft}"


# --- the oracle ----------------------------------------------------------------------------------------


def _kohya_stem(key: str) -> tuple[str, str] | None:
    if key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):
        stem, _, param = key.partition(".")
        return stem, param
    for component, prefix in (("text_encoder_2", "lora_te2_"), ("text_encoder", "lora_te_"), ("unet", "lora_unet_")):
        if key.startswith(component + "."):
            rest = key[len(component) + 1 :]
            for suffix, param in ((".lora_A.weight", "lora_down.weight"), (".lora_B.weight", "lora_up.weight")):
                if rest.endswith(suffix):
                    module_path = rest[: -len(suffix)]
                    if component != "unet" and not module_path.startswith("text_model."):
                        module_path = "text_model." + module_path
                    return prefix + module_path.replace(".", "_"), param
    return None


def _mat(t: torch.Tensor) -> torch.Tensor:
    return t.double().reshape(t.shape[0], -1)


def dense_deltas(path: str | Path, multiplier: float = 1.0) -> dict[str, torch.Tensor]:
    """Stem → dense ΔW as an (out, fan_in) float64 matrix, computed from the file's raw tensors.

    PEFT files are read as LoRA with alphas from `lora_adapter_metadata` (alpha_pattern by path suffix).
    SDXL PEFT `text_encoder` keys are named `lora_te1_` when the file also has `text_encoder_2` keys.
    """
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    paths: dict[str, str] = {}
    for key, tensor in tensors.items():
        split = _kohya_stem(key)
        if split is None:
            continue
        stem, param = split
        modules.setdefault(stem, {})[param] = tensor
        if not key.startswith("lora_"):
            paths[stem] = key.split(".", 1)[1].rsplit(".lora_", 1)[0]
    if any(s.startswith("lora_te2_") for s in modules):
        modules = {("lora_te1_" + s[8:] if s.startswith("lora_te_") else s): p for s, p in modules.items()}
        paths = {("lora_te1_" + s[8:] if s.startswith("lora_te_") else s): p for s, p in paths.items()}
    peft = json.loads(meta.get("lora_adapter_metadata", "{}"))
    out = {}
    for stem, p in modules.items():
        if "lora_up.weight" in p:
            up, down = _mat(p["lora_up.weight"]), p["lora_down.weight"].double()
            rank = down.shape[0]
            if "lora_mid.weight" in p:
                down = torch.einsum("ijhw,jc->ichw", p["lora_mid.weight"].double(), _mat(down))
            product = up @ _mat(down)
        elif "hada_w1_a" in p:
            rank = p["hada_w1_b"].shape[0]
            product = (_mat(p["hada_w1_a"]) @ _mat(p["hada_w1_b"])) * (_mat(p["hada_w2_a"]) @ _mat(p["hada_w2_b"]))
        elif "lokr_w1" in p:
            rank = p["lokr_w2_a"].shape[1]
            product = torch.kron(p["lokr_w1"].double(), p["lokr_w2_a"].double() @ p["lokr_w2_b"].double())
        elif "diff" in p:
            out[stem] = multiplier * _mat(p["diff"])
            continue
        else:
            continue
        if "alpha" in p:
            alpha = float(p["alpha"])
        elif stem in paths and peft:
            alpha = float(peft.get("lora_alpha", rank))
            for pattern, value in (peft.get("alpha_pattern") or {}).items():
                if paths[stem] == pattern or paths[stem].endswith("." + pattern):
                    alpha = float(value)
        else:
            alpha = float(rank)
        out[stem] = multiplier * (alpha / rank) * product
    return out


def raw_bytes(path: str | Path) -> dict[str, bytes]:
    """Key → the tensor's stored bytes, read straight from the file."""
    import struct

    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    start = 8 + n
    return {k: data[start + v["data_offsets"][0] : start + v["data_offsets"][1]] for k, v in header.items()}


def metadata_of(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def block_of(stem: str, arch: str) -> str | None:
    """The test's own view of a module's block: looked up in the tiny-model layer table."""
    return _blocks(arch).get(stem)


@functools.cache
def _blocks(arch: str) -> dict[str, str]:
    return {layer.name: layer.block for layer in layers(arch, True)}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(b.norm())
    return float((a - b).norm()) / (denom if denom else 1.0)


def save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


# --- diffusers as a second oracle ----------------------------------------------------------------------


def _unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=g)
    context = torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([10]), encoder_hidden_states=context).sample.double()


def diffusers_unet_error(path: str | Path) -> tuple[float, float]:
    """Load a kohya file into a tiny SD1 U-Net with diffusers (`lora_state_dict` + `load_lora_into_unet`) and
    compare its output with the same U-Net whose weights got the file's dense ΔW added by hand.

    Returns (relative error of the diffusers output, relative size of the adapter's effect).
    """
    import warnings

    from diffusers import StableDiffusionPipeline

    from blora_tools.models import build_unet

    loaded, reference, plain = (build_unet("sd1", "tiny") for _ in range(3))
    layers_by_name = {"lora_unet_" + n.replace(".", "_"): m for n, m in reference.named_modules()}
    with torch.no_grad():
        for stem, delta in dense_deltas(path).items():
            if stem.startswith("lora_unet_"):
                weight = layers_by_name[stem].weight
                weight += delta.reshape(weight.shape).to(weight.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
        unet_keys = {k: v for k, v in state_dict.items() if k.startswith("unet.")}
        unet_alphas = {k: v for k, v in (alphas or {}).items() if k.startswith("unet.")}
        StableDiffusionPipeline.load_lora_into_unet(unet_keys, unet_alphas, loaded)
    want = _unet_output(reference)
    return relative_error(_unet_output(loaded), want), relative_error(_unet_output(plain), want)


def torch_scaled_bytes(
    data: bytes, dtype: str, shape: tuple[int, ...], ratio: float, rows=(), axis: int = 0
) -> bytes:
    """The torch route for a stored factor times `ratio` (ranges of `axis` also times their weight), as the
    commands computed it before `adapter.floats`. The oracle of the numpy route."""
    from blora_tools.adapter.tensors import TORCH_DTYPE

    stored = TORCH_DTYPE[dtype]
    tensor = torch.frombuffer(bytearray(data), dtype=stored).reshape(shape) if data else torch.empty(shape, dtype=stored)
    return torch_scaled(tensor, dtype, ratio, rows, axis)


def torch_scaled(tensor: torch.Tensor, dtype: str, ratio: float, rows=(), axis: int = 0) -> bytes:
    """The stored bytes of `tensor` times `ratio` by the torch route: `Tensor.float() * ratio`,
    `narrow(...).mul_(weight)` for each range of `axis`, then `.to(dtype)`."""
    from blora_tools.adapter.tensors import TORCH_DTYPE

    result = tensor.float() * ratio
    for start, stop, weight in rows:
        if weight != 1.0:
            result.narrow(axis, start, stop - start).mul_(weight)
    return result.to(TORCH_DTYPE[dtype]).contiguous().view(torch.uint8).numpy().tobytes()


def torch_scalar_bytes(value: float, dtype: str) -> bytes:
    """The torch route for an alpha tensor: `torch.tensor(value, dtype=torch.float64).to(dtype)`."""
    from blora_tools.adapter.tensors import TORCH_DTYPE

    return torch.tensor(value, dtype=torch.float64).to(TORCH_DTYPE[dtype]).reshape(1).view(torch.uint8).numpy().tobytes()


def same_floats(a: bytes, b: bytes, dtype: str) -> bool:
    """Bit-identical stored floats, except that NaNs only need to be NaNs at the same places (torch's own NaN
    bits differ between its vector and scalar loops)."""
    from blora_tools.adapter.tensors import TORCH_DTYPE

    if len(a) != len(b):
        return False
    stored = TORCH_DTYPE[dtype]
    x = torch.frombuffer(bytearray(a), dtype=stored) if a else torch.empty(0, dtype=stored)
    y = torch.frombuffer(bytearray(b), dtype=stored) if b else torch.empty(0, dtype=stored)
    if stored.is_floating_point:
        nan_x, nan_y = torch.isnan(x.float()), torch.isnan(y.float())
        if not torch.equal(nan_x, nan_y):
            return False
        keep = ~nan_x
        x, y = x[keep], y[keep]
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    return torch.equal(x.view(width), y.view(width))
