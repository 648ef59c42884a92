"""The adapter file model: a safetensors file read lazily and grouped into modules.

`open_adapter` reads the header (no torch), splits keys into modules via `formats`, places each module
in a block via the taxonomy, works out kind, rank and alpha, and reports what it could not place.
Tensors are read on demand; untouched tensors can be copied as raw bytes.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping

from blora_tools.adapter.formats import DIFFUSERS_FAMILY, Dialect, Format, KeyName, split_key
from blora_tools.adapter.header import Header, TensorInfo, read_header
from blora_tools.adapter.kinds import Kind, kind_of
from blora_tools.adapter.peft import peft_root
from blora_tools.errors import AdapterFileError, BloraError
from blora_tools.inputs import read_exact
from blora_tools.jsonio import loads_strict
from blora_tools.taxonomy.arch import Arch
from blora_tools.taxonomy.blocks import Component, Placement, place, table
from blora_tools.taxonomy.detect import decide_arch, unsupported_family
from blora_tools.taxonomy.shapes import misfit

if TYPE_CHECKING:
    import torch

__all__ = ["PEFT_METADATA_KEY", "effective_alpha", "Module", "Adapter", "open_adapter"]

PEFT_METADATA_KEY = "lora_adapter_metadata"


def effective_alpha(rank: int, stored_alpha: float | None) -> float:
    """The alpha loaders use: the stored one, else the rank (kohya, A1111, ComfyUI, LyCORIS, PEFT all read a
    missing alpha as alpha = rank). The one definition of that rule, for modules and for raw tensors alike."""
    return float(rank if stored_alpha is None else stored_alpha)


@dataclass
class Module:
    """One adapted layer: every key sharing a stem, with its kind, rank, alpha and block."""

    stem: str
    kind: Kind
    keys: dict[str, str]
    """parameter name (kohya form) → tensor key in the file"""
    shapes: dict[str, tuple[int, ...]]
    rank: int | None
    alpha: float | None
    """the stored alpha (None when the file has none: then alpha = rank)"""
    placement: Placement | None
    path: str | None = None
    """dotted module path, when the file's format carries it"""

    @property
    def block(self) -> str | None:
        return self.placement.block if self.placement else None

    @property
    def group(self) -> str:
        return self.placement.group if self.placement else "none"

    @property
    def effective_alpha(self) -> float | None:
        """The alpha loaders use (`effective_alpha`); None for kinds without a rank (full, norm, LoKr of whole
        factors)."""
        if self.rank is None:
            return None
        return effective_alpha(self.rank, self.alpha)

    @property
    def scale(self) -> float:
        """alpha / rank: the factor a loader applies to the factors' product (1 for kinds without a rank)."""
        alpha = self.effective_alpha
        return 1.0 if alpha is None else alpha / self.rank

    @property
    def dora(self) -> bool:
        return "dora_scale" in self.keys

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the base layer's weight this module adapts."""
        return _weight_shape(self.kind, self.shapes)

    @property
    def params(self) -> int:
        return sum(math.prod(s) for p, s in self.shapes.items() if p != "alpha")


@dataclass
class Adapter:
    """An adapter file: header, modules by stem, pass-through keys, warnings."""

    path: Path
    header: Header
    format: Format
    arch: Arch
    modules: dict[str, Module]
    passthrough: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dialect: Dialect = Dialect.KOHYA
    """the producer convention its keys follow (`format` is its family)"""

    @property
    def metadata(self) -> Mapping[str, str]:
        return self.header.metadata

    def info(self, key: str) -> TensorInfo:
        return self.header.tensors[key]

    def made(self, key: str) -> bool:
        """Whether a tensor is computed when read (a module re-expressed by `ops.dit_naming`), not stored."""
        return False

    def raw(self, key: str) -> bytes:
        """A tensor's bytes exactly as stored (one unbuffered read at its offset: no read-ahead copy)."""
        info = self.header.tensors[key]
        what = f"tensor {key!r}"
        try:
            with self.path.open("rb", buffering=0) as f:
                return read_exact(f.fileno(), self.header.data_start + info.begin, info.nbytes, self.path, what,
                                  AdapterFileError)
        except OSError as err:
            raise AdapterFileError(f"cannot read {what}: {err.strerror or err}", self.path) from None

    def tensor(self, key: str) -> "torch.Tensor":
        """One tensor, read now (a fresh, writable CPU tensor)."""
        from blora_tools.adapter.tensors import decode

        info = self.header.tensors[key]
        return decode(self.raw(key), info.dtype, info.shape)

    def tensors(self, module: Module) -> dict[str, "torch.Tensor"]:
        """All tensors of a module, by kohya parameter name."""
        return {param: self.tensor(key) for param, key in module.keys.items()}

    def kinds(self) -> Counter:
        return Counter(m.kind.value for m in self.modules.values())

    def dtypes(self) -> Counter:
        return Counter(self.header.tensors[k].dtype for m in self.modules.values() for k in m.keys.values())


def open_adapter(path: str | Path, arch: Arch | None = None) -> Adapter:
    """Read an adapter's header and group it into modules; AdapterFileError if it is not an adapter.

    `path` is a `.safetensors` file, or a PEFT `save_pretrained` folder (its `adapter_model.safetensors` is read).
    The architecture comes from the file's evidence (`taxonomy.detect`); `arch` (the user's `--arch`) picks
    among the families that evidence leaves open and is refused where it contradicts the evidence. Every
    module's factor shapes are checked against its real layer before any tensor is read.
    """
    header = read_header(_adapter_file(Path(path)))
    path = header.path
    grouped: dict[str, dict[str, str]] = defaultdict(dict)
    names: dict[str, KeyName] = {}
    passthrough: list[str] = []
    dialects: dict[Dialect, str] = {}
    for key in header.tensors:
        name = split_key(key)
        if name is None:
            passthrough.append(key)
            continue
        if name.param in grouped[name.stem]:
            raise AdapterFileError(f"module {name.stem} has two tensors for {name.param}", path)
        grouped[name.stem][name.param] = key
        names[name.stem] = name
        dialects.setdefault(name.dialect, key)
    if not grouped:
        _refuse_unsupported_family(header.tensors, path)
        what = "a full model or another kind of file" if header.tensors else "an empty file"
        raise AdapterFileError(f"no LoRA/LyCORIS modules found: this looks like {what}, not an adapter", path)
    dialect = _file_dialect(dialects, path)
    warnings: list[str] = []
    if dialect is Dialect.PEFT:
        header, warning = _with_sidecar_config(header)
        warnings += [warning] if warning else []
    shapes = {stem: {p: header.tensors[k].shape for p, k in params.items()} for stem, params in grouped.items()}
    if dialect is not Dialect.KOHYA and any(stem.startswith("lora_te2_") for stem in grouped):
        grouped, names, shapes = _te_as_te1(grouped, names, shapes)  # a second text encoder: SDXL's naming
    unet = any(stem.startswith("lora_unet_") for stem in grouped)
    if dialect is not Dialect.KOHYA and unet and any(stem.startswith("lora_te_") for stem in grouped):
        # the first text encoder alone (`text_encoder`, `clip_l`): te1 when the file reads as a family that
        # calls it so (SDXL, Flux.1, SD3)
        as_te1 = _te_as_te1(grouped, names, shapes)
        try:
            if Component.TE1 in table(_detect(as_te1[0], as_te1[2], header, arch)[0]).text_encoders:
                grouped, names, shapes = as_te1
        except AdapterFileError:
            pass
    arch, arch_warnings = _detect(grouped, shapes, header, arch)
    warnings += arch_warnings
    config_alphas = _read_config_alphas(header.metadata, names, path, arch) if dialect.format is Format.PEFT else {}
    modules: dict[str, Module] = {}
    for stem, params in grouped.items():
        modules[stem] = _module(stem, params, shapes[stem], arch, header, names[stem], config_alphas, path)
    unplaced = sorted(s for s, m in modules.items() if m.placement is None)
    if unplaced:
        warnings.append(
            f"{len(unplaced)} module(s) fit no {arch.value} block and are kept as they are, e.g. {unplaced[0]}"
        )
    if passthrough:
        warnings.append(f"{len(passthrough)} key(s) are not adapter modules and pass through untouched, e.g. {passthrough[0]}")
    return Adapter(path, header, dialect.format, arch, modules, passthrough, warnings, dialect)


_PEFT_FOLDER_FILE = "adapter_model.safetensors"
_PEFT_CONFIG_FILE = "adapter_config.json"
"""The files PEFT's `save_pretrained` writes into its folder (PEFT `utils/constants.py`)."""


def _adapter_file(path: Path) -> Path:
    """A PEFT folder stands for the adapter file inside it; any other path is read as given."""
    if path.is_dir() and (path / _PEFT_FOLDER_FILE).is_file():
        return path / _PEFT_FOLDER_FILE
    return path


def _file_dialect(dialects: Mapping[Dialect, str], path: Path) -> Dialect:
    """The file's one dialect; AdapterFileError when keys of two dialects (each with its own alpha rule) mix.

    Only the diffusers family mixes legitimately; its oldest member names the file.
    """
    if len(dialects) > 1 and not set(dialects) <= DIFFUSERS_FAMILY:
        first, a = next(iter(dialects.items()))
        second, b = next((d, k) for d, k in dialects.items() if d is not first and {d, first} - DIFFUSERS_FAMILY)
        raise AdapterFileError(
            f"mixes {first.value} keys (e.g. {a}) and {second.value} keys (e.g. {b}) in one file; loaders read one "
            "dialect per file (split it into one file per dialect)",
            path,
        )
    for dialect in (Dialect.ATTN_PROC, Dialect.DIFFUSERS_LEGACY):
        if dialect in dialects:
            return dialect
    return next(iter(dialects))


def _with_sidecar_config(header: Header) -> tuple[Header, str | None]:
    """A PEFT `save_pretrained` file with its folder's `adapter_config.json` as `lora_adapter_metadata`.

    PEFT keeps r, lora_alpha and the patterns beside the tensors; carrying them in the metadata makes every
    output of this file self-describing (prune and reweight keep the alphas, so the original config still fits
    the output too). A config in the file's own metadata wins over none; the sidecar wins over both.
    """
    config_path = header.path.parent / _PEFT_CONFIG_FILE
    if not config_path.is_file():
        if PEFT_METADATA_KEY in header.metadata:
            return header, None
        return header, (
            f"PEFT keys (base_model.model.) but no {_PEFT_CONFIG_FILE} beside the file: alpha is taken as each "
            "module's rank (PEFT needs the config to load it)"
        )
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"cannot read {_PEFT_CONFIG_FILE} beside it: {err}", header.path) from None
    _parse_config_json(text, f"{_PEFT_CONFIG_FILE} beside it", header.path)
    metadata = {**header.metadata, PEFT_METADATA_KEY: text}
    return replace(header, metadata=MappingProxyType(metadata)), None


def _te_as_te1(*by_stem: dict) -> tuple[dict, ...]:
    """Dotted dialects name SDXL's, Flux's and SD3's first text encoder like SD1/SD2's only one (`text_encoder`,
    ComfyUI's and OMI's `clip_l`); there it is kohya's `te1`, whether or not the file also holds others."""
    def renamed(stem: str) -> str:
        return "lora_te1_" + stem[len("lora_te_") :] if stem.startswith("lora_te_") else stem

    return tuple({renamed(s): v for s, v in mapping.items()} for mapping in by_stem)


def _refuse_unsupported_family(keys, path: Path) -> None:
    family = unsupported_family(keys)
    if family:
        raise AdapterFileError(family, path)


def _detect(grouped: dict, shapes: dict, header: Header, override: Arch | None) -> tuple[Arch, list[str]]:
    """The architecture from the modules' names and ΔW shapes (a broken module is refused first, by name)."""
    kinds = {stem: _checked_kind(stem, s, header.path) for stem, s in shapes.items()}
    made = {stem: _weight_shape(kinds[stem], s) for stem, s in shapes.items()}
    flat = {stem for stem, kind in kinds.items() if kind in (Kind.LOHA, Kind.LOKR)}
    try:
        return decide_arch(made, header.metadata, override=override, keys=header.tensors, flat=flat)
    except BloraError as err:
        raise AdapterFileError(err.message, header.path) from None


def _checked_kind(stem: str, shapes: Mapping[str, tuple[int, ...]], path: Path) -> Kind:
    """The module's kind; AdapterFileError for an incomplete parameter set or factors that do not fit together."""
    down = shapes.get("lora_down.weight")
    kernel = tuple(down[2:]) if down is not None and len(down) == 4 else None
    kind = kind_of(frozenset(shapes), len(down) if down is not None else None, kernel)
    if not isinstance(kind, Kind):
        raise AdapterFileError(f"module {stem}: {kind}", path)
    _check_factor_shapes(stem, kind, shapes, path)
    return kind


def _module(
    stem: str,
    params: dict[str, str],
    shapes: dict[str, tuple[int, ...]],
    arch: Arch,
    header: Header,
    name: KeyName,
    config_alphas: Mapping[str, "_ConfigAlpha"],
    path: Path,
) -> Module:
    kind = _checked_kind(stem, shapes, path)
    problem = misfit(stem, _weight_shape(kind, shapes), arch)
    if problem is not None:
        raise AdapterFileError(f"module {stem}: {problem}", path)
    rank = _rank(kind, shapes)
    if rank == 0:
        raise AdapterFileError(f"module {stem}: rank 0 (empty factors)", path)
    empty = next((p for p, shape in shapes.items() if 0 in shape), None)
    if empty is not None:
        raise AdapterFileError(f"module {stem}: {empty} has a zero-size dimension {list(shapes[empty])}", path)
    config_alpha = config_alphas.get(stem)
    alpha = config_alpha.for_rank(rank) if config_alpha is not None else None
    if "alpha" in params:
        alpha = _read_alpha(header, params["alpha"], stem, path)
    placement = place(stem, arch)
    return Module(stem, kind, dict(params), dict(shapes), rank, alpha, placement, name.path)


def _rank(kind: Kind, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    if kind.is_lora:
        return shapes["lora_down.weight"][0]
    if kind is Kind.LOHA:
        return shapes["hada_w1_b"][0]
    if kind is Kind.LOKR:
        if "lokr_t2" in shapes and "lokr_w2_a" in shapes:  # Tucker form: w2_a is (rank, out), as t2 is (rank, rank, k, k)
            return shapes["lokr_w2_a"][0]
        for factor in ("lokr_w2_a", "lokr_w1_a"):
            if factor in shapes:
                return shapes[factor][1]
        return None
    return None


def _check_factor_shapes(stem: str, kind: Kind, shapes: Mapping[str, tuple[int, ...]], path: Path) -> None:
    """Refuse factors whose shapes cannot make one ΔW of the module's weight shape (before any tensor is read)."""
    problem = _shape_problem(kind, shapes)
    if problem is None and kind.has_rank:
        made = _delta_shape(kind, shapes)
        if math.prod(made) != math.prod(_weight_shape(kind, shapes)):
            problem = f"its factors make a {list(made)} ΔW, not one of the weight shape {list(_weight_shape(kind, shapes))}"
    if problem is not None:
        raise AdapterFileError(f"module {stem}: {problem}", path)


def _shape_problem(kind: Kind, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why the factor shapes do not fit together (the arithmetic of `kinds.delta_weight`), or None."""
    if kind.is_lora:
        up, down = shapes["lora_up.weight"], shapes["lora_down.weight"]
        if len(up) < 2 or len(down) < 2 or up[1] != down[0] and kind is not Kind.TUCKER or any(d != 1 for d in up[2:]):
            return f"lora_up {list(up)} does not fit lora_down {list(down)}"
        mid = shapes.get("lora_mid.weight")
        if kind is Kind.TUCKER and (
            len(mid) != 4 or mid[0] != mid[1] or mid[0] != up[1] or mid[1] != down[0] or any(d != 1 for d in down[2:])
        ):
            return f"lora_mid {list(mid)} does not fit lora_up {list(up)} and lora_down {list(down)}"
        return None
    if kind is Kind.LOHA:
        halves = [_half_shape(shapes, f"hada_w{i}_a", f"hada_w{i}_b", f"hada_t{i}", flat=True) for i in "12"]
        problem = next((h for h in halves if isinstance(h, str)), None)
        if problem is None and halves[0] != halves[1]:
            problem = f"its two Hadamard halves have shapes {list(halves[0])} and {list(halves[1])}"
        return problem
    if kind is Kind.LOKR:
        for i in "12":
            half = _lokr_shape(shapes, i)
            if isinstance(half, str):
                return half
            if i == "1" and len(half) != 2 or len(half) not in (2, 4):
                return f"lokr_w{i} would have shape {list(half)}"
    return None


def _half_shape(shapes: Mapping[str, tuple[int, ...]], a_key: str, b_key: str, core_key: str, *, flat: bool):
    """Shape of a_key @ b_key (with an optional Tucker core), or a message; `flat` flattens b's trailing dims."""
    a, b, core = shapes[a_key], shapes[b_key], shapes.get(core_key)
    if len(a) != 2 or len(b) < 2 or (not flat and core is None and len(b) not in (2, 4)):
        return f"{a_key} {list(a)} and {b_key} {list(b)} are not factor shapes"
    if core is not None:
        if len(core) != 4 or core[0] != core[1] or core[0] != a[0] or core[1] != b[0]:
            return f"{core_key} {list(core)} does not fit {a_key} {list(a)} and {b_key} {list(b)}"
        return (a[1], math.prod(b[1:])) + tuple(core[2:])
    if a[1] != b[0]:
        return f"{a_key} {list(a)} does not fit {b_key} {list(b)}"
    return (a[0], math.prod(b[1:])) if flat else (a[0],) + tuple(b[1:])


def _lokr_shape(shapes: Mapping[str, tuple[int, ...]], i: str):
    whole = shapes.get(f"lokr_w{i}")
    if whole is not None:
        return tuple(whole)
    return _half_shape(shapes, f"lokr_w{i}_a", f"lokr_w{i}_b", "lokr_t2" if i == "2" else "", flat=False)


def _delta_shape(kind: Kind, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The shape `kinds.delta_weight` makes before its final reshape (shapes already checked)."""
    if kind.is_lora:
        up, down = shapes["lora_up.weight"], shapes["lora_down.weight"]
        inner = shapes["lora_mid.weight"][2:] if kind is Kind.TUCKER else down[2:]
        return (up[0], down[1] * math.prod(inner))
    if kind is Kind.LOHA:
        return _half_shape(shapes, "hada_w1_a", "hada_w1_b", "hada_t1", flat=True)
    w1, w2 = _lokr_shape(shapes, "1"), _lokr_shape(shapes, "2")
    return (w1[0] * w2[0], w1[1] * w2[1]) + tuple(w2[2:])


def _weight_shape(kind: Kind, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    if kind.is_lora:
        up, down = shapes["lora_up.weight"], shapes["lora_down.weight"]
        if kind is Kind.TUCKER:
            return (up[0], down[1]) + tuple(shapes["lora_mid.weight"][2:])
        return (up[0],) + tuple(down[1:])
    if kind is Kind.LOHA:
        a, b = shapes["hada_w1_a"], shapes["hada_w1_b"]
        if "hada_t1" in shapes:
            return (a[1], b[1]) + tuple(shapes["hada_t1"][2:])
        return (a[0],) + tuple(b[1:])
    if kind is Kind.LOKR:
        w1, w2 = _lokr_shape(shapes, "1"), _lokr_shape(shapes, "2")
        return (w1[0] * w2[0], w1[1] * w2[1]) + tuple(w2[2:])
    return tuple(shapes["diff" if kind is Kind.FULL else "w_norm"])


_SCALAR_FORMATS = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B"}


def _read_alpha(header: Header, key: str, stem: str, path: Path) -> float:
    """Decode a 0-d or 1-element alpha of any common dtype without torch."""
    info = header.tensors[key]
    if info.numel != 1:
        raise AdapterFileError(f"module {stem}: alpha has shape {list(info.shape)}, expected a single value", path)
    with path.open("rb", buffering=0) as f:  # unbuffered: a few bytes, not a read-ahead block, per alpha
        data = os.pread(f.fileno(), info.nbytes, header.data_start + info.begin)
    if info.dtype == "BF16":
        value = struct.unpack("<f", b"\x00\x00" + data)[0]
    elif info.dtype in _SCALAR_FORMATS:
        value = struct.unpack(_SCALAR_FORMATS[info.dtype], data)[0]
    else:
        raise AdapterFileError(f"module {stem}: alpha has dtype {info.dtype}, expected a number", path)
    value = float(value)
    if not math.isfinite(value):
        raise AdapterFileError(f"module {stem}: alpha is {value}", path)
    return value


@dataclass(frozen=True)
class _ConfigAlpha:
    """A module's alpha as a PEFT config gives it; with rsLoRA PEFT scales by alpha/√rank, not alpha/rank."""

    value: float
    rslora: bool = False

    def for_rank(self, rank: int | None) -> float:
        """The alpha that gives this module PEFT's scale under the product's alpha/rank rule."""
        return self.value * math.sqrt(rank) if self.rslora and rank else self.value


_PEFT_DEFAULT_ALPHA = 8
"""`LoraConfig.lora_alpha`'s default (PEFT `tuners/lora/config.py`): what a config without `lora_alpha` gets."""
_PEFT_COMPONENT_OF_STEM = MappingProxyType(
    {"lora_unet_": Component.UNET, "lora_te_": Component.TE, "lora_te1_": Component.TE1,
     "lora_te2_": Component.TE2, "lora_te3_": Component.TE3}
)
_PEFT_ROOTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def _read_config_alphas(
    metadata: Mapping[str, str], names: Mapping[str, KeyName], path: Path, arch: Arch
) -> dict[str, _ConfigAlpha]:
    """Per-module alphas of a PEFT-family file from its `lora_adapter_metadata` (PEFT's own rules).

    The JSON holds `LoraConfig` fields, prefixed per component the way diffusers writes them (`unet.lora_alpha`)
    or unprefixed (PEFT's `adapter_config.json`). A module's alpha is `lora_alpha` (PEFT's default 8 when the
    config leaves it out), replaced by the first `alpha_pattern` entry whose regular expression matches the end
    of its dotted path, as PEFT's `get_pattern_key` matches `(.*\\.)?(pattern)$`. A component without any config
    gets none (alpha = rank, diffusers' rule for files without alphas). Malformed configs are AdapterFileError.
    """
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return {}
    doc = _parse_config_json(raw, PEFT_METADATA_KEY, path)
    configs: dict[str, dict] = defaultdict(dict)
    for key, value in doc.items():
        component, dot, field_name = key.partition(".")
        if dot and component in _PEFT_ROOTS:
            configs[component][field_name] = value
        else:
            configs[""][key] = value
    checked = {name: _checked_config(config, name or PEFT_METADATA_KEY, path) for name, config in configs.items()}
    alphas: dict[str, _ConfigAlpha] = {}
    for stem, name in names.items():
        prefix = next(p for p in _PEFT_COMPONENT_OF_STEM if stem.startswith(p))
        try:  # the pipeline's name for it: Flux's T5 is `text_encoder_2`, its transformer `transformer`
            root = peft_root(_PEFT_COMPONENT_OF_STEM[prefix], arch)
        except KeyError:
            root = ""
        config = checked.get(root) or checked.get("")
        if config is None:
            continue
        alpha, patterns, rslora = config
        for pattern, value in patterns:
            if name.path is not None and pattern.match(name.path):
                alpha = value
                break
        alphas[stem] = _ConfigAlpha(alpha, rslora)
    return alphas


def _parse_config_json(raw: str, what: str, path: Path) -> dict:
    """The config as a JSON object, read by the product's one JSON rule (no NaN/Infinity: a non-finite alpha is
    refused here); AdapterFileError saying why otherwise."""
    try:
        doc = loads_strict(raw)
    except ValueError as err:
        raise AdapterFileError(f"{what} is not valid JSON ({err})", path) from None
    if not isinstance(doc, dict):
        raise AdapterFileError(f"{what} must be a JSON object of LoraConfig fields, not {_json_type(doc)}", path)
    return doc


def _checked_config(config: Mapping, what: str, path: Path):
    """(lora_alpha, [(compiled alpha pattern, value)], use_rslora) of one component's config, checked."""
    alpha = _number(config.get("lora_alpha", _PEFT_DEFAULT_ALPHA), f"{what}: lora_alpha", path)
    for field_name in ("alpha_pattern", "rank_pattern"):
        value = config.get(field_name)
        if value is not None and not isinstance(value, dict):
            raise AdapterFileError(f"{what}: {field_name} must be an object of pattern: value, not {_json_type(value)}", path)
    for pattern, rank in (config.get("rank_pattern") or {}).items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise AdapterFileError(f"{what}: rank_pattern[{pattern!r}] is {rank!r}, expected a positive integer", path)
    patterns = []
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        number = _number(value, f"{what}: alpha_pattern[{pattern!r}]", path)
        try:
            patterns.append((re.compile(rf"(.*\.)?({pattern})$"), number))
        except re.error as err:
            raise AdapterFileError(f"{what}: alpha_pattern key {pattern!r} is not a valid pattern ({err})", path) from None
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise AdapterFileError(f"{what}: use_rslora is {rslora!r}, expected true or false", path)
    return alpha, patterns, rslora


def _number(value: object, what: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdapterFileError(f"{what} is {value!r:.40}, expected a number", path)
    return float(value)


def _json_type(value: object) -> str:
    return {list: "a list", str: "a string", dict: "an object", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )
