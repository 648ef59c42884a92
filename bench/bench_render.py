"""Per-cell cost of applying and removing adapters in `render`, against one denoising run (run by hand).

An SD1.5-sized pipeline (U-Net, VAE and CLIP-L text encoder at full size, random weights: nothing is
downloaded) renders one image; then the adapters of a grid cell are merged into its weights and taken out
again, as `render_plan` does between cells. Target: apply + restore < 5 % of one render. Each denoiser call
is also timed (forward hooks), so the cost is given against one denoising step too.

`--arch flux`: a Flux.1 transformer at full width (3072, 24 heads of 128, T5 context 4096, pooled CLIP 768,
guidance embedder: every layer of a block at its real shape) but reduced depth, `--double` + `--single` blocks
(default 1 + 2: Flux.1's 19 : 38 ratio, so the adapters' share of a step is that of the full model up to the
embedders), random weights; the text encoders (one CLIP-L layer of width 768, one T5 layer of width 4096) and
the VAE (4 levels of 8–32 channels: Flux.1's 8× latent, 16 channels) are tiny, so "one render" is nearly all
transformer. The adapters are kohya Flux LoRAs on sd-scripts' `lora_flux` modules of those blocks (fused
qkv / linear1), put in diffusers naming as `render` does. 512² with T5's 512 tokens = 1536 tokens per step
(Flux.1 at 1024²: 4608, so the share there is smaller).

    python bench/bench_render.py                              # auto device/dtype, 512x512, 25 steps
    python bench/bench_render.py --device cpu --size 256 --steps 4 --repeat 1   # a quick CPU figure
    python bench/bench_render.py --arch flux --device cpu --size 512 --steps 2 --repeat 1   # Flux.1 width, CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_sd15(device: torch.device, dtype: torch.dtype, folder: Path):
    """StableDiffusionPipeline with SD1.5's shapes and random weights, on `device` in `dtype`."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline

    from blora_tools.models import build_text_encoders, build_tokenizer, build_unet

    unet = build_unet("sd1", "full", device=device)
    (text_encoder,) = build_text_encoders("sd1", "full", device=device)
    with torch.device(device):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        )
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=build_tokenizer(folder, 49408), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe.to(device=device, dtype=dtype)


def build_flux(device: torch.device, dtype: torch.dtype, folder: Path, double: int, single: int):
    """FluxPipeline whose transformer has Flux.1-dev's width and `double` + `single` blocks, random weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from blora_tools.models import build_t5_tokenizer, build_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=768, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=12, max_position_embeddings=77, pad_token_id=1,
                                            bos_token_id=998, eos_token_id=999))
        t5 = T5EncoderModel(T5Config(vocab_size=128, d_model=4096, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                                     feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 32, 32), norm_num_groups=8,
            use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=clip.eval(),
                        tokenizer=build_tokenizer(folder, 1000), text_encoder_2=t5.eval(),
                        tokenizer_2=build_t5_tokenizer(), transformer=transformer.eval())
    return pipe.to(device=device, dtype=dtype)


def write_flux_lora(path: Path, double: int, single: int, rank: int, seed: int) -> int:
    """A kohya Flux LoRA of `rank` on sd-scripts' `lora_flux` modules of the first `double` + `single` blocks."""
    from bench_dit import flux_layers, make_file

    make_file(path, double, rank, seed, single_blocks=single)
    return len(flux_layers(double, single))


def write_lora(path: Path, pipe, rank: int, conv: bool, blocks: str, seed: int) -> int:
    """A kohya LoRA (LoCon with `conv`) of `rank` on the pipeline's layers in `blocks`; fp16 like most files."""
    from blora_tools.adapter.writer import save_state_dict
    from blora_tools.taxonomy.selectors import resolve_selector
    from kohya_plugin.targets import find_targets

    chosen = resolve_selector(blocks, "sd1")
    _, targets = find_targets(pipe.text_encoder, pipe.unet, include_conv=conv)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for t in targets:
        if t.placement.block not in chosen:
            continue
        shape = tuple(t.layer.weight.shape)
        down = torch.randn(rank, *shape[1:], generator=gen) * 0.01
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=gen) * 0.01
        tensors[f"{t.name}.lora_down.weight"] = down.half()
        tensors[f"{t.name}.lora_up.weight"] = up.half()
        tensors[f"{t.name}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
    save_state_dict(path, tensors, {"ss_base_model_version": "sd_v1"})
    return len(tensors) // 3


SCENARIOS = {
    "sd15": [
        ("LoRA all blocks", [("char", False, "all")]),
        ("LoRA upper (style)", [("style", False, "upper")]),
        ("LoCon all + LoRA upper", [("char", True, "all"), ("style", False, "upper")]),
    ],
    "flux": [
        ("LoRA all blocks", [("char", False, "all")]),
        ("LoRA single blocks", [("style", False, "single")]),
        ("LoRA all + LoRA single", [("char", False, "all"), ("style", False, "single")]),
    ],
}
"""Per architecture: (title, [(adapter name, LoCon?, blocks the cell applies)]); every file covers all blocks."""


class StepTimer:
    """Wall time of every denoiser call (one per denoising step; CFG batches both halves into one call)."""

    def __init__(self, denoiser: torch.nn.Module, device: torch.device):
        self.device, self.times, self._start = device, [], 0.0
        denoiser.register_forward_pre_hook(self._before)
        denoiser.register_forward_hook(self._after)

    def _before(self, *_):
        _sync(self.device)
        self._start = time.perf_counter()

    def _after(self, *_):
        _sync(self.device)
        self.times.append(time.perf_counter() - self._start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(SCENARIOS), default="sd15")
    parser.add_argument("--double", type=int, default=1, help="Flux: double blocks (Flux.1 has 19)")
    parser.add_argument("--single", type=int, default=2, help="Flux: single blocks (Flux.1 has 38)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions (after one warm-up)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--per-steps", type=int,
                        help="also give the cost against this many measured steps (default: Flux.1-dev's 28, SD1.5's 25)")
    args = parser.parse_args()
    args.per_steps = args.per_steps or (28 if args.arch == "flux" else 25)

    from blora_tools.adapter.model import open_adapter
    from blora_tools.render.plan import CellSettings, select_modules
    from blora_tools.render.pipeline import RenderModel, WeightPatcher, attach_adapter, render_cell, resolve_device, resolve_dtype
    from blora_tools.render.run import in_pipeline_naming

    flux = args.arch == "flux"
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    folder = Path(tempfile.mkdtemp(prefix="bench_render_"))
    t0 = time.perf_counter()
    with torch.no_grad():
        pipe = build_flux(device, dtype, folder, args.double, args.single) if flux else build_sd15(device, dtype, folder)
    model = RenderModel.from_pipeline(pipe)
    build_s = time.perf_counter() - t0
    size = (args.size, args.size)
    settings = (CellSettings("a watercolor painting of a cat", "", 1, args.steps, 3.5) if flux
                else CellSettings("a watercolor painting of a cat", "blurry", 1, args.steps, 7.0))

    def timed(fn, repeat):
        times = []
        for _ in range(repeat):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    render_cell(model, settings, size)  # warm-up
    steps = StepTimer(model.components()["unet"], device)
    render_s = timed(lambda: render_cell(model, settings, size), args.repeat)
    step_s = statistics.median(steps.times)

    rows = []
    for title, spec in SCENARIOS[args.arch]:
        uses = []
        modules = 0
        attach_s = 0.0
        for i, (name, conv, blocks) in enumerate(spec):
            path = folder / f"{title.replace(' ', '_')}_{name}.safetensors"
            if flux:
                write_flux_lora(path, args.double, args.single, args.rank, seed=i)
            else:
                write_lora(path, pipe, args.rank, conv, "all", seed=i)
            adapter = in_pipeline_naming(open_adapter(path))
            selection = select_modules(name, adapter, blocks, adapter.arch)
            start = time.perf_counter()
            attached = attach_adapter(model, name, adapter, selection.stems)
            _sync(device)
            attach_s += time.perf_counter() - start
            uses += [(attached, adapter.modules[s], 0.8) for s in selection.stems]
            modules += len(selection.stems)
        patcher = WeightPatcher()
        patcher.apply(uses)  # warm-up
        patcher.restore()
        apply_s = timed(lambda: patcher.apply(uses), 1)
        restore_s = timed(patcher.restore, 1)
        for _ in range(args.repeat - 1):
            apply_s = min(apply_s, timed(lambda: patcher.apply(uses), 1))
            restore_s = min(restore_s, timed(patcher.restore, 1))
        rows.append({"scenario": title, "modules": modules, "layers": len({id(u[0].layers[u[1].stem]) for u in uses}),
                     "attach_s": attach_s, "apply_s": apply_s, "restore_s": restore_s,
                     "overhead_pct": 100 * (apply_s + restore_s) / render_s,
                     "overhead_step_pct": 100 * (apply_s + restore_s) / step_s,
                     "overhead_steps_pct": 100 * (apply_s + restore_s) / (args.per_steps * step_s)})

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    what = (f"Flux.1 transformer at full width, {args.double} double + {args.single} single blocks (of 19 + 38), tiny "
            "text encoders and VAE" if flux else "SD1.5-sized pipeline")
    print(f"{what} · device: {name} · dtype {model.dtype_name} · {args.size}x{args.size} · {args.steps} steps "
          f"{'flow-matching Euler · guidance 3.5' if flux else 'DPM++ 2M Karras · CFG 7'} · rank {args.rank} · "
          f"model built in {build_s:.1f} s")
    print(f"one render (denoise + VAE decode): {render_s * 1000:.1f} ms; one denoising step (median of "
          f"{len(steps.times)}): {step_s * 1000:.1f} ms")
    head = (f"{'scenario':<26}{'modules':>8}{'layers':>8}{'attach ms':>11}{'apply ms':>10}{'restore ms':>12}"
            f"{'vs render':>11}{'vs step':>9}{f'vs {args.per_steps} steps':>15}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['scenario']:<26}{r['modules']:>8}{r['layers']:>8}{r['attach_s'] * 1000:>11.1f}{r['apply_s'] * 1000:>10.1f}"
              f"{r['restore_s'] * 1000:>12.3f}{r['overhead_pct']:>10.2f}%{r['overhead_step_pct']:>8.1f}%"
              f"{r['overhead_steps_pct']:>14.2f}%")
    print("attach: once per grid (read factors to the device); apply + restore: once per cell whose adapters change")
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "device": name, "dtype": model.dtype_name, "size": args.size,
                                         "steps": args.steps, "rank": args.rank, "render_s": render_s,
                                         "step_s": step_s, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
