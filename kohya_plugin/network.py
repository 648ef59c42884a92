"""BlockwiseNetwork: the sd-scripts network contract (DESIGN.md §4) over per-block LoRA/LoCon modules.

Building a network is two steps. `plan_modules` walks the models (reading only) and decides, from a
`BlockSpec`, which layers get a module and with which rank, alpha and learning-rate weight; it raises
`SpecError` when nothing would be trained and reports blocks that were asked for but hold no layer a LoRA can
train. `BlockwiseNetwork` then makes the modules. Nothing touches the models until `apply_to` (forward swap)
or `merge_to` (weights).

Files. `save_weights` writes kohya's keys with ONE alpha value for every module — the training alpha shared by
most modules (ties: `--network_alpha`, then the smaller) — and folds each other module's alpha/file-alpha ratio
into its up factor, so ΔW is the same for every loader and diffusers loads it exactly (DESIGN.md §3). The
training alphas go into the `blora_spec` metadata (per block, plus `module_alphas` for any module the blocks do
not describe). `load_weights` keeps this network's alphas and rescales each loaded up factor by
file-alpha/training-alpha, so any kohya file keeps its ΔW and the plugin's own file restores the trained factors.
A plain `load_state_dict` (gen_img.py's path) also keeps ΔW: it loads the file's alphas with the factors.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from blora_tools.adapter.formats import Format, split_key, stem_from_path
from blora_tools.errors import AdapterFileError, OutputError, SpecError
from blora_tools.spec import CONV_KINDS, Algo, BlockSetting, BlockSpec
from blora_tools.taxonomy.arch import Arch
from blora_tools.taxonomy.blocks import Component, Placement, place, table
from blora_tools.taxonomy.selectors import describe_blocks
from kohya_plugin.args import NetworkArgs, TrainOptions, parse_weights_args
from kohya_plugin.modules import LoRAModule
from kohya_plugin.targets import Target, detect_unet_arch, find_targets, layer_kind

MODULE_NAME = "kohya_plugin.blockwise"
"""The `--network_module` name, written to `ss_network_module`."""

logger = logging.getLogger(__name__)

_FACTOR_KEYS = ("lora_down.weight", "lora_up.weight")
_MODULE_KEYS = frozenset(_FACTOR_KEYS + ("alpha",))


class BlockwiseWarning(UserWarning):
    """A configuration that works but probably not as meant (e.g. a block with nothing to train)."""


@dataclass(frozen=True)
class PlannedModule:
    """One module the network will have: the layer, its rank, training alpha and learning-rate weight."""

    target: Target
    rank: int
    alpha: float
    lr_weight: float

    @property
    def params(self) -> int:
        """Trainable parameters: rank · (fan-in · k·k + fan-out)."""
        shape = tuple(self.target.layer.weight.shape)
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        return self.rank * (fan_in + shape[0])


def plan_modules(
    text_encoder: nn.Module | Sequence[nn.Module | None] | None,
    unet: nn.Module,
    spec: BlockSpec,
    *,
    explicit: bool = True,
    chooser: str = "network_args",
) -> tuple[list[PlannedModule], list[str]]:
    """Decide every module from the spec (models are only read). Returns (modules, warnings).

    A module exists where its block's rank (k×k convs: conv rank) is > 0. Layers that only a LoCon network
    wraps (inside ResNet, down- and upsampling blocks: their linear and 1×1 layers too) exist only where the
    block's conv rank is > 0. With `explicit`, trained U-Net groups that get no module are warned about;
    a spec that would train nothing raises SpecError.
    """
    arch, attention = find_targets(text_encoder, unet, include_conv=False)
    if arch is not spec.arch:
        raise SpecError(f"the spec is for {spec.arch.value} but the U-Net is {arch.value}")
    _, every = find_targets(text_encoder, unet, include_conv=True)
    attention_names = {t.name for t in attention}
    planned: list[PlannedModule] = []
    for target in every:
        setting = spec.setting(target.placement)
        if target.name not in attention_names and setting.conv_rank == 0:
            continue
        rank, alpha = spec.rank_alpha(target.placement, target.kind)
        if rank > 0:
            planned.append(PlannedModule(target, rank, alpha, setting.lr_weight))

    layout = table(arch)
    covered = {m.target.placement.group for m in planned}
    has_conv = {t.placement.group for t in every if t.name not in attention_names}
    empty = [
        g for g, members in layout.group_members.items()
        if g not in covered and any(s.trained for b in members for s in spec.settings_of(b))
    ]
    conv_hint = "give them a conv rank (conv_dim=N, LoCon) to train their convolutions"
    if not planned:
        chosen = describe_blocks(spec.trained_blocks, arch)
        if empty and set(empty) <= has_conv:
            raise SpecError(
                f"{chooser} selects {chosen} on {arch.value}, but {', '.join(empty)} hold no attention layers, "
                f"so a LoRA there would be empty: conv_dim is needed; add conv_dim=N (LoCon), e.g. conv_dim=8"
            )
        raise SpecError(f"{chooser} selects {chosen} on {arch.value}, but no layer there can take an adapter")
    messages = []
    if explicit and empty:
        names = ", ".join(f"{g} ({'/'.join(layout.group_members[g])})" for g in empty)
        hint = conv_hint if set(empty) <= has_conv else "they hold no layer this network can train"
        messages.append(f"blocks {names} are asked for but get no module (no attention layers): {hint}")
    return planned, messages


def load_weights_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a `.safetensors` file (pickle files are refused with how to convert them)."""
    from safetensors.torch import load_file

    from blora_tools.adapter.header import read_header

    header = read_header(path)
    return load_file(str(path)), dict(header.metadata)


def _group_keys(weights_sd: Mapping[str, torch.Tensor], source: str = "weights") -> dict[str, dict[str, torch.Tensor]]:
    """kohya stem → {parameter: tensor}; keys of no adapter module (e.g. `bundle_emb.*`) are left out.

    Only kohya-named files: a PEFT/diffusers file would need its alphas from metadata, so it is refused.
    """
    stems: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights_sd.items():
        name = split_key(key)
        if name is None:
            continue
        if name.format is not Format.KOHYA:
            raise AdapterFileError(
                f"key {key!r} is in {name.format.value} format; this network loads kohya files "
                "(convert it with blora-tools convert)", source
            )
        stems.setdefault(name.stem, {})[name.param] = value
    return stems


def _shapes_fit(have: Sequence[int], want: Sequence[int]) -> bool:
    """Equal shapes, or equal but for the 2-D ↔ 1×1-conv difference (SD2's two `proj_in` forms)."""
    have, want = tuple(have), tuple(want)
    if have == want:
        return True
    return have[:2] == want[:2] and all(d == 1 for d in have[2:] + want[2:])


def _fit(tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor | None:
    """`tensor` reshaped to `shape` where `_shapes_fit`, else None."""
    return tensor.reshape(tuple(shape)) if _shapes_fit(tensor.shape, shape) else None


def _file_alpha(alphas: Iterable[float], preferred: float) -> float:
    """The alpha shared by most modules; ties go to `preferred`, then to the smaller value."""
    counts = Counter(alphas)
    if not counts:
        return preferred
    top = max(counts.values())
    tied = sorted(a for a, n in counts.items() if n == top)
    return preferred if preferred in tied else tied[0]


class BlockwiseNetwork(nn.Module):
    """Per-block LoRA/LoCon for sd-scripts: the methods `train_network.py` calls, in its order."""

    def __init__(
        self,
        spec: BlockSpec,
        options: TrainOptions,
        planned: Sequence[PlannedModule],
        *,
        multiplier: float = 1.0,
        notes: Iterable[str] = (),
    ):
        super().__init__()
        self.spec = spec
        self.arch = spec.arch
        self.options = options
        self.multiplier = float(multiplier)
        self.text_encoder_loras: list[LoRAModule] = []
        self.unet_loras: list[LoRAModule] = []
        self._placement: dict[str, Placement] = {}
        self._kind: dict[str, str] = {}
        self._lr_weight: dict[str, float] = {}
        for p in planned:
            module = LoRAModule.for_layer(
                p.target.name, p.target.layer, p.rank, p.alpha,
                multiplier=self.multiplier, dropout=options.dropout,
                rank_dropout=options.rank_dropout, module_dropout=options.module_dropout,
            )
            self.add_module(p.target.name, module)
            is_te = p.target.placement.component is not Component.UNET
            (self.text_encoder_loras if is_te else self.unet_loras).append(module)
            self._placement[p.target.name] = p.target.placement
            self._kind[p.target.name] = p.target.kind
            self._lr_weight[p.target.name] = p.lr_weight
        self.warnings: list[str] = list(notes)
        for message in self.warnings:
            warnings.warn(message, BlockwiseWarning, stacklevel=3)
        self._log_summary()

    # --- construction ----------------------------------------------------------------------------

    @classmethod
    def from_args(
        cls,
        text_encoder: nn.Module | Sequence[nn.Module | None] | None,
        unet: nn.Module,
        parsed: NetworkArgs,
        *,
        multiplier: float = 1.0,
    ) -> "BlockwiseNetwork":
        """A fresh network for parsed `--network_args`."""
        planned, messages = plan_modules(
            text_encoder, unet, parsed.spec, explicit=parsed.explicit_blocks, chooser=parsed.chooser
        )
        return cls(parsed.spec, parsed.options, planned, multiplier=multiplier, notes=(*parsed.notes, *messages))

    @classmethod
    def from_weights(
        cls,
        text_encoder: nn.Module | Sequence[nn.Module | None] | None,
        unet: nn.Module,
        weights_sd: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None = None,
        *,
        multiplier: float = 1.0,
        network_args: Mapping[str, object] | None = None,
        source: str = "weights",
    ) -> "BlockwiseNetwork":
        """A network with exactly the modules of a kohya LoRA/LoCon state dict: per-module rank from the shapes,
        alpha from `.alpha` (else the rank), or the training alphas where the file is this plugin's own.

        `network_args` may set learning-rate weights, dropouts and LoRA+ ratios; rank arguments are ignored.
        """
        arch = detect_unet_arch(unet)
        lr_block, lr_slot, options, lr_given, notes = parse_weights_args(network_args or {}, arch)
        notes = list(notes)
        file_spec, doc = _spec_of_file(metadata or {}, arch, notes, source)
        stems = _group_keys(weights_sd, source)
        _check_module_kinds(stems, source)

        _, targets = find_targets(text_encoder, unet, include_conv=True)
        by_name = {t.name: t for t in targets}
        have_te = any(t.placement.component is not Component.UNET for t in targets)
        other_layers: dict[str, Target] | None = None
        planned: list[PlannedModule] = []
        unmatched: list[str] = []
        skipped_te: list[str] = []
        for stem, tensors in stems.items():
            if not (set(tensors) & set(_FACTOR_KEYS)):
                continue
            target = by_name.get(stem)
            if target is None:
                if other_layers is None:
                    other_layers = _other_layers(text_encoder, unet, arch, by_name)
                target = other_layers.get(stem)
            if target is None:
                placement = place(stem, arch)
                is_te = placement is not None and placement.component is not Component.UNET
                (skipped_te if is_te and not have_te else unmatched).append(stem)
                continue
            down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
            weight_shape = tuple(target.layer.weight.shape)
            delta_shape = (up.shape[0], *down.shape[1:])
            if not _shapes_fit(delta_shape, weight_shape):
                raise SpecError(
                    f"{source}: {stem} has factors for a {list(delta_shape)} weight but the layer's is "
                    f"{list(weight_shape)}; is the file for another model?"
                )
            rank = int(down.shape[0])
            file_alpha = _alpha_of(stem, tensors, rank, source)
            alpha = _training_alpha(stem, target, rank, file_alpha, file_spec, doc)
            planned.append(PlannedModule(target, rank, alpha, _lr_of(target.placement, lr_block, lr_slot)))
        if unmatched:
            shown = ", ".join(sorted(unmatched)[:3])
            raise SpecError(
                f"{source}: {len(unmatched)} module(s) match no layer of this {arch.value} model "
                f"(e.g. {shown}); is the file for another architecture?"
            )
        if skipped_te:
            notes.append(f"{source}: {len(skipped_te)} text-encoder modules skipped: no text encoder was given")
        if not planned:
            raise SpecError(f"{source}: no LoRA/LoCon module in the file matches this {arch.value} model")
        order = {t.name: i for i, t in enumerate(targets)}
        planned.sort(key=lambda p: (order.get(p.target.name, len(order)), p.target.name))
        spec = _spec_for_weights(arch, planned, lr_block, lr_slot, lr_given, file_spec)
        return cls(spec, options, planned, multiplier=multiplier, notes=notes)

    def _log_summary(self) -> None:
        logger.info(
            "blockwise %s %s: %d text-encoder and %d U-Net modules",
            self.arch.value, self.spec.algo.value, len(self.text_encoder_loras), len(self.unet_loras),
        )
        if not self.options.verbose:
            return
        per_group: dict[str, list[LoRAModule]] = {}
        for module in self._loras():
            per_group.setdefault(self._placement[module.lora_name].group, []).append(module)
        for group, modules in per_group.items():
            ranks = sorted({m.lora_dim for m in modules})
            alphas = sorted({m.alpha_value for m in modules})
            lrs = sorted({self._lr_weight[m.lora_name] for m in modules})
            logger.info("  %-5s %4d modules, rank %s, alpha %s, lr weight %s", group, len(modules), ranks, alphas, lrs)

    # --- helpers ---------------------------------------------------------------------------------

    def _loras(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    def block_of(self, lora_name: str) -> Placement:
        """Where a module sits."""
        return self._placement[lora_name]

    def _describe(self, modules: Iterable[LoRAModule]) -> str:
        """Name the blocks of some modules: a group where they are all of the group's modules, else LBW IDs."""
        present = {self._placement[m.lora_name].block for m in modules}
        per_group: dict[str, set[str]] = {}
        for placement in self._placement.values():
            per_group.setdefault(placement.group, set()).add(placement.block)
        layout = table(self.arch)
        parts: list[str] = []
        for group in (*layout.groups, "none"):
            blocks = per_group.get(group, set())
            if blocks and blocks <= present:
                parts.append(group)
            else:
                parts.extend(b for b in layout.blocks if b in blocks & present)
        return ",".join(parts)

    def _drop(self, modules: list[LoRAModule]) -> None:
        for module in modules:
            module.remove()
            delattr(self, module.lora_name)
        modules.clear()

    # --- the trainer contract, in call order ------------------------------------------------------

    def prepare_network(self, args=None) -> None:
        """Called by sd-scripts before apply_to; nothing to prepare."""

    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder: bool = True, apply_unet: bool = True,
                 *args, **kwargs) -> None:
        """Swap the modules' forwards into their layers (idempotent). Modules of a part not applied are dropped."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
        if not apply_unet:
            self._drop(self.unet_loras)
        for module in self._loras():
            module.apply_to()
        logger.info(
            "blockwise: applied %d text-encoder and %d U-Net modules",
            len(self.text_encoder_loras), len(self.unet_loras),
        )

    def remove_from(self) -> None:
        """Undo `apply_to`: every layer gets its own forward back."""
        for module in reversed(self._loras()):
            module.remove()

    def load_weights(self, file: str | Path) -> _IncompatibleKeys:
        """Load a kohya LoRA/LoCon `.safetensors` file into the modules, before or after apply_to.

        This network keeps its alphas; each up factor is rescaled by file-alpha / training-alpha so ΔW is the
        file's. Returns the missing and unexpected keys; factor shapes that differ raise SpecError (resume with
        the same `--network_args`, or use `--dim_from_weights`).
        """
        weights_sd, _ = load_weights_file(file)
        return self.load_factors(weights_sd, source=str(file))

    def load_factors(self, weights_sd: Mapping[str, torch.Tensor], source: str = "weights") -> _IncompatibleKeys:
        """`load_weights` for an in-memory kohya state dict."""
        stems = _group_keys(weights_sd, source)
        _check_module_kinds(stems, source)
        plan: list[tuple[LoRAModule, torch.Tensor, torch.Tensor, float]] = []
        missing: list[str] = []
        mismatched: list[str] = []
        for module in self._loras():
            tensors = stems.get(module.lora_name)
            if tensors is None or not set(_FACTOR_KEYS) <= set(tensors):
                missing += [f"{module.lora_name}.{k}" for k in _FACTOR_KEYS + ("alpha",) if k not in (tensors or {})]
                continue
            down = _fit(tensors["lora_down.weight"], module.lora_down.weight.shape)
            up = _fit(tensors["lora_up.weight"], module.lora_up.weight.shape)
            if down is None or up is None:
                mismatched.append(
                    f"{module.lora_name}: file {list(tensors['lora_down.weight'].shape)}, "
                    f"network {list(module.lora_down.weight.shape)}"
                )
                continue
            alpha = _alpha_of(module.lora_name, tensors, down.shape[0], source)
            plan.append((module, down, up, alpha))
        if mismatched:
            raise SpecError(
                f"{source}: {len(mismatched)} module(s) have other ranks or shapes than this network "
                f"({'; '.join(mismatched[:2])}); use the network_args the file was trained with, "
                "or --dim_from_weights"
            )
        names = sorted(m.lora_name for m in self._loras())
        extra = sorted(set(stems) - set(names))
        if not plan and names:
            raise SpecError(
                f"{source}: none of its {len(stems)} modules is one of this network's {len(names)} "
                f"(file: {', '.join(sorted(stems)[:2]) or 'no LoRA modules'}; network: {', '.join(names[:2])}); "
                "is the file for another model, or trained with other network_args (preset, blocks, te_dim)?"
            )
        if extra or missing:
            absent = sorted({key.partition(".")[0] for key in missing})
            parts = [f"{len(absent)} network module(s) are not in the file and keep their initial values "
                     f"(e.g. {absent[0]})"] if absent else []
            parts += [f"{len(extra)} module(s) of the file are not in this network and are ignored "
                      f"(e.g. {extra[0]})"] if extra else []
            warnings.warn(f"{source}: {'; '.join(parts)}", BlockwiseWarning, stacklevel=2)
        with torch.no_grad():
            for module, down, up, alpha in plan:
                ratio = alpha / module.alpha_value
                if ratio != 1.0:
                    up = up.double() * ratio
                module.lora_down.weight.copy_(down.to(module.lora_down.weight.dtype))
                module.lora_up.weight.copy_(up.to(module.lora_up.weight.dtype))
        known = {m.lora_name for m in self._loras()}
        unexpected = [
            key for key in weights_sd
            if key.partition(".")[0] not in known or key.partition(".")[2] not in _MODULE_KEYS
        ]
        return _IncompatibleKeys(missing, unexpected)

    def enable_gradient_checkpointing(self, *args, **kwargs) -> None:
        """Nothing to do: the modules run inside the base model's (checkpointed) forward."""

    def prepare_optimizer_params(self, text_encoder_lr=None, unet_lr=None, default_lr=None, *args, **kwargs):
        """(param_groups, descriptions): one group per part and learning rate, LoRA+ up factors apart.

        `text_encoder_lr` may be a list (one per SDXL text encoder). A missing rate falls back to `default_lr`;
        a group whose rate is 0 is left out (not trained), as in kohya. Never returns an empty list.
        """
        self.requires_grad_(True)
        te_components = [c for c in table(self.arch).text_encoders]
        if isinstance(text_encoder_lr, (list, tuple)):
            rates = [r for r in text_encoder_lr if r is not None]
            te_base = {c: (rates[min(i, len(rates) - 1)] if rates else default_lr) for i, c in enumerate(te_components)}
        else:
            te_base = {c: (text_encoder_lr if text_encoder_lr is not None else default_lr) for c in te_components}
        unet_base = unet_lr if unet_lr is not None else default_lr

        buckets: dict[tuple[str, float | None], list[LoRAModule]] = {}
        for module in self._loras():
            placement = self._placement[module.lora_name]
            is_te = placement.component is not Component.UNET
            base = te_base[placement.component] if is_te else unet_base
            weight = self._lr_weight[module.lora_name]
            if base is None and weight != 1.0:
                raise SpecError(
                    "block learning-rate weights need a learning rate: set --learning_rate or --unet_lr"
                )
            lr = None if base is None else base * weight
            buckets.setdefault(("textencoder" if is_te else "unet", lr), []).append(module)

        families = Counter(part for part, _ in buckets)
        groups: list[dict] = []
        descriptions: list[str] = []
        for (part, lr), modules in buckets.items():
            if lr == 0:
                continue
            ratio = self.options.te_plus_ratio if part == "textencoder" else self.options.unet_plus_ratio
            name = part
            if families[part] > 1:
                name = f"{part} {self._describe(modules)}"
            plain = [m.lora_down.weight for m in modules]
            ups = [m.lora_up.weight for m in modules]
            if ratio is None:
                groups.append(_group(plain + ups, lr))
                descriptions.append(name)
            else:
                groups.append(_group(plain, lr))
                descriptions.append(name)
                groups.append(_group(ups, None if lr is None else lr * ratio))
                descriptions.append(f"{name} plus")
        if not groups:
            raise SpecError(
                "no parameters to train: every learning rate of this network is 0 "
                "(check --unet_lr, --text_encoder_lr and --network_train_*_only)"
            )
        return groups, descriptions

    def prepare_grad_etc(self, text_encoder=None, unet=None, *args, **kwargs) -> None:
        """Make every adapter factor trainable (the base models stay frozen by the trainer)."""
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder=None, unet=None, *args, **kwargs) -> None:
        """Training mode: dropouts on."""
        self.train()

    def on_step_start(self, *args, **kwargs) -> None:
        """Nothing per step."""

    def get_trainable_params(self) -> list[nn.Parameter]:
        """The parameters to clip gradients over."""
        return [p for p in self.parameters() if p.requires_grad]

    def apply_max_norm_regularization(self, max_norm_value: float, device=None) -> tuple[int, float, float]:
        """Scale down modules whose ‖ΔW‖ exceeds `max_norm_value` (kohya's rule, norms from the factors).

        Returns (modules scaled, mean norm, max norm) after scaling.
        """
        keys_scaled = 0
        norms: list[float] = []
        for module in self._loras():
            norm = float(module.delta_norm())
            clamped = max(norm, max_norm_value / 2)
            ratio = min(clamped, max_norm_value) / clamped
            if ratio != 1.0:
                keys_scaled += 1
                module.rescale_(ratio)
            norms.append(norm * ratio)
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)

    def set_multiplier(self, multiplier: float) -> None:
        """Strength of every module's ΔW (1.0 while training)."""
        self.multiplier = float(multiplier)
        for module in self._loras():
            module.multiplier = self.multiplier

    def is_mergeable(self) -> bool:
        """merge_to is supported."""
        return True

    def merge_to(self, text_encoder=None, unet=None, weights_sd=None, dtype=None, device=None) -> None:
        """Add each module's ΔW from `weights_sd` (a kohya state dict) to its layer's weight, times the multiplier.

        Used for `--base_weights`. Every module is checked before any weight is written; weights keep their dtype.
        """
        if weights_sd is None:
            raise SpecError("merge_to needs the weights state dict (from create_network_from_weights)")
        stems = _group_keys(weights_sd)
        work: list[tuple[LoRAModule, dict[str, torch.Tensor]]] = []
        for module in self._loras():
            tensors = stems.get(module.lora_name)
            if tensors is None or not set(_FACTOR_KEYS) <= set(tensors):
                continue
            down = _fit(tensors["lora_down.weight"], module.lora_down.weight.shape)
            up = _fit(tensors["lora_up.weight"], module.lora_up.weight.shape)
            if down is None or up is None:
                raise SpecError(f"merge_to: {module.lora_name} has factors of another shape than this network's")
            work.append((module, {**tensors, "lora_down.weight": down, "lora_up.weight": up}))
        for module, tensors in work:
            module.merge_to(tensors, device)
        logger.info("blockwise: merged %d modules into the model", len(work))

    def save_weights(self, file: str | Path, dtype: torch.dtype | None = None, metadata: Mapping | None = None) -> None:
        """Write a kohya-format `.safetensors` file: one alpha for all modules, `blora_spec`, sshs hashes.

        `dtype` (None: each factor's own) is the stored dtype; `metadata` is copied, never changed.
        """
        from blora_tools.adapter.writer import save_state_dict

        path = Path(file)
        if path.suffix.lower() != ".safetensors":
            raise OutputError("the blockwise network saves only .safetensors (use --save_model_as safetensors)", path)
        tensors, file_alpha, exceptions = self.file_state_dict(dtype)
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta["ss_network_module"] = MODULE_NAME
        extra: dict = {"file_alpha": file_alpha}
        if exceptions:
            extra["module_alphas"] = exceptions
        meta["blora_spec"] = self.spec.to_json(extra)
        save_state_dict(path, tensors, meta)

    def file_state_dict(self, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], float, dict]:
        """The tensors `save_weights` writes, the file's single alpha, and the training alphas the spec misses."""
        file_alpha = _file_alpha((m.alpha_value for m in self._loras()), self.spec.network_alpha)
        tensors: dict[str, torch.Tensor] = {}
        exceptions: dict[str, float] = {}
        for module in self._loras():
            name = module.lora_name
            out_dtype = dtype or module.lora_up.weight.dtype
            stored = torch.tensor(file_alpha, dtype=out_dtype)
            ratio = module.alpha_value / float(stored)
            up = module.lora_up.weight.detach()
            up = (up.double() * ratio) if ratio != 1.0 else up
            tensors[f"{name}.lora_down.weight"] = module.lora_down.weight.detach().to("cpu", out_dtype).clone()
            tensors[f"{name}.lora_up.weight"] = up.to("cpu", out_dtype).clone()
            tensors[f"{name}.alpha"] = stored
            rank, alpha = self.spec.rank_alpha(self._placement[name], self._kind[name])
            if rank != module.lora_dim or alpha != module.alpha_value:
                exceptions[name] = module.alpha_value
        return tensors, file_alpha, exceptions


def _group(params: list[nn.Parameter], lr: float | None) -> dict:
    group: dict = {"params": params}
    if lr is not None:
        group["lr"] = lr
    return group


def _lr_of(placement: Placement, lr_block: Mapping[str, float], lr_slot: Mapping[int, float]) -> float:
    if placement.component is Component.UNET and placement.kohya_index in lr_slot:
        return lr_slot[placement.kohya_index]
    return lr_block[placement.block]


def _alpha_of(stem: str, tensors: Mapping[str, torch.Tensor], rank: int, source: str) -> float:
    """A module's alpha from the file (0-d or 1-element; else the rank); AdapterFileError if unusable."""
    if "alpha" not in tensors:
        return float(rank)
    alpha = tensors["alpha"]
    if alpha.numel() != 1:
        raise AdapterFileError(f"module {stem}: alpha has shape {list(alpha.shape)}, expected a single value", source)
    value = float(alpha.reshape(()))
    if not math.isfinite(value):
        raise AdapterFileError(f"module {stem}: alpha is {value}", source)
    return value


def _check_module_kinds(stems: Mapping[str, Mapping[str, torch.Tensor]], source: str) -> None:
    """Refuse modules this network cannot represent (LoHa, LoKr, Tucker cores, DoRA, full diffs), and no modules."""
    if not stems:
        raise AdapterFileError("no LoRA modules in it: a full model or another kind of file, not an adapter", source)
    foreign = sorted({p for tensors in stems.values() for p in tensors if p not in _MODULE_KEYS})
    if foreign:
        raise AdapterFileError(
            f"holds {', '.join(foreign[:4])} tensors; this network loads plain LoRA/LoCon only "
            "(no LoHa, LoKr, Tucker lora_mid or DoRA)", source
        )
    half = [s for s, t in stems.items() if not set(_FACTOR_KEYS) <= set(t)]
    if half:
        raise AdapterFileError(f"module {half[0]} has only some of lora_down/lora_up", source)


def _other_layers(
    text_encoder: nn.Module | Sequence[nn.Module | None] | None,
    unet: nn.Module,
    arch: Arch,
    known: Mapping[str, Target],
) -> dict[str, Target]:
    """Every other Linear/Conv2d of the models under its kohya name: LyCORIS-style files also adapt layers
    kohya does not (conv_in, time embeddings, conv_out)."""
    if text_encoder is None or isinstance(text_encoder, nn.Module):
        encoders = [text_encoder]
    else:
        encoders = list(text_encoder)
    roots = [("unet", unet)]
    roots += [(c.value, m) for c, m in zip(table(arch).text_encoders, encoders) if m is not None]
    found: dict[str, Target] = {}
    for component, root in roots:
        for path, layer in root.named_modules():
            kind = layer_kind(layer)
            name = stem_from_path(component, path) if kind else None
            placement = place(name, arch) if name else None
            if name and name not in known and placement is not None:
                found[name] = Target(name, layer, kind, placement)
    return found


def _spec_of_file(
    metadata: Mapping[str, str], arch: Arch, notes: list[str], source: str
) -> tuple[BlockSpec | None, dict]:
    """This plugin's spec from a file's `blora_spec` (None for other files, or when it cannot be used)."""
    text = metadata.get("blora_spec")
    if not text:
        return None, {}
    try:
        spec = BlockSpec.from_json(text)
        doc = json.loads(text)
    except SpecError as err:
        notes.append(f"{source}: blora_spec ignored ({err.message}); using the file's alphas")
        return None, {}
    if spec.arch is not arch:
        raise SpecError(f"{source}: the file was trained for {spec.arch.value} but the U-Net is {arch.value}")
    return spec, doc


def _training_alpha(
    stem: str, target: Target, rank: int, file_alpha: float, spec: BlockSpec | None, doc: Mapping
) -> float:
    """The alpha the module was trained with, where the file says so; else the file's own alpha."""
    if spec is None:
        return file_alpha
    exceptions = doc.get("module_alphas") or {}
    if stem in exceptions:
        try:
            return float(exceptions[stem])
        except (TypeError, ValueError):
            return file_alpha
    spec_rank, spec_alpha = spec.rank_alpha(target.placement, target.kind)
    return spec_alpha if spec_rank == rank else file_alpha


def _spec_for_weights(
    arch: Arch,
    planned: Sequence[PlannedModule],
    lr_block: Mapping[str, float],
    lr_slot: Mapping[int, float],
    lr_given: bool,
    file_spec: BlockSpec | None,
) -> BlockSpec:
    """The spec of a network built from a file: the file's own where it has one, else the most common rank and
    alpha per block; learning-rate weights from the arguments when given, else the file's."""
    if file_spec is not None and not lr_given:
        return file_spec
    per_block: dict[str, dict[str, Counter]] = {}
    for p in planned:
        entry = per_block.setdefault(p.target.placement.block, {"plain": Counter(), "conv": Counter()})
        entry["conv" if p.target.kind in CONV_KINDS else "plain"][(p.rank, p.alpha)] += 1
    blocks: dict[str, BlockSetting] = {}
    for block in table(arch).blocks:
        if file_spec is not None:
            base = file_spec.blocks[block]
            blocks[block] = BlockSetting(base.rank, base.alpha, base.conv_rank, base.conv_alpha, lr_block[block])
            continue
        entry = per_block.get(block, {"plain": Counter(), "conv": Counter()})
        rank, alpha = entry["plain"].most_common(1)[0][0] if entry["plain"] else (0, 1.0)
        conv_rank, conv_alpha = entry["conv"].most_common(1)[0][0] if entry["conv"] else (0, 1.0)
        blocks[block] = BlockSetting(rank, alpha, conv_rank, conv_alpha, lr_block[block])
    slots: dict[int, BlockSetting] = {}
    if lr_slot:
        mid = blocks["M00"]
        slots = {i: BlockSetting(mid.rank, mid.alpha, mid.conv_rank, mid.conv_alpha, w) for i, w in lr_slot.items()}
    elif file_spec is not None and file_spec.slots:
        slots = {
            i: BlockSetting(s.rank, s.alpha, s.conv_rank, s.conv_alpha, lr_block["M00"])
            for i, s in file_spec.slots.items()
        }
    algo = Algo.LOCON if any(p.target.kind in CONV_KINDS for p in planned) else Algo.LORA
    dims = Counter(p.rank for p in planned if p.target.kind not in CONV_KINDS) or Counter(p.rank for p in planned)
    alphas = Counter(p.alpha for p in planned)
    return BlockSpec(arch, algo, blocks, slots, dims.most_common(1)[0][0], alphas.most_common(1)[0][0])
