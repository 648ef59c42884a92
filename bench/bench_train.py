"""Benchmark (run by hand): one training step of `kohya_plugin.blockwise` against a minimal reference LoRA.

The reference, written here, wraps exactly the same layers (the plugin's own target list) with the smallest
LoRA that works: `layer.forward = x ↦ base(x) + scale · up(down(x))`, no dropout, no multiplier, no
bookkeeping. Both train the U-Net only (no text encoder) with AdamW on the same random batch, so any
difference is the plugin's overhead. Then `preset=style` is measured against `preset=all`: trainable
parameters, optimizer state and step time.

    python bench/bench_train.py                              # tiny SD1 U-Net on the CPU
    python bench/bench_train.py --size sd15 --res 32         # SD1.5-sized U-Net (random weights), CPU
    python bench/bench_train.py --size sd15 --device cuda --dtype bf16 --batch 4 --res 64

Prints one table; times are medians over `--steps` steps after `--warmup` steps.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blora_tools.taxonomy.arch import Arch  # noqa: E402


def build_unet(size: str, device: str, dtype: torch.dtype) -> nn.Module:
    from diffusers import UNet2DConditionModel

    if size == "tiny":
        from blora_tools.models import build_unet as tiny

        unet = tiny(Arch.SD1, "tiny")
    else:  # SD1.5 config, random weights: the shapes and FLOPs of the real model, no download
        unet = UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768, attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        )
    unet = unet.to(device) if dtype == torch.float32 else unet.to(device=device, dtype=dtype)
    return unet.requires_grad_(False)


class ReferenceLoRA(nn.Module):
    """The minimal LoRA: two factor layers and a scale, installed by replacing `forward`."""

    def __init__(self, layer: nn.Module, rank: int, alpha: float):
        super().__init__()
        if isinstance(layer, nn.Linear):
            self.down = nn.Linear(layer.in_features, rank, bias=False)
            self.up = nn.Linear(rank, layer.out_features, bias=False)
        else:
            self.down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, bias=False)
            self.up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank
        base = layer.forward
        self.to(device=layer.weight.device, dtype=layer.weight.dtype)
        layer.forward = lambda x, *a, **k: base(x, *a, **k) + self.up(self.down(x)) * self.scale


def reference_network(unet: nn.Module, rank: int, alpha: float) -> nn.ModuleList:
    from kohya_plugin.targets import find_targets

    _, targets = find_targets(None, unet, include_conv=False)
    return nn.ModuleList(ReferenceLoRA(t.layer, rank, alpha) for t in targets if t.placement.component.value == "unet")


def plugin_network(unet: nn.Module, rank: int, alpha: float, preset: str):
    from kohya_plugin import blockwise

    network = blockwise.create_network(1.0, rank, alpha, None, None, unet, preset=preset, te_dim="0")
    network.apply_to(None, unet, False, True)
    network.to(device=next(unet.parameters()).device, dtype=next(unet.parameters()).dtype)
    return network


def measure(unet, params, args, device: str) -> dict:
    """Median step time, peak memory (CUDA) and optimizer state size of training `params`."""
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(0)
    res = args.res
    dtype = next(unet.parameters()).dtype
    x = torch.randn((args.batch, 4, res, res), generator=g).to(device, dtype)
    context = torch.randn((args.batch, 77, unet.config.cross_attention_dim), generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    target = torch.randn(x.shape, generator=g).to(device, dtype)
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(unet(x, t, context).sample.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    return {"params": sum(p.numel() for p in params), "state_mb": state / 2**20, "ms": 1000 * statistics.median(times), "peak_mb": peak}


def run(kind: str, args) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    unet = build_unet(args.size, args.device, dtype)
    if kind == "reference":
        network = reference_network(unet, args.rank, args.alpha)
        params = list(network.parameters())
    else:
        network = plugin_network(unet, args.rank, args.alpha, kind.split("=")[1])
        params = network.get_trainable_params()
    for p in params:
        p.requires_grad_(True)
    result = measure(unet, params, args, args.device)
    del unet, network, params
    gc.collect()  # the forward closures form cycles with their modules: free them before the next run
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--res", type=int, default=16, help="latent resolution (64 = 512 px)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {}
    for kind in ("reference", "preset=all", "reference", "preset=all", "preset=style"):
        result = run(kind, args)
        previous = rows.get(kind)
        rows[kind] = result if previous is None or result["ms"] < previous["ms"] else previous
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nU-Net {args.size}, {device}, {args.dtype}, batch {args.batch}, latent {args.res}×{args.res}, rank {args.rank}; "
          f"median of {args.steps} steps, best of 2 runs for reference and preset=all; torch {torch.__version__}")
    print(f"{'network':<14}{'trainable':>12}{'optim MB':>10}{'step ms':>10}{'peak MB':>10}{'vs ref':>8}{'vs all':>8}")
    ref, full = rows["reference"], rows["preset=all"]
    for kind, r in rows.items():
        print(f"{kind:<14}{r['params']:>12,}{r['state_mb']:>10.1f}{r['ms']:>10.1f}{r['peak_mb']:>10.0f}"
              f"{r['ms'] / ref['ms']:>8.3f}{r['ms'] / full['ms']:>8.3f}")
    style = rows["preset=style"]
    print(f"preset=style / preset=all: params {style['params'] / full['params']:.3f}, optimizer state "
          f"{style['state_mb'] / max(full['state_mb'], 1e-9):.3f}, step time {style['ms'] / full['ms']:.3f}")


if __name__ == "__main__":
    main()
