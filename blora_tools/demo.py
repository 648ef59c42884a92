"""The built-in demo: block-wise LoRA end to end on a tiny SD1-shaped model, in under a minute on a CPU.

It trains a *character* adapter (all blocks) and a *style* adapter (`preset=style`: the outermost level only),
both LoCon so that blocks are the only difference between them, through `kohya_plugin.blockwise` with
sd-scripts' own call sequence, on two synthetic latent "image" sets: one fixed identity with small variations,
and one shared high-frequency texture over varied content. Then it does what a user would do with real files —
inspect, prune to the style blocks, merge character + style, compare — and measures the denoising loss of the
base model with each file merged in, on both sets.

The base model has random weights, so the numbers show the mechanics (each adapter learns its own set, and
what the merged file keeps of each), not image quality; `findings` states only what the measured losses
show. `blora-tools render` is for pictures on a real model.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from blora_tools.jsonio import dumps
from blora_tools.taxonomy.arch import Arch

LATENT = (4, 16, 16)
SEQ = 8
CHARACTER_ARGS = {"preset": "character", "algo": "locon", "conv_dim": "4", "conv_alpha": "4"}
STYLE_ARGS = {"preset": "style", "algo": "locon", "conv_dim": "4", "conv_alpha": "4", "te_dim": "0"}


@dataclass
class DemoData:
    """Latents, prompt tokens and fixed evaluation noise for one synthetic set."""

    name: str
    latents: torch.Tensor
    tokens: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


@dataclass(frozen=True)
class Finding:
    """One sentence about the demo's losses and the comparison it states: `losses[lower] < losses[higher]`, each
    a (model, image set) pair."""

    text: str
    lower: tuple[str, str]
    higher: tuple[str, str]


@dataclass
class DemoResult:
    """What the demo made and measured."""

    files: dict[str, Path]
    losses: dict[str, dict[str, float]]
    train_curves: dict[str, tuple[float, float]]
    inspect: dict[str, dict]
    compare: dict
    merge_summary: dict
    seconds: float
    steps: int
    notes: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)


def _smooth(generator: torch.Generator, count: int, scale: int) -> torch.Tensor:
    """Low-frequency random fields: content that varies from image to image."""
    coarse = torch.randn((count, LATENT[0], scale, scale), generator=generator)
    return F.interpolate(coarse, size=LATENT[1:], mode="bilinear", align_corners=False)


def make_data(seed: int = 0, count: int = 8) -> tuple[DemoData, DemoData]:
    """The character set (one identity, small variations) and the style set (varied content, one texture).

    The sets are made far apart — a strong low-frequency identity against a strong high-frequency texture over
    weaker varied content — so that what one adapter learns does not fit the other's set: with the demo's
    seeds and steps each adapter has the lowest loss on its own set.
    """
    g = torch.Generator().manual_seed(seed)
    identity = _smooth(g, 1, 4) * 2.0
    character = identity + 0.1 * _smooth(g, count, 8)
    yy, xx = torch.meshgrid(torch.arange(LATENT[1]), torch.arange(LATENT[2]), indexing="ij")
    texture = torch.stack([torch.sin(xx * 2.4 + c) * torch.cos(yy * 2.4 - c) for c in range(LATENT[0])])
    style = 0.5 * _smooth(g, count, 4) + 1.5 * texture
    sets = []
    for name, latents, word in (("character", character, 11), ("style", style, 12)):
        tokens = torch.full((count, SEQ), 1, dtype=torch.long)
        tokens[:, 0], tokens[:, 1], tokens[:, 2] = 998, word, 999
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(50, 950, (count,), generator=g)
        sets.append(DemoData(name, latents, tokens, noise, timesteps))
    return sets[0], sets[1]


def _models(seed: int):
    from blora_tools.models import build_text_encoders, build_unet

    unet = build_unet(Arch.SD1, "tiny", seed=seed)
    (te,) = build_text_encoders(Arch.SD1, "tiny", seed=seed)
    unet.requires_grad_(False)
    te.requires_grad_(False)
    return unet, te


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


def denoising_loss(unet, te, data: DemoData, scheduler) -> torch.Tensor:
    """The epsilon-prediction loss sd-scripts trains with, on `data`'s fixed noise and timesteps."""
    noisy = scheduler.add_noise(data.latents, data.noise, data.timesteps)
    context = te(data.tokens)[0]
    prediction = unet(noisy, data.timesteps, context).sample
    return F.mse_loss(prediction, data.noise)


def train_adapter(
    data: DemoData,
    network_args: dict[str, str],
    out: Path,
    *,
    steps: int,
    dim: int = 8,
    alpha: float = 4.0,
    seed: int = 0,
    model_seed: int = 0,
    on_step: Callable[[], None] | None = None,
    notes: list[str] | None = None,
) -> tuple[float, float]:
    """Train one adapter on the base model built from `model_seed` with sd-scripts' call order and save it.

    Returns the (first, last) training loss; the plugin's warnings go to `notes` (when given).
    """
    from kohya_plugin import blockwise

    torch.manual_seed(seed)
    unet, te = _models(model_seed)
    scheduler = _scheduler()
    with _warnings_into(notes):
        network = blockwise.create_network(1.0, dim, alpha, None, te, unet, **network_args)
    network.apply_to(te, unet, True, True)
    params = network.prepare_optimizer_params(5e-3, 1e-2, 1e-2)
    if isinstance(params, tuple):
        params = params[0]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    network.prepare_grad_etc(te, unet)
    network.on_epoch_start(te, unet)
    g = torch.Generator().manual_seed(seed + 1)
    first = last = float("nan")
    for step in range(steps):
        noise = torch.randn(data.latents.shape, generator=g)
        timesteps = torch.randint(0, 1000, (data.latents.shape[0],), generator=g)
        batch = DemoData(data.name, data.latents, data.tokens, noise, timesteps)
        loss = denoising_loss(unet, te, batch, scheduler)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 0:
            first = loss.item()
        last = loss.item()
        if on_step:
            on_step()
    metadata = {"ss_output_name": out.stem, "ss_base_model_version": "sd_v1", "ss_steps": str(steps),
                "ss_network_dim": str(dim), "ss_network_alpha": str(alpha)}
    network.save_weights(str(out), torch.float32, metadata)
    return first, last


def evaluate(files: dict[str, Path | None], sets: tuple[DemoData, ...], seed: int = 0,
             notes: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Denoising loss of the base model and of the base model with each file merged in, on each set. The
    plugin's warnings on loading a file go to `notes` (when given)."""
    from kohya_plugin import blockwise

    scheduler = _scheduler()
    losses: dict[str, dict[str, float]] = {}
    for name, path in files.items():
        unet, te = _models(seed)
        if path is not None:
            with _warnings_into(notes):
                network, weights = blockwise.create_network_from_weights(1.0, str(path), None, te, unet,
                                                                         for_inference=True)
            network.merge_to(te, unet, weights, torch.float32, "cpu")
        with torch.no_grad():
            losses[name] = {d.name: float(denoising_loss(unet, te, d, scheduler)) for d in sets}
    return losses


@contextmanager
def _warnings_into(notes: list[str] | None):
    """Collect the warnings raised inside into `notes` (dropped when None) instead of printing them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    if notes is not None:
        notes.extend(str(w.message) for w in caught)


@contextmanager
def _one_thread():
    """Run torch on one intra-op thread, then restore the setting.

    The demo's models are tiny: one thread is as fast as several on an idle machine, and next to any other busy
    process two OpenMP threads spin against each other (a demo measured here went from 20 s to over 5 minutes).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(out_dir: Path, *, steps: int = 40, seed: int = 0, force: bool = False,
             on_stage: Callable[[str], None] | None = None, on_step: Callable[[], None] | None = None) -> DemoResult:
    """Train, cut, merge and compare; write every file into `out_dir`. Refuses to overwrite without `force`."""
    with _one_thread():
        return _run_demo(out_dir, steps, seed, force, on_stage, on_step)


def _run_demo(out_dir: Path, steps: int, seed: int, force: bool, on_stage, on_step) -> DemoResult:
    from blora_tools.adapter.model import open_adapter
    from blora_tools.ops.compare import compare
    from blora_tools.ops.merge import Source, merge
    from blora_tools.ops.prune import prune
    from blora_tools.ops.stats import inspect_adapter
    from blora_tools.taxonomy.selectors import resolve_selector

    stage = on_stage or (lambda _message: None)
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "character": out_dir / "character.safetensors",
        "style": out_dir / "style.safetensors",
        "character_upper": out_dir / "character_upper.safetensors",
        "merged": out_dir / "character+style.safetensors",
    }
    _refuse_existing([*files.values(), out_dir / "report.md", out_dir / "blocks.png"], force)
    character_data, style_data = make_data(seed)
    curves = {}
    notes: list[str] = []
    stage("training the character adapter: preset=character (all blocks), LoCon, rank 8, conv rank 4")
    curves["character"] = train_adapter(character_data, CHARACTER_ARGS, files["character"], steps=steps, seed=seed + 1, model_seed=seed, on_step=on_step, notes=notes)
    stage("training the style adapter: preset=style (in0,out3 only), LoCon, rank 8, conv rank 4, no text encoder")
    curves["style"] = train_adapter(style_data, STYLE_ARGS, files["style"], steps=steps, seed=seed + 2, model_seed=seed, on_step=on_step, notes=notes)

    stage("inspecting both adapters")
    character, style = open_adapter(files["character"]), open_adapter(files["style"])
    reports = {"character": inspect_adapter(character), "style": inspect_adapter(style)}

    stage("block-wise inference: pruning a copy of the character adapter to the style blocks (in0,out3)")
    upper = resolve_selector("style", character.arch)
    prune(character, upper, keep=True, selector="in0,out3").save(files["character_upper"], force=True)

    stage("merging character (all blocks, 1.0) + style (in0,out3, 1.0), exact concat")
    merged = merge([Source(character, 1.0), Source(style, 1.0, upper, "in0,out3")], method="concat")
    merged.save(files["merged"], force=True)

    stage("comparing the two adapters block by block")
    comparison = compare(character, style)

    stage("measuring denoising loss of each adapter on both image sets")
    losses = evaluate({"base": None, **{k: files[k] for k in ("character", "style", "merged")}}, (character_data, style_data), seed, notes)
    return DemoResult(files, losses, curves, reports, comparison, merged.summary, time.perf_counter() - started, steps,
                      notes, findings(losses))


_LABELS = {"base": "the base model", "character": "the character adapter", "style": "the style adapter",
           "merged": "the merged file"}
_COMPARISONS = (
    ("character", "character", "style"),
    ("style", "style", "character"),
    ("character", "merged", "base"),
    ("style", "merged", "base"),
    ("character", "merged", "style"),
    ("style", "merged", "character"),
)
"""(image set, model, model) pairs the demo states a finding about: each adapter against the other on its own
set, the merged file against the base model, and against the adapter that lacks the set's training."""


def findings(losses: dict[str, dict[str, float]]) -> list[Finding]:
    """What the losses show: one sentence per comparison in `_COMPARISONS`, worded by which side is lower (none
    for a tie at the four decimals printed)."""
    found = []
    for data, a, b in _COMPARISONS:
        x, y = losses[a][data], losses[b][data]
        if f"{x:.4f}" == f"{y:.4f}":
            continue
        (low, low_loss), (high, high_loss) = sorted(((a, x), (b, y)), key=lambda item: item[1])
        text = f"on the {data} set, {_LABELS[low]} has a lower loss than {_LABELS[high]} ({low_loss:.4f} vs {high_loss:.4f})"
        found.append(Finding(text, (low, data), (high, data)))
    return found


def _refuse_existing(paths, force: bool) -> None:
    """Every file the demo writes, checked by the output rules before any training starts."""
    from blora_tools.adapter.writer import check_output

    for path in paths:
        check_output(path, force=force, suffixes=(path.suffix,))


def write_report(result: DemoResult, path: Path, chart: Path | None, force: bool = False) -> Path:
    """A short Markdown report of what the demo did and measured (written atomically; an existing file only
    with `force`)."""
    from blora_tools.adapter.writer import write_bytes_atomic

    lines = ["# blora-tools demo", "", f"Trained {result.steps} steps per adapter in {result.seconds:.1f} s (CPU).", ""]
    lines += ["## Denoising loss (lower is better)", "", "| model | character set | style set |", "|---|---|---|"]
    for name, values in result.losses.items():
        lines.append(f"| {name} | {values['character']:.4f} | {values['style']:.4f} |")
    lines += ["", "What these numbers show (a tiny model with random weights: the mechanics, not image quality):", ""]
    lines += [f"- {f.text}" for f in result.findings]
    lines += ["", "## Per-block ΔW norm", "", "| block | character | style |", "|---|---|---|"]
    char_blocks, style_blocks = result.inspect["character"]["blocks"], result.inspect["style"]["blocks"]
    for block in char_blocks:
        a, b = char_blocks[block]["norm"], style_blocks.get(block, {}).get("norm")
        lines.append(f"| {block} | {_fmt(a)} | {_fmt(b)} |")
    lines += ["", "## Files", ""]
    lines += [f"- `{p.name}` — {name}" for name, p in result.files.items()]
    if chart is not None:
        lines += ["", f"![per-block norms]({chart.name})"]
    lines += ["", "## Compare (character vs style)", "", "```json", dumps(result.compare.get("blocks", {}), indent=1), "```", ""]
    return write_bytes_atomic(path, "\n".join(lines).encode("utf-8"), force=force)


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}"
