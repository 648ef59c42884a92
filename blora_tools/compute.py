"""Where and on how many threads the tensor work runs: the thread policy and the device choice.

The per-module problems of adapter files (Gram products and eigenproblems of at most a few thousand by a few hundred)
gain little from threads, and OpenMP threads that spin while they wait starve each other and any other busy
process: an SDXL svd merge measured 5.7 s on one torch thread and 3 min 45 s on torch's default two threads
next to a busy process. So every command gets a thread count from its kind of work and from the CPUs that are
actually free, and OpenMP waits passively. The CLI applies the policy once, before a command imports torch
(`apply_threads`); `--threads N` overrides it. The load reading is injectable (`CpuLoad`), so the policy is
tested for behaviour under a simulated busy machine.

Devices: `cpu`, `cuda`, `mps` or `auto` (CUDA when present, else the CPU). The decompositions need float64
(`ops/lowrank.py`), which MPS does not have, so `mps` is refused with that reason.
"""

from __future__ import annotations

import math
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from blora_tools.errors import BloraError

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

    import torch

__all__ = [
    "DEVICES",
    "PER_MODULE",
    "WHOLE_MODEL",
    "Work",
    "CpuLoad",
    "read_cpu_load",
    "free_cpus",
    "thread_count",
    "apply_threads",
    "resolve_device",
    "on_device",
    "module_workers",
    "Ahead",
    "in_order",
]

DEVICES = ("cpu", "cuda", "mps", "auto")


@dataclass(frozen=True)
class Work:
    """A kind of work: the most threads it can use well (`cap`, None = no limit), and whether its threads each
    take a whole problem (`across`: one torch thread per problem, problems side by side) or share one."""

    cap: int | None
    fixed: bool = False
    """Use every CPU the process may run on, whatever the load: the result depends on the thread count (float
    sums split by thread), and the same command must give the same result."""
    across: bool = False


PER_MODULE = Work(cap=4, across=True)
"""merge, resize, compare, inspect, …: Gram and eigen problems of one module at a time, at most a few thousand by a
few hundred. Splitting one such problem over threads gains little (they wait on each other), so each thread takes
a module of its own (`module_workers`) and torch runs one thread per module; a module's result is then the same
whatever the thread count (bench/bench_merge.py measures it)."""
WHOLE_MODEL = Work(cap=None, fixed=True)
"""render: a whole network's convolutions, on every CPU the process may use (not fewer on a busy machine: an
image must not depend on what else was running)."""

_LOADAVG = Path("/proc/loadavg")


@dataclass(frozen=True)
class CpuLoad:
    """The CPUs this process may run on (`allowed`) and how many of them other processes keep busy (`busy`)."""

    allowed: int
    busy: float


def _allowed_cpus() -> int:
    """CPUs in this process's affinity mask, lowered by a cgroup v2 CPU quota (containers)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            allowed = min(allowed, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, allowed)


def read_cpu_load(loadavg: Path = _LOADAVG) -> CpuLoad:
    """How busy the machine is now: the tasks running or ready to run other than this one (the kernel's count
    in /proc/loadavg, read at once: a process spinning on a core is always counted), as a share of the CPUs
    this process may use. No reading (not Linux): idle."""
    allowed = _allowed_cpus()
    try:
        running = int(loadavg.read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return CpuLoad(allowed, 0.0)
    others = max(0, running - 1)  # this process, reading
    online = os.cpu_count() or allowed
    return CpuLoad(allowed, min(allowed, others * allowed / max(online, allowed)))


def free_cpus(load: CpuLoad) -> int:
    """CPUs nobody else keeps busy, at least 1 (a command always gets one)."""
    return max(1, min(load.allowed, math.floor(load.allowed - load.busy + 0.5)))


def thread_count(work: Work, requested: int | None = None, load: Callable[[], CpuLoad] | None = None) -> int:
    """Threads for a command: `requested` (`--threads`) when given, else the free CPUs (every allowed CPU for
    `fixed` work), up to its cap, and at least 1. `load` reads the machine (default `read_cpu_load`, looked up when
    called, so a test can simulate a machine for a whole command)."""
    if requested is not None:
        if requested < 1:
            raise BloraError(f"--threads {requested}: give at least 1")
        return requested
    reading = (load or read_cpu_load)()
    threads = reading.allowed if work.fixed else free_cpus(reading)
    if work.cap is not None:
        threads = min(threads, work.cap)
    return max(1, threads)


_module_workers = 1
"""Threads that compute modules side by side (`Ahead`), as `apply_threads` last set it."""


def apply_threads(threads: int, work: Work = WHOLE_MODEL) -> None:
    """Run `work` on `threads` threads that sleep, not spin, while they wait.

    Work `across` modules gets `threads` module workers (`module_workers`) and one torch thread; other work
    gets `threads` torch threads. Before torch is imported the environment does it (OpenMP reads it when torch
    starts its pools); after, torch is told directly. `OMP_WAIT_POLICY` set by the user is kept; the thread
    count replaces any.
    """
    global _module_workers
    _module_workers = threads if work.across else 1
    torch_threads = 1 if work.across else threads
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(torch_threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(torch_threads)
        try:
            torch.set_num_interop_threads(torch_threads)
        except RuntimeError:  # only before torch's first parallel work; its pool is then already sized
            pass


def module_workers() -> int:
    """How many modules are computed side by side (`Ahead`'s default): the thread policy's count for per-module
    work, 1 until a policy is applied."""
    return _module_workers


def resolve_device(name: str) -> "torch.device":
    """The torch device `name` (`auto`, `cpu`, `cuda`, `cuda:N`, `mps`) stands for; BloraError when it is not
    there (`--device cuda: no CUDA device`)."""
    import torch

    text = name.strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        raise BloraError("--device mps: the decompositions need float64, which MPS does not have; use --device cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise BloraError(f"--device {name}: no CUDA device (this torch sees none); use --device cpu")
        try:
            device = torch.device(text)
        except RuntimeError:
            raise BloraError(f"--device {name}: not a device name such as cuda or cuda:1") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BloraError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
        return device
    raise BloraError(f"--device {name}: unknown device; valid: {', '.join(DEVICES)}")


def on_device(tensors: dict[str, "torch.Tensor"], device: "torch.device | str | None") -> dict[str, "torch.Tensor"]:
    """One module's tensors moved to `device` (None: left where they are)."""
    if device is None:
        return tensors
    return {name: t.to(device) for name, t in tensors.items()}


T = TypeVar("T")
R = TypeVar("R")


def in_order(job: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> Iterator[R]:
    """`job(item)` for each item, in the items' order, computed on `workers` threads (default `module_workers()`)
    at most two per worker ahead of the consumer; with one worker, in the calling thread. A job's exception
    reaches the consumer when its result is due; the jobs not started then are dropped."""
    workers = max(1, workers if workers is not None else module_workers())
    if workers == 1:
        yield from map(job, items)
        return
    from concurrent.futures import ThreadPoolExecutor

    pending: deque = deque()
    remaining = iter(items)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blora-module")
    try:
        for item in remaining:
            pending.append(pool.submit(job, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Ahead(Generic[T]):
    """Runs jobs on `workers` threads (default `module_workers()`), `depth` ahead of the caller (default two per
    worker), in the sorted order of their keys (the order they will probably be asked for): reading and computing
    the next modules overlaps writing this one, and with several workers the modules are computed side by side.

    A job asked for out of that order runs when asked (the order is only a guess, never a condition of
    correctness); each result is handed over once and then forgotten, so memory holds `depth` results at most.
    """

    def __init__(self, depth: int | None = None, workers: int | None = None):
        self._workers = max(1, workers if workers is not None else module_workers())
        self._depth = depth if depth is not None else 2 * self._workers
        self._jobs: dict[str, Callable[[], T]] = {}
        self._order: list[str] | None = None
        self._position: dict[str, int] = {}
        self._futures: dict[str, "Future[T]"] = {}
        self._taken: set[str] = set()
        self._pool: "ThreadPoolExecutor | None" = None

    def add(self, key: str, job: Callable[[], T]) -> Callable[[], T]:
        """Register `job` under `key`; returns what to call for its result."""
        self._jobs[key] = job
        self._order = None
        return lambda: self.take(key)

    def take(self, key: str) -> T:
        """The job's result for `key` (computed ahead when the guess was right)."""
        if self._order is None:
            self._order = sorted(self._jobs)
            self._position = {k: i for i, k in enumerate(self._order)}
        future = self._futures.pop(key, None)
        self._taken.add(key)
        self._submit_after(self._position[key])
        return self._jobs[key]() if future is None else future.result()

    def _submit_after(self, position: int) -> None:
        following = self._order[position + 1 : position + 1 + self._depth]
        if not following:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="blora-ahead")
        for key in following:
            if key not in self._futures and key not in self._taken:
                self._futures[key] = self._pool.submit(self._jobs[key])
