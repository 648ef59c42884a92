"""Per-cell cost of applying and removing adapters in `render`, against one denoising run (run by hand).

An SD1.5-sized pipeline (U-Net, VAE and CLIP-L text encoder at full size, random weights: nothing is
downloaded) renders one image; then the adapters of a grid cell are merged into its weights and taken out
again, as `render_plan` does between cells. Target: apply + restore < 5 % of one render.

    python bench/bench_render.py                              # auto device/dtype, 512x512, 25 steps
    python bench/bench_render.py --device cpu --size 256 --steps 4 --repeat 1   # a quick CPU figure
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions (after one warm-up)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from blora_tools.adapter.model import open_adapter
    from blora_tools.render.plan import CellSettings, select_modules
    from blora_tools.render.pipeline import RenderModel, WeightPatcher, attach_adapter, render_cell, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    folder = Path(tempfile.mkdtemp(prefix="bench_render_"))
    t0 = time.perf_counter()
    with torch.no_grad():
        pipe = build_sd15(device, dtype, folder)
    model = RenderModel.from_pipeline(pipe)
    build_s = time.perf_counter() - t0
    size = (args.size, args.size)
    settings = CellSettings("a watercolor painting of a cat", "blurry", 1, args.steps, 7.0)

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
    render_s = timed(lambda: render_cell(model, settings, size), args.repeat)

    scenarios = [
        ("LoRA all blocks", [("char", False, "all")]),
        ("LoRA upper (style)", [("style", False, "upper")]),
        ("LoCon all + LoRA upper", [("char", True, "all"), ("style", False, "upper")]),
    ]
    rows = []
    for title, spec in scenarios:
        uses = []
        modules = 0
        attach_s = 0.0
        for i, (name, conv, blocks) in enumerate(spec):
            path = folder / f"{title.replace(' ', '_')}_{name}.safetensors"
            write_lora(path, pipe, args.rank, conv, "all", seed=i)
            adapter = open_adapter(path)
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
                     "overhead_pct": 100 * (apply_s + restore_s) / render_s})

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name} · dtype {model.dtype_name} · {args.size}x{args.size} · {args.steps} steps DPM++ 2M Karras · "
          f"CFG 7 · rank {args.rank} · model built in {build_s:.1f} s")
    print(f"one render (denoise + VAE decode): {render_s * 1000:.1f} ms")
    head = f"{'scenario':<26}{'modules':>8}{'layers':>8}{'attach ms':>11}{'apply ms':>10}{'restore ms':>12}{'overhead':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['scenario']:<26}{r['modules']:>8}{r['layers']:>8}{r['attach_s'] * 1000:>11.1f}{r['apply_s'] * 1000:>10.1f}"
              f"{r['restore_s'] * 1000:>12.3f}{r['overhead_pct']:>9.2f}%")
    print("attach: once per grid (read factors to the device); apply + restore: once per cell whose adapters change")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "dtype": model.dtype_name, "size": args.size,
                                         "steps": args.steps, "rank": args.rank, "render_s": render_s, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
