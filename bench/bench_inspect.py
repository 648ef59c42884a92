"""Benchmark (run by hand): `inspect` on a ~1 GB SDXL-shaped adapter, headers only and with statistics.

The adapter has kohya's SDXL LoCon module names and shapes (from the full-size model built on the meta device)
with random fp16 factors at `--rank`; with `--arch flux`, sd-scripts' `lora_flux` modules (the golden manifest
`flux_dev_lora.json`: 304 fused modules) instead — rank 104 makes about 1 GB. Measured, each in a fresh process
with the file in the page cache:

* `inspect --no-stats --json`: wall time of the command (imports included) and the bytes it reads (`rchar`
  of /proc/self/io around the call, so Python's own imports are not counted);
* `inspect --json` (norms from factors, NaN check): wall time, against `cat FILE > /dev/null`.

    python bench/bench_inspect.py              # writes bench/out/sdxl_r128.safetensors once, then measures
    python bench/bench_inspect.py --arch flux --rank 104
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

_MEASURE = """
import importlib, json, os, sys, time
from blora_tools.cli import main
# The modules the command imports lazily, imported first so their files are not counted as data read.
for name in ['blora_tools.cli.inspect_cmd', 'blora_tools.ops.stats', 'blora_tools.adapter.model', 'rich.table',
             'rich.progress'] + os.environ.get('BENCH_PREIMPORT', '').split():
    importlib.import_module(name)
def rchar():
    for line in open('/proc/self/io'):
        if line.startswith('rchar:'):
            return int(line.split()[1])
before, start = rchar(), time.perf_counter()
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    sys.stderr.write(json.dumps({'read': rchar() - before, 'seconds': time.perf_counter() - start}) + '\\n')
"""


def _layers(arch: str) -> list[tuple[str, tuple[int, ...]]]:
    """(kohya name, weight shape) of every layer the adapter adapts."""
    if arch == "flux":
        import json

        manifest = HERE.parent / "tests" / "data" / "kohya_manifests" / "flux_dev_lora.json"
        return [(m["name"], tuple(m["org_shape"])) for m in json.loads(manifest.read_text())["modules"]]
    from blora_tools.models import build_text_encoders, build_unet
    from kohya_plugin.targets import find_targets

    _, targets = find_targets(build_text_encoders("sdxl", "full", "meta"), build_unet("sdxl", "full", "meta"), include_conv=True)
    return [(t.name, tuple(t.layer.weight.shape)) for t in targets]


def make_file(path: Path, rank: int, arch: str) -> None:
    import torch

    from blora_tools.adapter.writer import Entry, write_entries

    g = torch.Generator().manual_seed(0)
    entries = []
    for name, shape in _layers(arch):
        r = min(rank, shape[0], shape[1])
        down = (r,) + shape[1:]
        up = (shape[0], r) + ((1, 1) if len(shape) == 4 else ())
        for param, s in (("lora_down.weight", down), ("lora_up.weight", up)):
            entries.append(Entry(f"{name}.{param}", "F16", s, lambda s=s: (torch.randn(s, generator=g) * 0.01).half().numpy().tobytes()))
        entries.append(Entry(f"{name}.alpha", "F16", (), lambda r=r: torch.tensor(float(r)).half().numpy().tobytes()))
    base = {"sdxl": "sdxl_base_v1-0", "flux": "flux1"}[arch]
    write_entries(path, entries, {"ss_base_model_version": base}, force=True)


def run(args: list[str], preimport: str = "") -> tuple[float, dict]:
    import json
    import os

    start = time.perf_counter()
    env = dict(os.environ, BENCH_PREIMPORT=preimport)
    done = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, check=True, env=env)
    wall = time.perf_counter() - start
    return wall, json.loads(done.stderr.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--arch", choices=("sdxl", "flux"), default="sdxl")
    opts = parser.parse_args()
    path = HERE / "out" / f"{opts.arch}_r{opts.rank}.safetensors"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        make_file(path, opts.rank, opts.arch)
    size = path.stat().st_size
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    cat = []
    for _ in range(opts.repeat):
        start = time.perf_counter()
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
        cat.append(time.perf_counter() - start)
    header = [run(["inspect", "--no-stats", "--json", str(path)]) for _ in range(opts.repeat)]
    stats = [run(["inspect", "--json", str(path)]) for _ in range(opts.repeat)]
    warm = [run(["inspect", "--json", str(path)], preimport="torch") for _ in range(opts.repeat)]
    c = statistics.median(cat)
    h_wall = statistics.median(w for w, _ in header)
    h_call = statistics.median(m["seconds"] for _, m in header)
    h_read = max(m["read"] for _, m in header)
    s_call = statistics.median(m["seconds"] for _, m in stats)
    s_wall = statistics.median(w for w, _ in stats)
    kind = "SDXL LoCon" if opts.arch == "sdxl" else "Flux.1 LoRA (lora_flux modules)"
    print(f"\nfile: {size / 2**30:.2f} GiB {kind}, rank {opts.rank}, fp16; median of {opts.repeat}; page cache warm")
    print(f"{'what':<34}{'seconds':>10}{'read MB':>10}{'vs cat':>9}")
    print(f"{'cat FILE > /dev/null':<34}{c:>10.3f}{size / 1e6:>10.1f}{1:>9.2f}")
    print(f"{'inspect --no-stats (whole process)':<34}{h_wall:>10.3f}{'':>10}{h_wall / c:>9.2f}")
    print(f"{'inspect --no-stats (the call)':<34}{h_call:>10.3f}{h_read / 1e6:>10.3f}{h_call / c:>9.2f}")
    print(f"{'inspect with stats (whole process)':<34}{s_wall:>10.3f}{'':>10}{s_wall / c:>9.2f}")
    print(f"{'inspect with stats (the call)':<34}{s_call:>10.3f}{'':>10}{s_call / c:>9.2f}")
    w_call = statistics.median(m["seconds"] for _, m in warm)
    print(f"{'  the same, torch imported before':<34}{w_call:>10.3f}{'':>10}{w_call / c:>9.2f}")
    header_bytes = path.open("rb").read(8)
    print(f"header: {int.from_bytes(header_bytes, 'little') / 1e6:.3f} MB of JSON for {size / 2**30:.2f} GiB of tensors")


if __name__ == "__main__":
    main()
