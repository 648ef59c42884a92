"""The machine's speed at the moment a benchmark runs, printed beside its figures.

On a shared VM the same code's time moves with the host's load (measured: one float64 GEMM 40 % slower an hour
later on an idle guest), so each table is printed with one core's float64 GEMM rate (what the Gram route runs
on) and its sha256 rate (what the copy commands hash with), taken in a fresh process just before.
"""

from __future__ import annotations

import json
import subprocess
import sys

_PROBE = """
import hashlib, json, os, time
import torch
torch.set_num_threads(1)
a = torch.randn(4096, 128, dtype=torch.float64)
a.T @ a
start, n = time.perf_counter(), 40
for _ in range(n):
    a.T @ a
gemm = 2 * 4096 * 128 * 128 * n / (time.perf_counter() - start) / 1e9
data, digest = os.urandom(1 << 26), hashlib.sha256()
start = time.perf_counter()
for _ in range(4):
    digest.update(data)
sha = 4 * len(data) / (time.perf_counter() - start) / 1e9
print(json.dumps({"gemm": gemm, "sha256": sha, "load": open("/proc/loadavg").read().split()[0]}))
"""


def speed_line() -> str:
    """`machine now: float64 GEMM N GFLOP/s on one core, sha256 N GB/s, load average N`."""
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    speed = json.loads(done.stdout.strip().splitlines()[-1])
    return (f"machine now: float64 GEMM {speed['gemm']:.1f} GFLOP/s on one core, sha256 {speed['sha256']:.2f} GB/s, "
            f"load average {speed['load']}")


if __name__ == "__main__":
    print(speed_line())
