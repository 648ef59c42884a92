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

Flux.1 / SD3 (`--arch flux|sd3`): kohya's own `networks.lora_flux` / `lora_sd3` against the plugin at the same
modules, on one tiny model built by sd-scripts' own classes (`library.flux_models.Flux`, `sd3_models.MMDiT`: the
real block layout, small widths). Each network trains in a fresh process, so each peak is its own: on the CPU the
peak resident memory above what the process held before the first step (Linux VmHWM, reset through
/proc/self/clear_refs), on CUDA the peak allocated. Needs sd-scripts and an interpreter with its pins:

    KOHYA_PYTHON bench/bench_train.py --arch flux --sd-scripts /path/to/sd-scripts        # 19+38 blocks, width 64
    KOHYA_PYTHON bench/bench_train.py --arch sd3 --sd-scripts /path/to/sd-scripts --depth 4

A network that refuses the model is reported in its row (with its one-line error); the other is measured alone.
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


KOHYA_MODULES = {"flux": "networks.lora_flux", "sd3": "networks.lora_sd3"}


def build_dit(args, device: str, dtype: torch.dtype) -> tuple[nn.Module, dict]:
    """The tiny Flux / MMDiT of sd-scripts' own classes and one random batch of its inputs."""
    g = torch.Generator().manual_seed(0)
    batch, tokens, text = args.batch, (args.res // 2) ** 2, 16
    if args.arch == "flux":
        from library import flux_models

        head = args.width // args.heads
        side = head * 7 // 16  # FLUX.1's RoPE split of a 128-wide head is [16, 56, 56]
        params = flux_models.FluxParams(
            in_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=args.width, mlp_ratio=4.0,
            num_heads=args.heads, depth=args.double, depth_single_blocks=args.single,
            axes_dim=[head - 2 * side, side, side], theta=10_000, qkv_bias=True, guidance_embed=True)
        model = flux_models.Flux(params)
        inputs = {"img": torch.randn(batch, tokens, 64, generator=g), "img_ids": torch.zeros(batch, tokens, 3),
                  "txt": torch.randn(batch, text, 32, generator=g), "txt_ids": torch.zeros(batch, text, 3),
                  "timesteps": torch.rand(batch, generator=g), "y": torch.randn(batch, 32, generator=g),
                  "guidance": torch.ones(batch)}
        target = torch.randn(batch, tokens, 64, generator=g)
    else:
        from library import sd3_models

        grid = args.res // 2
        params = sd3_models.SD3Params(
            patch_size=2, depth=args.depth, num_patches=grid * grid, pos_embed_max_size=grid, adm_in_channels=2048,
            qk_norm="rms", x_block_self_attn_layers=[], context_embedder_in_features=4096,
            context_embedder_out_features=64 * args.depth, model_type="5-large")
        model = sd3_models.create_sd3_mmdit(params)
        nn.init.normal_(model.pos_embed, std=0.02)  # left uninitialised (torch.empty) by the constructor
        for module in model.modules():
            if isinstance(module, sd3_models.RMSNorm) and module.weight is not None:
                nn.init.ones_(module.weight)
        inputs = {"x": torch.randn(batch, 16, args.res, args.res, generator=g),
                  "t": torch.rand(batch, generator=g) * 1000, "y": torch.randn(batch, 2048, generator=g),
                  "context": torch.randn(batch, text, 4096, generator=g)}
        target = torch.randn(batch, 16, args.res, args.res, generator=g)
    model = model.to(device=device, dtype=dtype).requires_grad_(False)
    inputs = {k: v.to(device, dtype) for k, v in inputs.items()}
    return model, {"inputs": inputs, "target": target.to(device, dtype)}


def dit_network(kind: str, model: nn.Module, args):
    """kohya's module (transformer blocks, no text encoder) or the plugin at the same modules (`preset=all`)."""
    if kind == "kohya":
        import importlib

        network = importlib.import_module(KOHYA_MODULES[args.arch]).create_network(
            1.0, args.rank, args.alpha, None, [], model)
    else:
        from kohya_plugin import blockwise

        network = blockwise.create_network(1.0, args.rank, args.alpha, None, None, model, preset="all", te_dim="0")
    network.apply_to(None, model, False, True)
    return network.to(device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)


def _resident_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_dit(kind: str, args, queue) -> None:
    """One network's training steps in this (fresh) process; puts its row, or why it did not run, on `queue`."""
    try:
        sys.path.insert(0, str(args.sd_scripts))
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        model, data = build_dit(args, args.device, dtype)
        try:
            network = dit_network(kind, model, args)
        except ValueError as err:  # the plugin's SpecError: an arch it does not support yet
            if kind != "plugin":
                raise
            queue.put({"kind": kind, "skipped": f"kohya_plugin.blockwise refuses {args.arch}: {err}"})
            return
        params = [p for p in network.get_trainable_params() if p.requires_grad] or list(network.parameters())
        for p in params:
            p.requires_grad_(True)
        modules = sorted({k.split(".")[0] for k in network.state_dict()})
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        cuda = args.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        resident = _resident_mb("VmRSS")
        times = []
        for step in range(args.warmup + args.steps):
            start = time.perf_counter()
            out = model(**data["inputs"])
            torch.nn.functional.mse_loss(out.float(), data["target"].float()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _resident_mb("VmHWM") - resident
        queue.put({"kind": kind, "modules": modules, "params": sum(p.numel() for p in params),
                   "ms": 1000 * statistics.median(times), "peak_mb": peak})
    except Exception as err:  # reported by the parent, which prints the table
        queue.put({"kind": kind, "error": f"{type(err).__name__}: {err}"})


def run_dit(args) -> None:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    rows = {}
    for kind in ("kohya", "plugin"):
        queue = context.Queue()
        process = context.Process(target=measure_dit, args=(kind, args, queue))
        process.start()
        rows[kind] = queue.get()
        process.join()
    name = {"kohya": KOHYA_MODULES[args.arch], "plugin": "kohya_plugin.blockwise preset=all"}
    size = (f"{args.double} double + {args.single} single blocks, width {args.width}" if args.arch == "flux"
            else f"depth {args.depth}, width {64 * args.depth}")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({args.threads or 'default'} threads)"
    print(f"\n{args.arch} ({size}), {device}, {args.dtype}, batch {args.batch}, latent {args.res}x{args.res}, "
          f"rank {args.rank}; median of {args.steps} steps after {args.warmup}; torch {torch.__version__}")
    print(f"{'network':<36}{'modules':>8}{'trainable':>12}{'step ms':>10}{'peak MB':>10}")
    for kind, row in rows.items():
        if "ms" in row:
            print(f"{name[kind]:<36}{len(row['modules']):>8}{row['params']:>12,}{row['ms']:>10.1f}{row['peak_mb']:>10.1f}")
        else:
            print(f"{name[kind]:<36}  not run: {row.get('skipped') or row.get('error')}")
    kohya, plugin = rows["kohya"], rows["plugin"]
    if "ms" in kohya and "ms" in plugin:
        if kohya["modules"] != plugin["modules"]:
            only = sorted(set(kohya["modules"]) ^ set(plugin["modules"]))
            print(f"NOT the same modules ({len(only)} differ, e.g. {only[:3]}): the ratios compare different networks")
        print(f"plugin / kohya: step time {plugin['ms'] / kohya['ms']:.3f}, peak memory "
              f"{plugin['peak_mb'] / max(kohya['peak_mb'], 1e-9):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["sd1", "flux", "sd3"], default="sd1")
    parser.add_argument("--sd-scripts", type=Path, help="an sd-scripts work tree (needed by --arch flux / sd3)")
    parser.add_argument("--width", type=int, default=64, help="Flux hidden width (FLUX.1: 3072)")
    parser.add_argument("--heads", type=int, default=2, help="Flux attention heads (FLUX.1: 24)")
    parser.add_argument("--double", type=int, default=19, help="Flux double blocks")
    parser.add_argument("--single", type=int, default=38, help="Flux single blocks")
    parser.add_argument("--depth", type=int, default=4, help="SD3 depth; kohya's MMDiT is 64 x depth wide")
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
    if args.arch != "sd1":
        if args.sd_scripts is None or not (args.sd_scripts / "library").is_dir():
            parser.error("--arch flux / sd3 needs --sd-scripts, an sd-scripts work tree")
        run_dit(args)
        return
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
