"""Benchmark (run by hand): Flux.1-sized `resize` and `compare` against dense references (issue #15).

Inputs: two rank-64 kohya Flux LoRAs A and B (`bench_dit.make_file`: sd-scripts' default `lora_flux` modules at
full width, shapes from the taxonomy's layer table, random fp16 factors whose singular values fall off by
`--decay` per rank, as a trained LoRA's do; independent seeds).

Contenders, each its own process (wall time start to exit, Python start-up and imports included; peak RSS from
the kernel's accounting of that one child):

* ours, run as a user runs it: `blora-tools resize A --rank 16`, `blora-tools resize A --dynamic sv_fro:0.95`,
  `blora-tools compare A B` (tables) and `blora-tools compare A B --json`;
* the dense reference, written here in float32 as a script would: per module ΔW = (alpha/rank)·up·down and its
  full SVD (`torch.linalg.svd`); resize truncates it to 16 (or to the fewest singular values keeping 95 % of
  ‖ΔW‖_F); compare takes ‖ΔW_a‖, ‖ΔW_b‖, ⟨ΔW_a, ΔW_b⟩ and the principal angles between the two column spaces
  (the left singular vectors above 1e-5 of the largest: compare's own definition). At full width this takes
  about 20 s per SVD on 2 cores, so it runs on one module of each distinct shape (S00's three modules among
  them) and its time is extrapolated by the count of each shape, in the file and in the whole model (304
  modules), as bench_dit.py does. One process runs both references (A's SVD is shared; its time counts in
  each), so the peak RSS shown is the compare reference's, the larger.

Accuracy: per sampled module, the relative error ‖ΔW − output‖_F/‖ΔW‖_F of ours and of the reference (and the
ranks the dynamic rule kept); for compare, block S00's norms, cosine and overlap from ours' `--json` against
the reference's (S00 is the block whose every module the reference computes).

    python bench/bench_dit_resize_compare.py --blocks 1                 # D00 + S00, 13 modules: a quick check
    python bench/bench_dit_resize_compare.py --blocks 4                 # 52 modules
    python bench/bench_dit_resize_compare.py --blocks 1 --skip-dense    # ours only (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from bench_dit import flux_layers, make_file  # noqa: E402
from bench_merge import measured  # noqa: E402

CLI = [sys.executable, "-m", "blora_tools", "-q"]
BASIS_TOLERANCE = 1e-5
"""Singular values below this share of the largest do not count towards a column space (as in compare)."""


def _sampled(blocks: int | None) -> list:
    """One layer of each distinct shape, S00's first (so that block is complete)."""
    layers = flux_layers(blocks)
    chosen: dict[tuple[int, int], object] = {}
    for layer in sorted(layers, key=lambda l: not l.block.startswith("S")):
        chosen.setdefault(layer.shape, layer)
    return list(chosen.values())


def _delta(f, stem: str):
    up, down = f.get_tensor(f"{stem}.lora_up.weight").float(), f.get_tensor(f"{stem}.lora_down.weight").float()
    return float(f.get_tensor(f"{stem}.alpha")) / down.shape[0] * (up @ down)


def _norm(x) -> float:
    """‖x‖_F accumulated in float64: torch's float32 `norm()` of a 21504×3072 ΔW is 0.6 % low on the CPU."""
    import torch

    return math.sqrt(float(torch.sum(x * x, dtype=torch.float64)))


def _rule_rank(s, share: float) -> int:
    """The fewest singular values whose ‖·‖_F reaches `share` of the whole (kohya's sv_fro)."""
    import torch

    energy = torch.cumsum(s.double() ** 2, 0)
    return int((energy < share**2 * energy[-1] * (1 - 1e-12)).sum()) + 1


def child_reference(a: str, b: str, fixed: str, dynamic: str, rank: int, share: float, blocks: int) -> dict:
    """The dense references on the sampled modules: seconds per part, and the figures to check ours against."""
    from safetensors import safe_open

    files = [safe_open(p, "pt") for p in (a, b)]
    outputs = {"fixed": safe_open(fixed, "pt"), "dynamic": safe_open(dynamic, "pt")}
    return {"modules": [_reference_module(layer, files, outputs, rank, share) for layer in _sampled(blocks or None)]}


def _reference_module(layer, files: list, outputs: dict, rank: int, share: float) -> dict:
    """One module's dense references (its tensors freed on return, so the peak is one module's)."""
    import torch

    stem, t = layer.stem, {}

    def timed(part: str, fn):
        start = time.perf_counter()
        value = fn()
        t[part] = time.perf_counter() - start
        return value

    da = timed("delta_a", lambda: _delta(files[0], stem))
    u, s, vt = timed("svd_a", lambda: torch.linalg.svd(da, full_matrices=False))
    approx = {"fixed": timed("truncate_fixed", lambda: (u[:, :rank] * s[:rank]) @ vt[:rank])}
    k = timed("rule", lambda: _rule_rank(s, share))
    approx["dynamic"] = timed("truncate_dynamic", lambda: (u[:, :k] * s[:k]) @ vt[:k])
    db = timed("delta_b", lambda: _delta(files[1], stem))
    ub, sb, _ = timed("svd_b", lambda: torch.linalg.svd(db, full_matrices=False))

    def figures():
        qa, qb = u[:, s > BASIS_TOLERANCE * s[0]], ub[:, sb > BASIS_TOLERANCE * sb[0]]
        return (_norm(da), _norm(db), float(torch.sum(da * db, dtype=torch.float64)),
                float((torch.linalg.svdvals(qa.T @ qb).clamp(0, 1) ** 2).mean()))

    norm_a, norm_b, inner, overlap = timed("compare", figures)
    record = {"stem": stem, "block": layer.block, "shape": list(layer.shape), "seconds": t, "norm_a": norm_a,
              "norm_b": norm_b, "inner": inner, "overlap": overlap, "rule_rank": k}
    for name, f in outputs.items():  # not timed: the accuracy of both routes
        ours = _delta(f, stem)
        record[f"error_{name}_ours"] = _norm(da - ours) / norm_a
        record[f"error_{name}_reference"] = _norm(da - approx[name]) / norm_a
        record[f"rank_{name}_ours"] = f.get_slice(f"{stem}.lora_down.weight").get_shape()[0]
    return record


def child_make(path: str, blocks: int, rank: int, seed: int, decay: float) -> dict:
    """The inputs, made in a child: a parent's peak RSS carries into the processes it starts."""
    make_file(Path(path), blocks or None, rank, seed, decay)
    return {}


CHILDREN = {"make": child_make, "reference": child_reference}


def _child(name: str, *args) -> dict:
    result = measured([sys.executable, __file__, "--child", name, *map(str, args)],
                      {**os.environ, "PYTHONPATH": str(REPO)})
    return {**json.loads(result["stdout"].strip().splitlines()[-1]), "seconds": result["seconds"],
            "peak_mb": result["peak_mb"]}


def _ours(*args: str) -> dict:
    return measured([*CLI, *args], {**os.environ, "PYTHONPATH": str(REPO)})


def _per_shape(modules: list[dict], parts: tuple[str, ...]) -> dict[tuple[int, int], float]:
    return {tuple(m["shape"]): sum(m["seconds"][p] for p in parts) for m in modules}


def _extrapolated(per_shape: dict[tuple[int, int], float], blocks: int | None) -> float:
    counts = Counter(layer.shape for layer in flux_layers(blocks))
    return sum(per_shape[shape] * n for shape, n in counts.items())


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, help="only this many double and single blocks (default: all 19 + 38)")
    parser.add_argument("--rank", type=int, default=64, help="the inputs' rank")
    parser.add_argument("--target", type=int, default=16, help="resize --rank")
    parser.add_argument("--share", type=float, default=0.95, help="resize --dynamic sv_fro:SHARE")
    parser.add_argument("--decay", type=float, default=0.95, help="the inputs' singular values fall off by this per rank")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, *rest = args.child
        fn = CHILDREN[name]
        params = [int(x) if x.isdigit() else float(x) if x.replace(".", "", 1).isdigit() else x for x in rest]
        print(json.dumps(fn(*params)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp, "a.safetensors"), Path(tmp, "b.safetensors")
        fixed, dynamic = Path(tmp, "fixed.safetensors"), Path(tmp, "dynamic.safetensors")
        for path, seed in ((a, 1), (b, 2)):
            _child("make", path, args.blocks or 0, args.rank, seed, args.decay)
        rule = f"sv_fro:{args.share:g}"
        load = [_load()]
        rows = {
            f"resize --rank {args.target}": _ours("resize", str(a), "--rank", str(args.target), "-o", str(fixed)),
            f"resize --dynamic {rule}": _ours("resize", str(a), "--dynamic", rule, "-o", str(dynamic)),
            "compare A B": _ours("compare", str(a), str(b)),
            "compare A B --json": _ours("compare", str(a), str(b), "--json"),
        }
        load.append(_load())
        report = json.loads(rows["compare A B --json"]["stdout"])
        dense = None if args.skip_dense else _child("reference", a, b, fixed, dynamic, args.target, args.share,
                                                      args.blocks or 0)
        load.append(_load())
        size = a.stat().st_size
    layers = flux_layers(args.blocks)
    print(f"\n{len(layers)} full-width Flux.1 modules, rank {args.rank} (singular values × {args.decay:g} per rank), "
          f"{size / 2**20:.0f} MiB per input, {os.cpu_count()} CPUs, load average {' → '.join(load)}")
    print("| | ours: time | ours: peak RSS | dense reference: time (file / 304 modules) | reference: peak RSS |")
    print("|---|---|---|---|---|")
    parts = {
        f"resize --rank {args.target}": ("delta_a", "svd_a", "truncate_fixed"),
        f"resize --dynamic {rule}": ("delta_a", "svd_a", "rule", "truncate_dynamic"),
        "compare A B": ("delta_a", "svd_a", "delta_b", "svd_b", "compare"),
        "compare A B --json": ("delta_a", "svd_a", "delta_b", "svd_b", "compare"),
    }
    for name, r in rows.items():
        ref = ""
        if dense:
            per_shape = _per_shape(dense["modules"], parts[name])
            file_s, model_s = _extrapolated(per_shape, args.blocks), _extrapolated(per_shape, None)
            ref = f"≈{file_s:.0f} s / ≈{model_s:.0f} s ({file_s / r['seconds']:.0f}× ours) | {dense['peak_mb']:.0f} MB"
        print(f"| {name} | {r['seconds']:.1f} s | {r['peak_mb']:.0f} MB | {ref or '– | –'} |")
    if not dense:
        return
    print(f"reference: {len(dense['modules'])} modules sampled, {dense['seconds']:.0f} s for them (timed parts and "
          "the accuracy checks)")
    print("| module | shape | rel. error rank " + str(args.target) + ": ours / reference | " + rule
          + ": rank ours / reference, error ours / reference |")
    print("|---|---|---|---|")
    for m in dense["modules"]:
        print(f"| {m['stem']} | {m['shape'][0]}×{m['shape'][1]} | {m['error_fixed_ours']:.6f} / "
              f"{m['error_fixed_reference']:.6f} | {m['rank_dynamic_ours']} / {m['rule_rank']}, "
              f"{m['error_dynamic_ours']:.6f} / {m['error_dynamic_reference']:.6f} |")
    block = [m for m in dense["modules"] if m["block"] == "S00"]
    norm_a = math.sqrt(sum(m["norm_a"] ** 2 for m in block))
    norm_b = math.sqrt(sum(m["norm_b"] ** 2 for m in block))
    reference = {"norm_a": norm_a, "norm_b": norm_b, "cosine": sum(m["inner"] for m in block) / (norm_a * norm_b),
                 "overlap": sum(m["overlap"] for m in block) / len(block)}
    print("compare, block S00: ours (--json) vs reference")
    for key, value in reference.items():
        got = report["blocks"]["S00"][key]
        print(f"  {key:8} {got:.9g} vs {value:.9g}  (difference {abs(got - value):.1e})")


if __name__ == "__main__":
    main()
