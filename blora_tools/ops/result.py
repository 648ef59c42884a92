"""What every surgery operation returns: tensors to write, metadata, warnings and a summary.

Operations are pure (Adapter + resolved spec → Result). Entries are lazy: untouched tensors are copied
from the input as raw bytes when the writer asks for them, computed tensors are made one module at a time,
so a write holds one module, not the file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blora_tools.adapter.writer import Entry, Origin, check_output, write_entries, write_order
from blora_tools.errors import NonFiniteError

if TYPE_CHECKING:
    import torch

    from blora_tools.adapter.model import Adapter, Module
    from blora_tools.taxonomy.arch import Arch

__all__ = ["Progress", "Result", "copied", "scaled", "scalar", "computed", "group_counts", "loader_notes"]

Progress = Callable[[int], None]
"""A callback told how many units of work just finished (modules, or bytes while writing)."""


@dataclass
class Result:
    """An operation's output, not yet written."""

    operation: str
    entries: list[Entry]
    metadata: dict[str, str]
    inputs: tuple[Path, ...]
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def save(
        self, path: str | Path, *, force: bool = False, on_bytes: Progress | None = None, allow_nonfinite: bool = False
    ) -> Path:
        """Write atomically (never onto an input; an existing file only with `force`).

        Every float tensor written, copied or computed, is checked for NaN/Inf as it is produced: NonFiniteError
        naming the module (and the input holding it) unless `allow_nonfinite`; nothing is left at `path` then.
        """
        from blora_tools.adapter.metadata import HISTORY_KEY, InputDigests, filled_history

        entries = self.entries
        digests = late = None
        if HISTORY_KEY in self.metadata:
            check_output(path, self.inputs, force)  # before hashing inputs for nothing
            entries = write_order(entries)
            digests = InputDigests(self.inputs, entries)  # hashed while the output is written, from its copies
            entries = [digests.through(e) for e in entries]

            def late() -> dict[str, str]:
                return {HISTORY_KEY: filled_history(self.metadata[HISTORY_KEY], digests.values())}

        if not allow_nonfinite:
            entries = [_finite_checked(e, self.inputs, Path(path)) for e in entries]
        if on_bytes is not None:
            entries = [_reporting(e, on_bytes) for e in entries]
        try:
            return write_entries(path, entries, self.metadata, inputs=self.inputs, force=force, late=late)
        finally:
            if digests is not None:
                digests.close()


def _reporting(entry: Entry, on_bytes: Progress) -> Entry:
    def produce() -> bytes:
        data = entry.produce()
        on_bytes(len(data))
        return data

    return replace(entry, produce=produce)


def _finite_checked(entry: Entry, inputs: tuple[Path, ...], output: Path) -> Entry:
    def produce() -> bytes:
        from blora_tools.adapter.floats import finite_bytes  # numpy, imported when writing starts

        data = entry.produce()
        if not finite_bytes(data, entry.dtype):
            raise _nonfinite_error(entry.name, inputs, output)
        return data

    return replace(entry, produce=produce)


def _nonfinite_error(name: str, inputs: tuple[Path, ...], output: Path) -> NonFiniteError:
    """Name the module and, where one holds it, the input whose tensors are NaN/Inf (else the overflow)."""
    from blora_tools.adapter.floats import finite_bytes
    from blora_tools.adapter.formats import split_key
    from blora_tools.adapter.model import open_adapter

    key = split_key(name)
    stem = key.stem if key is not None else name
    fix = "nothing written; repair or prune it, or pass --allow-nonfinite to write it anyway"
    for source in inputs:
        adapter = open_adapter(source)
        module = adapter.modules.get(stem)
        keys = list(module.keys.values()) if module is not None else [name] if name in adapter.header.tensors else []
        if any(not finite_bytes(adapter.raw(k), adapter.info(k).dtype) for k in keys):
            return NonFiniteError(f"module {stem} holds NaN or Inf values; {fix}", source)
    param = key.param if key is not None else name
    return NonFiniteError(f"module {stem}: {param} comes out NaN or Inf (overflow?); {fix}", output)


def copied(adapter: "Adapter", key: str, name: str | None = None) -> Entry:
    """An entry whose bytes are the input tensor's, unchanged."""
    info = adapter.info(key)
    origin = Origin(adapter.path, adapter.header.data_start + info.begin, key)
    return Entry(name or key, info.dtype, info.shape, lambda: adapter.raw(key), origin)


def scaled(
    adapter: "Adapter", key: str, name: str, ratio: float, rows: Sequence[tuple[int, int, float]] = (), axis: int = 0
) -> Entry:
    """An entry holding the input tensor times `ratio`, each range of `axis` in `rows` also times its weight, in
    float32 and written back in the tensor's dtype (`adapter.floats`): on the stored bytes, or for a tensor made
    on read (`ops.dit_naming`) on its float32 values, rounded once."""
    info = adapter.info(key)

    def produce() -> bytes:
        from blora_tools.adapter.floats import scaled_bytes, scaled_float32

        if adapter.made(key):
            return scaled_float32(adapter.tensor(key).float().numpy(), info.dtype, ratio, rows, axis)
        return scaled_bytes(adapter.raw(key), info.dtype, info.shape, ratio, rows, axis)

    return Entry(name, info.dtype, info.shape, produce)


def scalar(name: str, dtype: str, value: float) -> Entry:
    """A 0-d entry (an alpha) holding `value` in `dtype`."""

    def produce() -> bytes:
        from blora_tools.adapter.floats import scalar_bytes

        return scalar_bytes(value, dtype)

    return Entry(name, dtype, (), produce)


def computed(name: str, dtype: str, shape: tuple[int, ...], make: Callable[[], "torch.Tensor"]) -> Entry:
    """An entry made when written: `make()` is called then, and its tensor cast to `dtype`."""

    def produce() -> bytes:
        from blora_tools.adapter.tensors import TORCH_DTYPE, encode

        return encode(make().to(TORCH_DTYPE[dtype]).reshape(shape))

    return Entry(name, dtype, shape, produce)


def group_counts(modules: Iterable["Module"]) -> dict[str, int]:
    """Modules per paper group (`none` for unplaced modules), in a stable order."""
    counts: dict[str, int] = {}
    for m in modules:
        counts[m.group] = counts.get(m.group, 0) + 1
    return dict(sorted(counts.items()))


_LDM_UNET = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
_DIFFUSERS_UNET = ("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")


def _dit_notes(modules: list["Module"], stems: list[str], arch: "Arch") -> list[tuple[int, str]]:
    """What Flux.1/SD3 loaders skip in a kohya-format output (facts pinned by tests/test_dit_oracles.py against
    diffusers 0.42's own loaders; sd-scripts 48d368f `networks/lora_flux.py`, `lora_sd3.py`)."""
    from blora_tools.taxonomy.arch import Arch
    from blora_tools.taxonomy.blocks import OTHER
    from blora_tools.taxonomy.dit import BFL, layer_index

    index = layer_index(arch)
    split = sum(1 for s in stems if s.startswith("lora_unet_") and (l := index.get(s[10:])) and l.naming != BFL)
    kohya = "sd-scripts' lora_flux/lora_sd3 and Forge read only kohya's fused names"
    counted = [(split, f"module(s) have diffusers' names (to_q, proj_mlp, x_embedder): {kohya}; ComfyUI reads "
                       "them. `convert --to kohya` writes kohya's names (fusing split parts)")]
    if arch is Arch.SD3:
        counted.append((sum(1 for s in stems if s.startswith("lora_unet_")),
                        "SD3 module(s) in kohya names: diffusers' SD3 loader converts no kohya names and loads none "
                        "of them; `convert --to diffusers` writes a file it loads"))
    else:
        counted.append((sum(1 for m in modules if m.block == OTHER and m.placement.layer.naming == BFL),
                        "Flux embedder/final-layer module(s): diffusers 0.42 skips them silently (its kohya "
                        "converter names them without `transformer.`); sd-scripts and ComfyUI apply them"))
        counted.append((sum(1 for s in stems if s.startswith("lora_te3_")),
                        "T5 module(s) (lora_te3_): diffusers does not convert them; sd-scripts and ComfyUI apply them"))
    return counted


def loader_notes(
    modules: Iterable["Module"],
    arch: "Arch",
    *,
    stems: Iterable[str] | None = None,
    one_alpha: bool = False,
    passthrough: Sequence[str] = (),
) -> list[str]:
    """What each loader does with a kohya-format output, wherever one will not apply it as the file says.

    `modules` are the output's modules as read (kinds, DoRA, alphas); `stems` the names they are written
    under (default their own); `one_alpha` when the output gives every module one alpha. The facts, from
    sd-scripts `networks/lora.py` (02298e3): `create_network_from_weights` builds modules only from
    `lora_down` keys, for layers of its own U-Net (diffusers names on SD1/SD2, LDM names on SDXL), and
    `merge_to` applies up·down·alpha/rank without `lora_mid`; diffusers 0.42 refuses LoHa/LoKr/lora_mid/full
    and drops DoRA; LyCORIS, A1111 and ComfyUI apply every kind (tests/interop/test_kohya_rule.py).
    """
    from blora_tools.adapter.kinds import Kind
    from blora_tools.taxonomy.arch import Arch

    modules = list(modules)
    stems = list(stems) if stems is not None else [m.stem for m in modules]
    kinds = Counter(m.kind for m in modules)
    both = "A1111, ComfyUI and LyCORIS apply them"
    skipped = "skip them silently"
    sd_scripts = "sd-scripts' networks.lora (--base_weights, merge_lora.py)"
    counted = [
        (kinds[Kind.LOHA] + kinds[Kind.LOKR],
         f"LoHa/LoKr module(s): diffusers refuses the file and {sd_scripts} skips them silently; {both}"),
        (kinds[Kind.TUCKER],
         f"Tucker module(s) (lora_mid): diffusers refuses the file and {sd_scripts} drops the lora_mid core "
         f"(a wrong ΔW); {both}"),
        (kinds[Kind.FULL] + kinds[Kind.NORM],
         f"full/norm module(s): diffusers refuses the file and {sd_scripts} skips them; {both}"),
        (sum(1 for m in modules if m.dora),
         f"DoRA module(s): diffusers drops their dora_scale and {sd_scripts} ignores it (plain LoRA ΔW); {both}"),
    ]
    if arch in (Arch.SD1, Arch.SD2):
        counted.append((
            sum(1 for s in stems if s.startswith(_LDM_UNET)),
            f"U-Net module(s) have LDM names (input_blocks_…): diffusers, {sd_scripts} and LyCORIS {skipped}; "
            "A1111 and ComfyUI read them. `convert --to kohya --names diffusers` writes names every loader reads",
        ))
    if arch is Arch.SDXL:
        counted.append((
            sum(1 for s in stems if s.startswith(_DIFFUSERS_UNET)),
            f"SDXL U-Net module(s) have diffusers-style names (down_blocks_…): {sd_scripts} and LyCORIS on its "
            f"U-Net {skipped}. `convert --to kohya --names ldm` writes kohya's own SDXL names",
        ))
    if arch in (Arch.FLUX, Arch.SD3):
        counted += _dit_notes(modules, stems, arch)
    notes = [f"{n} {text}" for n, text in counted if n]
    alphas = {a for m in modules if m.kind.is_lora and (a := m.effective_alpha) is not None}
    # diffusers bakes each Flux module's own alpha (`_convert_kohya_flux_lora_to_diffusers`, alphas=None)
    if not one_alpha and len(alphas) > 1 and arch in (Arch.SD1, Arch.SD2, Arch.SDXL):
        notes.append(
            f"modules keep {len(alphas)} different alpha values: diffusers loads some of them at the wrong "
            "strength. Add --uniform-alpha to give them one alpha (ΔW unchanged)"
        )
    if passthrough:
        notes.append(
            "diffusers will not read this file as kohya LoRA: it also holds keys that are not LoRA modules "
            f"(e.g. {passthrough[0]})"
        )
    return notes
