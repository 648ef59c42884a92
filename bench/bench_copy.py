"""Benchmark (run by hand): the byte-copy commands (prune, reweight, convert) on a ~1 GB file against `cp`.

The file has every module of kohya's SDXL LoRA (names and shapes from the golden manifest `sdxl_lora.json`), or
with `--arch flux` of sd-scripts' `lora_flux` (`flux_dev_lora.json`: 304 modules, fused qkv), with random fp16
factors at the rank that makes `--gb` gigabytes. Each contender runs as its own process (the CLI
start-up included), in rounds, so every row sees the same load on a shared machine; the best of `--repeats`
rounds is shown, the page cache warm and the output removed before each run:

* `cp`, and `cp` + `sync OUT` (fsync: every command fsyncs its output before committing it);
* `sha256` of the file in one pass (hashlib): what hashing alone costs. Each command hashes its input for
  `blora_history` and its output for sd-scripts' `sshs_model_hash`, about twice this;
* `prune --drop te1`, `reweight --weights te1=0.5` (te1's up factors scaled, the rest copied; on Flux the block
  D00 instead of te1),
  `convert --to kohya --uniform-alpha` (the file already has one alpha: all copied, new metadata) and
  `convert --to peft` (every key renamed, so the copies leave file order and the input is hashed whole).

"vs cp" compares throughput (bytes written per second) with `cp`'s; "CPU s" is the process's user + system time.

    python bench/bench_copy.py                    # 1 GB in bench/out (local disk)
    python bench/bench_copy.py --dir /dev/shm/x   # in memory: no device writes behind the fsync
    python bench/bench_copy.py --gb 0.1           # a quick look
    python bench/bench_copy.py --arch flux        # a Flux.1 LoRA (convert --to peft splits q/k/v)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from machine import speed_line

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MANIFESTS = {"sdxl": "sdxl_lora.json", "flux": "flux_dev_lora.json"}
METADATA = {"sdxl": {"ss_base_model_version": "sdxl_base_v1-0"}, "flux": {"ss_base_model_version": "flux1"}}
SMALL_PART = {"sdxl": "te1", "flux": "D00"}
"""A small part of the file that prune drops and reweight scales."""
CLI = [sys.executable, "-m", "blora_tools", "-q"]


def make_file(folder: Path, gb: float, arch: str = "sdxl") -> tuple[Path, int]:
    """An `arch`-shaped fp16 LoRA of about `gb` GB (made once, kept while its size fits) and its rank."""
    import torch
    from safetensors.torch import save_file

    manifest = REPO / "tests" / "data" / "kohya_manifests" / MANIFESTS[arch]
    modules = json.loads(manifest.read_text())["modules"]
    per_rank = sum(2 * (m["org_shape"][0] + math.prod(m["org_shape"][1:])) for m in modules)
    rank = max(1, round(gb * 1e9 / per_rank))
    path = folder / f"{arch}_fp16_r{rank}.safetensors"
    if not path.exists():
        g = torch.Generator().manual_seed(7)
        tensors = {}
        for m in modules:
            out, fan_in = m["org_shape"][0], math.prod(m["org_shape"][1:])
            tensors[f"{m['name']}.lora_down.weight"] = torch.randn(rank, fan_in, generator=g, dtype=torch.float16)
            tensors[f"{m['name']}.lora_up.weight"] = torch.randn(out, rank, generator=g, dtype=torch.float16) * 0.01
            tensors[f"{m['name']}.alpha"] = torch.tensor(float(rank)).half()
        save_file(tensors, str(path), metadata=METADATA[arch])
    return path, rank


def _sha256(path: Path) -> None:
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)


def contenders(src: Path, out: Path, arch: str = "sdxl") -> dict[str, list[str] | None]:
    """Row name → command line (None: the hash, run in this process)."""
    part = SMALL_PART[arch]
    return {
        "cp": ["cp", str(src), str(out)],
        "cp + sync": ["sh", "-c", 'cp "$0" "$1" && sync "$1"', str(src), str(out)],
        "sha256 (one pass)": None,
        f"prune --drop {part}": [*CLI, "prune", str(src), "--drop", part, "-o", str(out)],
        f"reweight {part}=0.5": [*CLI, "reweight", str(src), "--weights", f"{part}=0.5", "-o", str(out)],
        "convert kohya --uniform-alpha": [*CLI, "convert", str(src), "--to", "kohya", "--uniform-alpha", "-o", str(out)],
        "convert --to peft": [*CLI, "convert", str(src), "--to", "peft", "-o", str(out)],
        "CLI start-up (--help)": [*CLI, "--help"],
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_once(command: list[str] | None, src: Path, out: Path) -> tuple[float, float, int]:
    """(wall s, CPU s, bytes written) of one run, the output removed before it."""
    out.unlink(missing_ok=True)
    cpu = _children_cpu() if command else _self_cpu()
    start = time.perf_counter()
    if command is None:
        _sha256(src)
    else:
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - start
    cpu = (_children_cpu() if command else _self_cpu()) - cpu
    return wall, cpu, out.stat().st_size if out.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the input file")
    parser.add_argument("--dir", type=Path, default=HERE / "out", help="where the input and outputs go")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arch", choices=sorted(MANIFESTS), default="sdxl", help="the model family of the file")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    before = speed_line()  # and again after the runs: a shared host drifts
    src, rank = make_file(args.dir, args.gb, args.arch)
    out = args.dir / "bench_copy_out.safetensors"
    size = src.stat().st_size
    subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)  # page cache warm
    rows = contenders(src, out, args.arch)
    best: dict[str, tuple[float, float, int]] = {}
    for _ in range(args.repeats):
        for name, command in rows.items():
            result = run_once(command, src, out)
            if name not in best or result[0] < best[name][0]:
                best[name] = result
    out.unlink(missing_ok=True)
    cp_rate = size / best["cp"][0]
    sync_rate = size / best["cp + sync"][0]
    print(f"\nbefore: {before}\nafter:  {speed_line()}")
    print(f"{size / 1e9:.2f} GB {args.arch}-shaped fp16 LoRA (rank {rank}) in {args.dir}, page cache warm, "
          f"best of {args.repeats}, {os.cpu_count()} CPUs")
    print(f"| {'':30} | {'wall s':>7} | {'CPU s':>6} | {'GB out':>6} | {'GB/s':>5} | {'vs cp':>6} | {'vs cp+sync':>10} |")
    print(f"|{'-' * 32}|{'-' * 9}|{'-' * 8}|{'-' * 8}|{'-' * 7}|{'-' * 8}|{'-' * 12}|")
    for name, (wall, cpu, written) in best.items():
        moved = written or (size if name.startswith("sha256") else 0)
        rate = moved / wall
        ratios = f"{rate / cp_rate:>6.0%} | {rate / sync_rate:>10.0%}" if moved else f"{'':>6} | {'':>10}"
        print(f"| {name:30} | {wall:>7.2f} | {cpu:>6.2f} | {moved / 1e9:>6.2f} | {rate / 1e9:>5.2f} | {ratios} |")


if __name__ == "__main__":
    main()
