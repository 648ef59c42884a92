"""BlockwiseNetwork: the sd-scripts network contract (docs/architecture.md §4) over per-block LoRA/LoCon modules.

A network is built from a plan (`kohya_plugin.planning`: one `PlannedModule` record per module, made while
only reading the models); nothing touches the models until `apply_to` (forward swap) or `merge_to` (weights).

Files (`kohya_plugin.weights_io`, `kohya_plugin.spec_io`). `save_weights` writes kohya's keys with ONE alpha
value for every module — the training alpha shared by most modules (ties: `--network_alpha`, then the
smaller) — and folds each other module's alpha/file-alpha ratio into its up factor, so ΔW is the same for every
loader and diffusers loads it exactly (docs/architecture.md §3). The `blora_spec` metadata states the blocks, ranks and
training alphas of the modules in the file. `load_weights` keeps this network's alphas and rescales each loaded
up factor by file-alpha/training-alpha, so any kohya file keeps its ΔW and the plugin's own file restores the
trained factors. A plain `load_state_dict` (gen_img.py's path) also keeps ΔW: it loads the file's alphas with
the factors.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from blora_tools.errors import AdapterFileError, OutputError, SpecError
from blora_tools.spec import BlockSetting, BlockSpec
from blora_tools.taxonomy.blocks import Component, Placement, table
from kohya_plugin.args import NetworkArgs, TrainOptions, parse_weights_args, read_multiplier
from kohya_plugin.modules import LoRAModule
from kohya_plugin.planning import ModulePlan, PlannedModule, TextEncoders, plan_from_file, plan_modules
from kohya_plugin.spec_io import read_file_spec, saved_spec_json, spec_of_modules
from kohya_plugin.targets import detect_unet_arch
from kohya_plugin.weights_io import (
    MODULE_KEYS,
    fit,
    group_modules,
    module_alpha,
    module_tensors,
    read_weights_file,
    single_alpha,
)

MODULE_NAME = "kohya_plugin.blockwise"
"""The `--network_module` name, written to `ss_network_module`."""

logger = logging.getLogger(__name__)


class BlockwiseWarning(UserWarning):
    """A configuration that works but probably not as meant (e.g. a block with nothing to train)."""


class BlockwiseNetwork(nn.Module):
    """Per-block LoRA/LoCon for sd-scripts: the methods `train_network.py` calls, in its order."""

    def __init__(
        self,
        spec: BlockSpec,
        options: TrainOptions,
        plan: ModulePlan,
        *,
        multiplier: float = 1.0,
        notes: Iterable[str] = (),
    ):
        super().__init__()
        self.spec = spec
        self.arch = spec.arch
        self.options = options
        self.multiplier = read_multiplier(multiplier)
        self.text_encoder_loras: list[LoRAModule] = []
        self.unet_loras: list[LoRAModule] = []
        self._planned: dict[str, PlannedModule] = {}
        """The plan record of each module, by module name."""
        self._layers = plan.layers
        for p in plan.modules:
            module = LoRAModule.for_layer(
                p.name, p.target.layer, p.rank, p.alpha,
                multiplier=self.multiplier, dropout=options.dropout,
                rank_dropout=options.rank_dropout, module_dropout=options.module_dropout,
                row_parts=p.row_parts,
            )
            self.add_module(p.name, module)
            (self.text_encoder_loras if p.is_text_encoder else self.unet_loras).append(module)
            self._planned[p.name] = p
        self.warnings: list[str] = [*notes, *plan.warnings]
        for message in self.warnings:
            warnings.warn(message, BlockwiseWarning, stacklevel=3)
        self._log_summary()

    # --- construction ----------------------------------------------------------------------------

    @classmethod
    def from_args(
        cls,
        text_encoder: TextEncoders,
        unet: nn.Module,
        parsed: NetworkArgs,
        *,
        multiplier: float = 1.0,
    ) -> "BlockwiseNetwork":
        """A fresh network for parsed `--network_args`."""
        plan = plan_modules(text_encoder, unet, parsed.spec, explicit=parsed.explicit_blocks, chooser=parsed.chooser,
                            rules=parsed.rules, split_qkv=parsed.options.split_qkv)
        return cls(parsed.spec, parsed.options, plan, multiplier=multiplier, notes=parsed.notes)

    @classmethod
    def from_weights(
        cls,
        text_encoder: TextEncoders,
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
        Anything wrong with the file (`source`) is an AdapterFileError naming it, raised before any module exists.
        """
        arch = detect_unet_arch(unet)
        lr = parse_weights_args(network_args or {}, arch)
        file_spec = read_file_spec(metadata or {}, arch, source)
        modules = group_modules(weights_sd, source)
        plan = plan_from_file(text_encoder, unet, arch, modules, file_spec, lr, source)
        if file_spec is not None and not lr.lr_given:
            spec = file_spec.spec
        else:
            def base(block: str, slot: int | None) -> BlockSetting:
                weight = lr.lr_slot.get(slot, lr.lr_block[block]) if slot is not None else lr.lr_block[block]
                known = file_spec.spec.blocks[block] if file_spec is not None else BlockSetting()
                return BlockSetting(known.rank, known.alpha, known.conv_rank, known.conv_alpha, weight)

            spec = spec_of_modules(arch, plan.modules, plan.layers, base)
        return cls(spec, lr.options, plan, multiplier=multiplier, notes=lr.notes)

    def _log_summary(self) -> None:
        logger.info(
            "blockwise %s %s: %d text-encoder and %d U-Net modules",
            self.arch.value, self.spec.algo.value, len(self.text_encoder_loras), len(self.unet_loras),
        )
        if not self.options.verbose:
            return
        per_group: dict[str, list[LoRAModule]] = {}
        for module in self._loras():
            per_group.setdefault(self._planned[module.lora_name].target.placement.group, []).append(module)
        for group, modules in per_group.items():
            ranks = sorted({m.lora_dim for m in modules})
            alphas = sorted({m.alpha_value for m in modules})
            lrs = sorted({self._planned[m.lora_name].lr_weight for m in modules})
            logger.info("  %-5s %4d modules, rank %s, alpha %s, lr weight %s", group, len(modules), ranks, alphas, lrs)

    # --- helpers ---------------------------------------------------------------------------------

    def _loras(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    def block_of(self, lora_name: str) -> Placement:
        """Where a module sits."""
        return self._planned[lora_name].target.placement

    def _describe(self, modules: Iterable[LoRAModule]) -> str:
        """Name the blocks of some modules: a group where they are all of the group's modules, else LBW IDs."""
        present = {self.block_of(m.lora_name).block for m in modules}
        per_group: dict[str, set[str]] = {}
        for p in self._planned.values():
            per_group.setdefault(p.target.placement.group, set()).add(p.target.placement.block)
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
            del self._planned[module.lora_name]
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
        file's. Returns the missing and unexpected keys. Anything wrong with the file — unreadable, foreign, NaN,
        factor shapes that differ from this network's (resume with the same `--network_args`, or use
        `--dim_from_weights`) — is an AdapterFileError naming it, and nothing is loaded.
        """
        weights_sd, _ = read_weights_file(file)
        return self.load_factors(weights_sd, source=str(file))

    def load_factors(self, weights_sd: Mapping[str, torch.Tensor], source: str = "weights") -> _IncompatibleKeys:
        """`load_weights` for an in-memory kohya state dict."""
        stems = group_modules(weights_sd, source)
        plan: list[tuple[LoRAModule, torch.Tensor, torch.Tensor, float]] = []
        missing: list[str] = []
        mismatched: list[str] = []
        for module in self._loras():
            tensors = stems.get(module.lora_name)
            if tensors is None:
                missing += [f"{module.lora_name}.{k}" for k in sorted(MODULE_KEYS)]
                continue
            down = fit(tensors["lora_down.weight"], module.lora_down.weight.shape)
            up = fit(tensors["lora_up.weight"], module.lora_up.weight.shape)
            if down is None or up is None:
                mismatched.append(
                    f"{module.lora_name}: file {list(tensors['lora_down.weight'].shape)}, "
                    f"network {list(module.lora_down.weight.shape)}"
                )
                continue
            if not module.fits_parts(up):
                raise AdapterFileError(
                    f"{module.lora_name} is a fused LoRA whose up factor is not block-diagonal over its parts, "
                    "so it cannot be trained as split parts; resume it without split_qkv", source
                )
            plan.append((module, down, up, module_alpha(module.lora_name, tensors, source)))
        if mismatched:
            raise AdapterFileError(
                f"{len(mismatched)} module(s) have other ranks or shapes than this network "
                f"({'; '.join(mismatched[:2])}); use the network_args the file was trained with, "
                "or --dim_from_weights", source
            )
        names = sorted(m.lora_name for m in self._loras())
        extra = sorted(set(stems) - set(names))
        if not plan and names:
            raise AdapterFileError(
                f"none of its {len(stems)} modules is one of this network's {len(names)} "
                f"(file: {', '.join(sorted(stems)[:2])}; network: {', '.join(names[:2])}); "
                "is the file for another model, or trained with other network_args (preset, blocks, te_dim)?", source
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
        unexpected = [
            key for key in weights_sd
            if key.partition(".")[0] not in self._planned or key.partition(".")[2] not in MODULE_KEYS
        ]
        return _IncompatibleKeys(missing, unexpected)

    @property
    def train_t5xxl(self) -> bool:
        """Whether T5-XXL has modules: sd-scripts' Flux/SD3 trainers read it to train T5 and to refuse
        `--cache_text_encoder_outputs` with it."""
        return any(self.block_of(m.lora_name).component is Component.TE3 for m in self.text_encoder_loras)

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
            planned = self._planned[module.lora_name]
            is_te = planned.is_text_encoder
            base = te_base[planned.target.placement.component] if is_te else unet_base
            weight = planned.lr_weight
            if base is None and weight != 1.0:
                raise SpecError(
                    "block learning-rate weights need a learning rate: set --learning_rate or --unet_lr"
                )
            lr = planned.lr if planned.lr is not None else (None if base is None else base * weight)
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

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr=None, unet_lr=None, default_lr=None,
                                                      *args, **kwargs):
        """sd-scripts' form with one text-encoder rate per encoder (Flux `[clip_l, t5xxl]`, SD3 `[clip_l, clip_g,
        t5xxl]`; one rate, or a list of one, serves them all): the same as `prepare_optimizer_params`."""
        return self.prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)

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
        """Strength of every module's ΔW (1.0 while training); SpecError for NaN/Inf, modules unchanged."""
        self.multiplier = read_multiplier(multiplier)
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
        stems = group_modules(weights_sd)
        work: list[tuple[LoRAModule, torch.Tensor, torch.Tensor, float]] = []
        for module in self._loras():
            tensors = stems.get(module.lora_name)
            if tensors is None:
                continue
            down = fit(tensors["lora_down.weight"], module.lora_down.weight.shape)
            up = fit(tensors["lora_up.weight"], module.lora_up.weight.shape)
            if down is None or up is None:
                raise AdapterFileError(f"merge_to: {module.lora_name} has factors of another shape than this "
                                       "network's", "weights")
            work.append((module, down, up, module_alpha(module.lora_name, tensors, "weights")))
        for module, down, up, alpha in work:
            module.merge_to(down, up, alpha, device)
        logger.info("blockwise: merged %d modules into the model", len(work))

    def save_weights(self, file: str | Path, dtype: torch.dtype | None = None, metadata: Mapping | None = None) -> None:
        """Write a kohya-format `.safetensors` file: one alpha for all modules, `blora_spec`, sshs hashes.

        `dtype` (None: each factor's own) is the stored dtype; `metadata` is copied, never changed.
        """
        from blora_tools.adapter.writer import save_state_dict

        path = Path(file)
        if path.suffix.lower() != ".safetensors":
            raise OutputError("the blockwise network saves only .safetensors (use --save_model_as safetensors)", path)
        tensors, file_alpha = self.file_state_dict(dtype, path)
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta["ss_network_module"] = MODULE_NAME
        meta["blora_spec"] = saved_spec_json(self.saved_spec(), self._planned.values(), file_alpha)
        save_state_dict(path, tensors, meta)

    def file_state_dict(
        self, dtype: torch.dtype | None = None, path: str | Path | None = None
    ) -> tuple[dict[str, torch.Tensor], float]:
        """The tensors `save_weights` writes and the file's single alpha as stored; BloraError naming `path` when
        that alpha cannot be stored (0, or an overflow of the stored dtype)."""
        file_alpha = single_alpha((m.alpha_value for m in self._loras()), self.spec.network_alpha)
        stored = file_alpha
        tensors: dict[str, torch.Tensor] = {}
        for m in self._loras():
            saved = module_tensors(m.lora_name, m.lora_down.weight, m.lora_up.weight, m.alpha_value, file_alpha,
                                   dtype, path)
            stored = float(saved[f"{m.lora_name}.alpha"])
            tensors.update(saved)
        return tensors, stored

    def saved_spec(self) -> BlockSpec:
        """The spec a saved file states: the blocks, ranks and alphas of this network's modules as they are now,
        with the training learning-rate weights."""
        def base(block: str, slot: int | None) -> BlockSetting:
            return self.spec.slots.get(slot, self.spec.blocks[block]) if slot is not None else self.spec.blocks[block]

        return spec_of_modules(self.arch, self._planned.values(), self._layers, base, self.spec.network_dim,
                               self.spec.network_alpha)


def _group(params: list[nn.Parameter], lr: float | None) -> dict:
    group: dict = {"params": params}
    if lr is not None:
        group["lr"] = lr
    return group
