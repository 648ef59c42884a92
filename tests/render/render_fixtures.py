"""Helpers for the render tests: tiny SD1 / SD2 / SDXL diffusers pipelines saved to a temporary folder, and synthetic kohya adapters for them.

Nothing is downloaded: the tokenizer's vocab.json and merges.txt are written by `build_tokenizer`, the U-Nets, VAE and text
encoders are built in code with small widths. The adapters' dense ΔW is computed here from the random factors
(the oracle the renderer is checked against).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from blora_tools.taxonomy.arch import Arch

SIZE = 32  # pixels; the tiny VAE halves it, the tiny U-Nets need latents divisible by 8 (SD) or 4 (SDXL)
STEPS = 2


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
    )


def tiny_sdxl_unet():
    """A diffusers SDXL-type U-Net (three levels, attention depth 0/1/2, text_time conditioning)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=80,  # tiny te1 (32) + te2 (48)
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=48 + 6 * 8,
        norm_num_groups=8,
    )


def build_pipeline(arch: Arch, folder: Path):
    """Build a tiny pipeline of `arch` (seeded) and save it to `folder`."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from blora_tools.models import build_text_encoders, build_tokenizer, build_unet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = _tiny_vae()
        tokenizer = build_tokenizer(folder / "_tokenizer_src")
        encoders = build_text_encoders(arch, "tiny")
        if arch is Arch.SDXL:
            unet = tiny_sdxl_unet()
            pipe = StableDiffusionXLPipeline(
                vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizer,
                tokenizer_2=tokenizer, unet=unet, scheduler=DPMSolverMultistepScheduler(), add_watermarker=False,
            )
        else:
            unet = build_unet(arch, "tiny")
            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, unet=unet,
                scheduler=DPMSolverMultistepScheduler(), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False,
            )
    pipe.save_pretrained(folder)
    return folder


def load_pipe(folder: Path):
    """The saved pipeline, loaded plainly (float32, CPU) with the paper's sampler: the test's own reference."""
    import diffusers

    index = json.loads((folder / "model_index.json").read_text())
    cls = getattr(diffusers, index["_class_name"])
    pipe = cls.from_pretrained(str(folder), local_files_only=True)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_image(pipe, prompt: str, seed: int, steps: int = STEPS, cfg: float = 7.0, negative: str = ""):
    """What the test expects: the pipeline called directly, CPU generator, float output."""
    with torch.inference_mode():
        out = pipe(
            prompt=prompt, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=cfg,
            width=SIZE, height=SIZE, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
        )
    return out.images[0]


# --- synthetic adapters ----------------------------------------------------------------------------


@dataclass
class Delta:
    """One module of a synthetic adapter: where it acts in the pipeline and its dense ΔW (weight 1)."""

    stem: str
    component: str  # unet, te, te1, te2
    path: str  # diffusers / transformers module path in the pipeline
    dense: torch.Tensor


def targets(pipe, arch: Arch, conv: bool) -> list[tuple[str, str, str, torch.nn.Module]]:
    """(kohya stem as kohya writes it, component, pipeline path, layer) for the layers a kohya LoRA wraps."""
    from blora_tools.adapter.formats import diffusers_to_ldm, stem_from_path
    from kohya_plugin.targets import find_targets

    out = []
    if arch is not Arch.SDXL:
        paths = {stem_from_path("unet", n): ("unet", n) for n, _ in pipe.unet.named_modules() if n}
        paths |= {stem_from_path("te", n): ("te", n) for n, _ in pipe.text_encoder.named_modules() if n}
        _, found = find_targets(pipe.text_encoder, pipe.unet, include_conv=conv)
        for t in found:
            component, path = paths[t.name]
            out.append((t.name, component, path, t.layer))
        return out
    # SDXL: kohya writes LDM names; the diffusers U-Net's layers are found by walking it, and each path is
    # renamed with the colleague's table (the render test then checks the inverse direction end to end).
    _, found = find_targets(None, pipe.unet, include_conv=conv)
    unet_paths = {stem_from_path("unet", n): n for n, _ in pipe.unet.named_modules() if n}
    for t in found:
        path = unet_paths[t.name]
        out.append((stem_from_path("unet", diffusers_to_ldm(path, "sdxl")), "unet", path, t.layer))
    for component, encoder in (("te1", pipe.text_encoder), ("te2", pipe.text_encoder_2)):
        for name, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name):
                out.append((stem_from_path(component, name), component, name, module))
    return out


def make_lora(path: Path, pipe, arch: Arch | str, *, blocks: str = "all", conv: bool = False, rank: int = 2,
              alpha: float = 1.0, std: float = 0.5, seed: int = 0, every: int = 1) -> list[Delta]:
    """Write a kohya LoRA (LoCon with `conv`) with random factors for the tiny pipeline's layers in `blocks`
    (every `every`-th layer), and return each module's dense ΔW computed here from the factors."""
    from blora_tools.adapter.writer import save_state_dict
    from blora_tools.taxonomy.blocks import place
    from blora_tools.taxonomy.selectors import resolve_selector

    arch = Arch(arch)
    chosen = resolve_selector(blocks, arch)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    deltas: list[Delta] = []
    picked = [t for t in targets(pipe, arch, conv) if place(t[0], arch).block in chosen][::every]
    for stem, component, layer_path, layer in picked:
        shape = tuple(layer.weight.shape)
        out_features, fan_in = shape[0], int(torch.tensor(shape[1:]).prod())
        down = torch.randn(rank, *shape[1:], generator=gen) * std
        up = torch.randn(out_features, rank, *([1, 1] if len(shape) == 4 else []), generator=gen) * std
        tensors[f"{stem}.lora_down.weight"] = down
        tensors[f"{stem}.lora_up.weight"] = up
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
        dense = (alpha / rank) * (up.reshape(out_features, rank) @ down.reshape(rank, fan_in))
        deltas.append(Delta(stem, component, layer_path, dense.reshape(shape)))
    assert deltas, f"no layers in {blocks} for {arch.value}"
    base = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[arch.value]
    save_state_dict(path, tensors, {"ss_base_model_version": base, "ss_network_module": "networks.lora"})
    return deltas


def merge_by_hand(pipe, deltas: list[Delta], weight: float) -> None:
    """Add weight·ΔW to the pipeline's layers in place (float32), straight from the dense oracle."""
    networks = {"unet": pipe.unet, "te": pipe.text_encoder, "te1": pipe.text_encoder,
                "te2": getattr(pipe, "text_encoder_2", None)}
    with torch.no_grad():
        for d in deltas:
            layer = networks[d.component].get_submodule(d.path)
            layer.weight += weight * d.dense


# --- fixtures (imported by the test modules: a conftest.py here would shadow tests/conftest.py) ------


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """arch → a saved tiny pipeline folder (built on first use)."""
    built: dict[Arch, Path] = {}

    def get(arch: Arch | str) -> Path:
        arch = Arch(arch)
        if arch not in built:
            built[arch] = build_pipeline(arch, tmp_path_factory.mktemp(f"tiny_{arch.value}"))
        return built[arch]

    return get

