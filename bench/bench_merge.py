"""Benchmark (run by hand): `merge --method svd` against a dense-ΔW + full-SVD reference.

Two SDXL-shaped rank-64 adapters (module names and shapes from the golden kohya manifest
`sdxl_lora.json`, read now; random fp16 factors, alphas 32 and 64) are merged at ratios 1 and 0.8 to rank 64:

* ours: `blora_tools.ops.merge` (QR of the stacked factors + SVD of the small core, streamed to disk);
* reference, written here: load both files whole, then per module build the dense ΔW = Σ ratio·scale·up·down and
  take its full SVD, keep 64 (per module, so its memory is *lower* than a script that first builds every
  dense ΔW), save.

Each runs in its own process; we report wall time, peak RSS (and the part above the process's RSS right after
imports) and the relative reconstruction error ‖ΣΔW − output‖/‖ΣΔW‖ of each output, computed from factors with
Gram identities, plus the largest per-module difference between the two outputs.

`prune`, `reweight` and `convert` against `cp` are measured by `bench/bench_copy.py`.

    python bench/bench_merge.py                 # full size (the reference takes a long time on few cores)
    python bench/bench_merge.py --every 8       # every 8th module: a representative eighth
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MANIFEST = REPO / "tests" / "data" / "kohya_manifests" / "sdxl_lora.json"
RATIOS = (1.0, 0.8)


def _manifest() -> list[dict]:
    return json.loads(MANIFEST.read_text())["modules"]


def make_inputs(folder: Path, rank: int, every: int) -> tuple[Path, Path, int]:
    import torch
    from safetensors.torch import save_file

    modules = _manifest()[::every]
    paths = []
    for i, alpha in enumerate((32.0, 64.0)):
        g = torch.Generator().manual_seed(100 + i)
        tensors = {}
        for m in modules:
            out, fan_in = m["org_shape"][0], math.prod(m["org_shape"][1:])
            tensors[f"{m['name']}.lora_down.weight"] = (torch.randn(rank, fan_in, generator=g) / math.sqrt(fan_in)).half()
            tensors[f"{m['name']}.lora_up.weight"] = (torch.randn(out, rank, generator=g) * 0.02).half()
            tensors[f"{m['name']}.alpha"] = torch.tensor(alpha).half()
        path = folder / f"in{i}.safetensors"
        save_file(tensors, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
        paths.append(path)
    return paths[0], paths[1], len(modules)


# --- the two contenders, each run in a child process ---------------------------------------------------


def run_ours(a: Path, b: Path, out: Path, rank: int) -> None:
    from blora_tools.adapter.model import open_adapter
    from blora_tools.ops.lowrank import RankPlan
    from blora_tools.ops.merge import Source, merge

    sources = [Source(open_adapter(a), RATIOS[0]), Source(open_adapter(b), RATIOS[1])]
    merge(sources, method="svd", plan=RankPlan(rank), alpha=float(rank), dtype="F32").save(out, force=True)


def run_reference(a: Path, b: Path, out: Path, rank: int) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    inputs = [load_file(str(a)), load_file(str(b))]
    stems = sorted({k.split(".")[0] for sd in inputs for k in sd})
    result = {}
    for stem in stems:
        delta = None
        for sd, ratio in zip(inputs, RATIOS):
            if f"{stem}.lora_up.weight" not in sd:
                continue
            up, down = sd[f"{stem}.lora_up.weight"].float(), sd[f"{stem}.lora_down.weight"].float()
            scale = float(sd[f"{stem}.alpha"]) / down.shape[0]
            term = (ratio * scale) * (up @ down)
            delta = term if delta is None else delta + term
        u, s, vt = torch.linalg.svd(delta, full_matrices=False)
        result[f"{stem}.lora_up.weight"] = (u[:, :rank] * s[:rank]).contiguous()
        result[f"{stem}.lora_down.weight"] = vt[:rank].contiguous()
        result[f"{stem}.alpha"] = torch.tensor(float(rank))
    save_file(result, str(out))


def child(which: str, a: str, b: str, out: str, rank: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    import safetensors.torch  # noqa: F401  (imports before the baseline)

    import blora_tools.ops.merge  # noqa: F401

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    (run_ours if which == "ours" else run_reference)(Path(a), Path(b), Path(out), rank)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_mb": peak / 1024, "above_imports_mb": (peak - base) / 1024}))


def _run_child(which: str, a: Path, b: Path, out: Path, rank: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", which, str(a), str(b), str(out), "--rank", str(rank), "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- accuracy from factors (Gram identities, float64) ------------------------------------------------


def _inner(f, g) -> float:
    """⟨U₁D₁, U₂D₂⟩_F = tr((U₂ᵀU₁)(D₁D₂ᵀ)) for factor pairs f = (U₁, D₁), g = (U₂, D₂)."""
    return float(((g[0].T @ f[0]) * (f[1] @ g[1].T).T).sum())


def _terms(sd: dict, stem: str, coefficient: float = 1.0):
    up, down = sd[f"{stem}.lora_up.weight"].double(), sd[f"{stem}.lora_down.weight"].double()
    scale = float(sd[f"{stem}.alpha"]) / down.shape[0] if f"{stem}.alpha" in sd else 1.0
    return up * (coefficient * scale), down.reshape(down.shape[0], -1)


def accuracy(a: Path, b: Path, ours: Path, reference: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    inputs = [load_file(str(a)), load_file(str(b))]
    outputs = {"ours": load_file(str(ours)), "reference": load_file(str(reference))}
    total = 0.0
    error = dict.fromkeys(outputs, 0.0)
    worst = 0.0
    for stem in sorted({k.split(".")[0] for k in inputs[0]}):
        exact = [_terms(sd, stem, r) for sd, r in zip(inputs, RATIOS)]
        exact = (torch.cat([t[0] for t in exact], 1), torch.cat([t[1] for t in exact], 0))
        norm2 = _inner(exact, exact)
        total += norm2
        got = {name: _terms(sd, stem) for name, sd in outputs.items()}
        for name, g in got.items():
            error[name] += norm2 + _inner(g, g) - 2 * _inner(exact, g)
        o, r = got["ours"], got["reference"]
        diff2 = _inner(o, o) + _inner(r, r) - 2 * _inner(o, r)
        worst = max(worst, math.sqrt(max(diff2, 0.0) / _inner(r, r)))
    return {name: math.sqrt(max(e, 0.0) / total) for name, e in error.items()} | {"max_module_difference": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs=4, metavar=("WHICH", "A", "B", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--every", type=int, default=1, help="use every Nth module of the manifest (1 = full SDXL)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each contender (same for both)")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.rank, args.threads)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    bench_merge(args)


def bench_merge(args) -> None:
    a, b, n = make_inputs(args.out, args.rank, args.every)
    ours_out, ref_out = args.out / "ours.safetensors", args.out / "reference.safetensors"
    ours = _run_child("ours", a, b, ours_out, args.rank, args.threads)
    ref = _run_child("reference", a, b, ref_out, args.rank, args.threads)
    acc = accuracy(a, b, ours_out, ref_out)
    print(f"\nmerge --method svd --rank {args.rank}: two SDXL-shaped rank-{args.rank} fp16 adapters, {n} modules "
          f"(every {args.every}th of 986), {args.threads} thread(s), {os.cpu_count()} CPUs")
    print(f"{'':12}{'time s':>10}{'peak RSS MB':>14}{'above imports MB':>18}{'rel. error':>14}")
    for name, r in (("ours", ours), ("reference", ref)):
        print(f"{name:12}{r['seconds']:>10.2f}{r['peak_mb']:>14.0f}{r['above_imports_mb']:>18.0f}{acc[name]:>14.6f}")
    print(f"{'ratio':12}{ref['seconds'] / ours['seconds']:>9.1f}×{ours['peak_mb'] / ref['peak_mb']:>14.2f}"
          f"{ours['above_imports_mb'] / max(ref['above_imports_mb'], 1e-9):>18.3f}"
          f"{abs(acc['ours'] - acc['reference']):>14.1e}")
    print(f"largest per-module relative difference ours vs reference: {acc['max_module_difference']:.1e}")


if __name__ == "__main__":
    main()
