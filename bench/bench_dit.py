"""Benchmark: Flux.1-sized merges and conversions (issue #13).

Two rank-64 kohya Flux LoRAs with every block module at full width (the 304 modules of sd-scripts' default
`lora_flux` network, shapes from the taxonomy's layer table: no model needed), random fp16 factors.

* `merge --method svd --rank 64` (Gram matrices of the stacked factors, one small eigenproblem) against the dense
  reference: ΔW = ΔW_a + ΔW_b formed per module and decomposed by a full SVD. The dense route is slow at full
  width, so it is timed on one module of each distinct shape and extrapolated by the count of each shape;
  the table says so. Error: ‖ΔW − rank-64 result‖_F / ‖ΔW‖_F on those modules, for both routes.
* Peak memory: the maximum resident set of a child process running only that route.
* convert kohya → diffusers and back for one file (library calls, torch already imported), against copying the
  file (`shutil.copyfile`).

The inputs are made in a child process and the parent never imports torch: Linux carries a parent's peak RSS
into the processes it starts. Resize and compare at this size: bench_dit_resize_compare.py.

Run: `python bench/bench_dit.py` (all 304 modules: tens of minutes on 2 cores); `--blocks 2` (26 modules, every
shape once or more) for a shorter run; `--blocks 1 --skip-dense` for a quick check.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def flux_layers(blocks: int | None, single_blocks: int | None = None):
    """The full-width Flux.1 block layers of sd-scripts' default `lora_flux` network (BFL naming), from the
    taxonomy's layer table; with `blocks`, only the first that many double blocks and single blocks (or
    `single_blocks` single blocks)."""
    from blora_tools.taxonomy.dit import BFL, FLUX_RECORD

    chosen = [l for l in FLUX_RECORD.layers() if l.naming == BFL and l.block is not None]
    if blocks is not None:
        singles = blocks if single_blocks is None else single_blocks
        keep = {f"D{i:02d}" for i in range(blocks)} | {f"S{i:02d}" for i in range(singles)}
        chosen = [l for l in chosen if l.block in keep]
    return chosen


def make_file(path: Path, blocks: int | None, rank: int, seed: int, decay: float = 1.0,
              single_blocks: int | None = None) -> None:
    """A kohya Flux LoRA of `rank` on `flux_layers(blocks, single_blocks)`, random fp16 factors, alpha rank/2.
    `decay` < 1 scales the i-th down row by decay**i, so ΔW's singular values fall off geometrically as a trained
    LoRA's do."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    rows = torch.tensor([decay**i for i in range(rank)])[:, None]
    tensors = {}
    for layer in flux_layers(blocks, single_blocks):
        out, fan_in = layer.shape
        down = torch.randn(rank, fan_in, generator=gen) / math.sqrt(fan_in) * rows
        tensors[f"{layer.stem}.lora_down.weight"] = down.half()
        tensors[f"{layer.stem}.lora_up.weight"] = (torch.randn(out, rank, generator=gen) * 0.01).half()
        tensors[f"{layer.stem}.alpha"] = torch.tensor(float(rank / 2)).half()
    save_file(tensors, str(path), metadata={"ss_base_model_version": "flux1"})


def child_make(path: str, blocks: int, rank: int, seed: int) -> dict:
    """`make_file` in a child: Linux carries a parent's peak RSS into the children it starts (fork and exec keep
    it), so the parent, which starts every measured process, must never hold tensors or torch itself."""
    make_file(Path(path), blocks or None, rank, seed)
    return {}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_merge(a: str, b: str, out: str, rank: int) -> dict:
    """The merge as a library call, torch imported before the clock starts (as the dense reference's is)."""
    import torch

    from blora_tools.adapter.model import open_adapter
    from blora_tools.ops.lowrank import RankPlan
    from blora_tools.ops.merge import Source, merge

    start = time.perf_counter()
    result = merge([Source(open_adapter(a)), Source(open_adapter(b))], method="svd", plan=RankPlan(rank))
    result.save(out, force=True)
    return {"seconds": time.perf_counter() - start, "peak_mib": _peak_mib(), "threads": torch.get_num_threads()}


def child_dense(a: str, b: str, rank: int, merged_path: str, blocks: int) -> dict:
    """Dense ΔW + full SVD on one module of each shape; time per shape (extrapolated to the file's modules by
    the count of each shape), error of both routes there. `blocks` 0: the whole model."""
    import torch
    from safetensors import safe_open

    shapes: dict[tuple[int, int], str] = {}
    counts: Counter = Counter()
    for layer in flux_layers(blocks or None):
        shapes.setdefault(layer.shape, layer.stem)
        counts[layer.shape] += 1
    files = [safe_open(p, "pt") for p in (a, b)]
    merged = safe_open(merged_path, "pt")
    per_shape, errors_dense, errors_ours = {}, [], []
    present = set(merged.keys())
    for shape, stem in shapes.items():
        if f"{stem}.lora_up.weight" not in present:
            continue
        start = time.perf_counter()
        delta = torch.zeros(shape)
        for f in files:
            up, down = f.get_tensor(f"{stem}.lora_up.weight").float(), f.get_tensor(f"{stem}.lora_down.weight").float()
            delta += float(f.get_tensor(f"{stem}.alpha")) / up.shape[1] * (up @ down)
        u, s, vt = torch.linalg.svd(delta, full_matrices=False)
        approx = (u[:, :rank] * s[:rank]) @ vt[:rank]
        per_shape[str(shape)] = time.perf_counter() - start
        norm = float(delta.norm())
        errors_dense.append(float((delta - approx).norm()) / norm)
        up, down = merged.get_tensor(f"{stem}.lora_up.weight").float(), merged.get_tensor(f"{stem}.lora_down.weight").float()
        alpha = float(merged.get_tensor(f"{stem}.alpha"))
        errors_ours.append(float((delta - alpha / up.shape[1] * (up @ down)).norm()) / norm)
        del delta, u, s, vt, approx
    total = sum(per_shape[str(shape)] * n for shape, n in counts.items() if str(shape) in per_shape)
    return {"per_shape": per_shape, "seconds_extrapolated": total, "peak_mib": _peak_mib(),
            "error_dense": max(errors_dense), "error_ours": max(errors_ours), "counts": {str(k): v for k, v in counts.items()}}


def child_convert(src: str, mid: str, back: str) -> dict:
    """Both conversions as library calls, torch imported before the clock starts (so the first direction does not
    carry the import alone; whole-process figures with the CLI's start-up are bench_copy.py's)."""
    import torch

    from blora_tools.adapter.model import open_adapter
    from blora_tools.ops.convert import convert

    start = time.perf_counter()
    convert(open_adapter(src), to="diffusers").save(mid, force=True)
    to_diffusers = time.perf_counter() - start
    start = time.perf_counter()
    convert(open_adapter(mid), to="kohya").save(back, force=True)
    return {"to_diffusers": to_diffusers, "to_kohya": time.perf_counter() - start, "peak_mib": _peak_mib(),
            "threads": torch.get_num_threads()}


def _child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, help="only this many double and single blocks (quick runs)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        name, *rest = args.child
        fn = {"make": child_make, "merge": child_merge, "dense": child_dense, "convert": child_convert}[name]
        params = [int(x) if x.isdigit() else x for x in rest]
        print(json.dumps(fn(*params[: fn.__code__.co_argcount])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        a, b, out = Path(tmp, "a.safetensors"), Path(tmp, "b.safetensors"), Path(tmp, "m.safetensors")
        for path, seed in ((a, 1), (b, 2)):
            _child("make", str(path), str(args.blocks or 0), str(args.rank), str(seed))
        size = a.stat().st_size
        ours = _child("merge", str(a), str(b), str(out), str(args.rank))
        dense = None if args.skip_dense else _child("dense", str(a), str(b), str(args.rank), str(out), str(args.blocks or 0))
        start = time.perf_counter()
        shutil.copyfile(a, Path(tmp, "copy.safetensors"))
        copy = time.perf_counter() - start
        conv = _child("convert", str(a), str(Path(tmp, "d.safetensors")), str(Path(tmp, "k.safetensors")))
        modules = len(flux_layers(args.blocks))
        print(f"{modules} modules, rank {args.rank}, {size / 2**20:.0f} MiB per input")
        print("| route | time | peak RSS | max rel. error (sampled shapes) |")
        print("|---|---|---|---|")
        error = f"{dense['error_ours']:.4f}" if dense else "–"
        print(f"| merge --method svd --rank {args.rank} (Gram route) | {ours['seconds']:.1f} s | {ours['peak_mib']:.0f} MiB | {error} |")
        if dense:
            print(f"| dense ΔW + full SVD (extrapolated from one module per shape) | {dense['seconds_extrapolated']:.0f} s | "
                  f"{dense['peak_mib']:.0f} MiB | {dense['error_dense']:.4f} |")
            print(f"speed-up {dense['seconds_extrapolated'] / ours['seconds']:.0f}×; per-shape dense seconds {json.dumps(dense['per_shape'])}")
        print(f"| convert kohya → diffusers | {conv['to_diffusers']:.1f} s | {conv['peak_mib']:.0f} MiB | exact |")
        print(f"| convert diffusers → kohya | {conv['to_kohya']:.1f} s | | exact |")
        print(f"| cp of the input | {copy:.2f} s | | |")


if __name__ == "__main__":
    main()
