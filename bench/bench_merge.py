"""Benchmark (run by hand): `merge --method svd` against a dense-ΔW + full-SVD reference, on an idle and a busy
machine, on the CPU and (when there is one) a GPU.

Two SDXL-shaped rank-64 adapters (module names and shapes from the golden kohya manifest
`sdxl_lora.json`, read now; random fp16 factors, alphas 32 and 64) are merged at ratios 1 and 0.8 to rank 64:

* ours, run as a user runs it: `blora-tools merge A B --method svd --rank 64 …` in its own process, with the
  CLI's thread policy (blora_tools/compute.py) — on the machine as it is ("idle"), then with a process spinning
  on every CPU this one may use ("busy"), then with `--threads 1` and `--threads N` (all CPUs) for comparison,
  and with `--device cuda` when CUDA is present;
* reference, written here: load both files whole, then per module build the dense ΔW = Σ ratio·scale·up·down and
  take its full SVD, keep 64 (per module, so its memory is *lower* than a script that first builds every
  dense ΔW), save; one torch thread, on every `--reference-every`th module (it takes minutes at full size).

For each we report wall time (whole process, imports included), peak RSS, and the relative reconstruction error
‖ΣΔW − output‖/‖ΣΔW‖ computed from factors with Gram identities (over the modules the reference ran), plus the
largest per-module difference between ours and the reference. `--unpinned` adds ours busy with torch's old
default (every CPU, OpenMP spinning while it waits): minutes.

`prune`, `reweight` and `convert` against `cp` are measured by `bench/bench_copy.py`.

    python bench/bench_merge.py                         # full size; the reference on every 4th module
    python bench/bench_merge.py --reference-every 1     # the reference on all 986 (about 11 minutes on 2 cores)
    python bench/bench_merge.py --every 8               # every 8th module: a quick look
    python bench/bench_merge.py --repeats 3             # three idle/busy pairs in turns (medians)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from machine import speed_line

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


# --- the contenders -------------------------------------------------------------------------------------


def measured(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run `cmd`; its wall time and peak RSS (from the kernel's accounting of that one child)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip()}")
    return {"seconds": seconds, "peak_mb": usage.ru_maxrss / 1024, "stdout": out}


def run_ours(a: Path, b: Path, out: Path, rank: int, *extra: str, env: dict[str, str] | None = None) -> dict:
    """`blora-tools merge` as a user runs it (a fresh process; CLI start-up and torch import included)."""
    cmd = [sys.executable, "-m", "blora_tools", "-q", "merge", str(a), str(b), "--ratios", ",".join(map(str, RATIOS)),
           "--method", "svd", "--rank", str(rank), "--alpha", str(rank), "--dtype", "fp32", "-o", str(out), "--force",
           *extra]
    return measured(cmd, {**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def run_reference(a: Path, b: Path, out: Path, rank: int, every: int) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    inputs = [load_file(str(a)), load_file(str(b))]
    stems = sorted({k.split(".")[0] for sd in inputs for k in sd})[::every]
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


def child(a: str, b: str, out: str, rank: int, every: int) -> None:
    import torch

    torch.set_num_threads(1)
    run_reference(Path(a), Path(b), Path(out), rank, every)


def _run_reference(a: Path, b: Path, out: Path, rank: int, every: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(a), str(b), str(out), "--rank", str(rank),
           "--reference-every", str(every)]
    return measured(cmd)


class Spinners:
    """A process spinning on every CPU this one may use: the busy machine of the issue."""

    def __init__(self, count: int):
        self.count = count
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Spinners":
        code = "while True: pass"
        self._procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(self.count)]
        time.sleep(1.0)  # let them reach the run queue
        return self

    def __exit__(self, *exc) -> None:
        for proc in self._procs:
            proc.kill()
        for proc in self._procs:
            proc.wait()


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
    for stem in sorted({k.split(".")[0] for k in outputs["reference"]}):
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
    parser.add_argument("--child", nargs=3, metavar=("A", "B", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--make-inputs", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--every", type=int, default=1, help="use every Nth module of the manifest (1 = full SDXL)")
    parser.add_argument("--reference-every", type=int, default=4, help="the reference runs on every Nth module")
    parser.add_argument("--unpinned", action="store_true", help="also ours busy with torch's old thread default")
    parser.add_argument("--repeats", type=int, default=1, help="idle/busy pairs to run, in turns (medians shown)")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.rank, args.reference_every)
        return
    if args.make_inputs:
        *_, n = make_inputs(args.out, args.rank, args.every)
        import torch

        print(json.dumps({"modules": n, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    bench_merge(args)


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def bench_merge(args) -> None:
    # The inputs are made in a child: Linux keeps a process's peak RSS across fork and exec, so every contender
    # started from a parent that had held the inputs (or imported torch) would report at least that parent's peak.
    before = speed_line()  # and again after the runs: a shared host drifts
    made = subprocess.run([sys.executable, __file__, "--make-inputs", "--out", str(args.out), "--rank", str(args.rank),
                           "--every", str(args.every)], capture_output=True, text=True, check=True)
    facts = json.loads(made.stdout.strip().splitlines()[-1])
    a, b, n, gpu = args.out / "in0.safetensors", args.out / "in1.safetensors", facts["modules"], facts["gpu"]
    cpus = len(os.sched_getaffinity(0))
    ours_out, ref_out = args.out / "ours.safetensors", args.out / "reference.safetensors"
    rows: dict[str, list[dict]] = {}

    def ours(label: str, *extra: str, env: dict[str, str] | None = None) -> dict:
        load = _load()
        result = run_ours(a, b, ours_out, args.rank, *extra, env=env)
        result["label"], result["load"] = label, load
        rows.setdefault(label, []).append(result)
        return result

    accuracy_out = args.out / "ours-idle.safetensors"
    ratios = []
    for _ in range(args.repeats):  # idle and busy in turns, so both see the same drift of a shared machine
        idle = ours("ours, CPU, idle (policy)")
        ours_out.replace(accuracy_out)
        with Spinners(cpus):
            busy = ours(f"ours, CPU, busy: {cpus} spinning (policy)")
        ratios.append(busy["seconds"] / idle["seconds"])
    if args.unpinned:
        with Spinners(cpus):
            ours(f"ours, CPU, busy: {cpus} spinning, torch's old default", "--threads", str(cpus),
                 env={"OMP_WAIT_POLICY": "ACTIVE"})
    ours("ours, CPU, idle, --threads 1", "--threads", "1")
    ours(f"ours, CPU, idle, --threads {cpus}", "--threads", str(cpus))
    if gpu:
        ours("ours, GPU (--device cuda), idle", "--device", "cuda")
    ref = _run_reference(a, b, ref_out, args.rank, args.reference_every)
    ref["load"] = _load()
    acc = accuracy(a, b, accuracy_out, ref_out)
    modules = len(range(0, n, args.reference_every))
    print(f"\nbefore: {before}\nafter:  {speed_line()}")
    print(f"merge --method svd --rank {args.rank}: two SDXL-shaped rank-{args.rank} fp16 adapters, {n} modules "
          f"(every {args.every}th of 986), {cpus} CPUs{', ' + gpu if gpu else ''}")
    print(f"{'':52}{'time s':>9}{'peak RSS MB':>13}{'load before':>13}   (median of the runs; all runs)")
    for label, runs in rows.items():
        r = sorted(runs, key=lambda x: x["seconds"])[len(runs) // 2]
        every = " ".join(f"{x['seconds']:.2f}" for x in runs) if len(runs) > 1 else ""
        print(f"{label:52}{r['seconds']:>9.2f}{r['peak_mb']:>13.0f}{r['load']:>13}   {every}")
    print(f"{'reference, 1 thread, every ' + str(args.reference_every) + 'th module (' + str(modules) + ')':52}"
          f"{ref['seconds']:>9.2f}{ref['peak_mb']:>13.0f}{ref['load']:>13}")
    print(f"busy / idle, each pair run back to back: {', '.join(f'{r:.2f}×' for r in ratios)}")
    print(f"relative error over the reference's {modules} modules: ours {acc['ours']:.6f}, reference "
          f"{acc['reference']:.6f} (difference {abs(acc['ours'] - acc['reference']):.1e}); largest per-module "
          f"relative difference ours vs reference {acc['max_module_difference']:.1e}")


if __name__ == "__main__":
    main()
