"""The thread policy, the device choice and the read-ahead worker (blora_tools/compute.py), for behaviour."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from blora_tools.compute import (
    PER_MODULE,
    WHOLE_MODEL,
    Ahead,
    CpuLoad,
    apply_threads,
    free_cpus,
    in_order,
    read_cpu_load,
    resolve_device,
    thread_count,
)
from blora_tools.errors import BloraError


@pytest.mark.parametrize(
    "load, per_module, whole_model",
    [
        (CpuLoad(2, 0.0), 2, 2),  # idle 2 cores: two modules side by side
        (CpuLoad(2, 1.0), 1, 2),  # one core busy elsewhere: one
        (CpuLoad(2, 2.0), 1, 2),  # a process spinning on every core: never more than one thread (render: all,
        (CpuLoad(2, 5.0), 1, 2),  # over-committed: still one              so its images do not depend on the load)
        (CpuLoad(16, 0.0), 4, 16),  # per-module work is capped: its problems are small
        (CpuLoad(16, 13.0), 3, 16),  # only the CPUs others leave free
        (CpuLoad(16, 15.6), 1, 16),
    ],
)
def test_thread_count_follows_work_and_free_cpus(load, per_module, whole_model):
    assert thread_count(PER_MODULE, load=lambda: load) == per_module
    assert thread_count(WHOLE_MODEL, load=lambda: load) == whole_model
    assert thread_count(PER_MODULE, load=lambda: load) <= free_cpus(load)


def test_requested_threads_override_and_skip_the_reading():
    def unreadable() -> CpuLoad:
        raise AssertionError("the load is not read when --threads is given")

    assert thread_count(PER_MODULE, 7, load=unreadable) == 7
    with pytest.raises(BloraError, match="at least 1"):
        thread_count(PER_MODULE, 0, load=unreadable)


def test_cpu_load_reads_the_running_tasks(tmp_path):
    allowed = len(os.sched_getaffinity(0))
    alone = tmp_path / "alone"
    alone.write_text("0.10 0.20 0.30 1/200 4242\n")  # only the reader runs
    assert read_cpu_load(alone) == CpuLoad(allowed, 0.0)
    assert free_cpus(read_cpu_load(alone)) == allowed
    crowded = tmp_path / "crowded"
    crowded.write_text(f"9.0 9.0 9.0 {1 + 50 * (os.cpu_count() or 1)}/900 4242\n")  # 50 spinners per CPU
    assert read_cpu_load(crowded).busy == allowed
    assert free_cpus(read_cpu_load(crowded)) == 1
    assert read_cpu_load(tmp_path / "missing") == CpuLoad(allowed, 0.0)  # no reading: treated as idle


@pytest.mark.parametrize("work, threads, torch_threads, workers", [(WHOLE_MODEL, 2, 2, 1), (PER_MODULE, 2, 1, 2)])
def test_apply_threads_before_torch_sets_the_environment_torch_starts_with(work, threads, torch_threads, workers):
    """A fresh process: the policy goes into the environment OpenMP reads when torch starts its pool. Per-module
    work puts its threads on modules side by side, each running torch on one thread."""
    code = (
        "import sys; from blora_tools import compute; "
        f"compute.apply_threads({threads}, compute.{'PER_MODULE' if work is PER_MODULE else 'WHOLE_MODEL'}); "
        "assert 'torch' not in sys.modules; import os, torch; "
        "print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads(), compute.module_workers())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["PASSIVE", str(torch_threads), str(workers)]


def test_apply_threads_after_torch_tells_torch(monkeypatch):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY"):
        monkeypatch.setenv(name, "7")  # restored afterwards
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # a user's own choice is kept
    before = torch.get_num_threads()
    try:
        apply_threads(2)
        assert torch.get_num_threads() == 2
        assert os.environ["OMP_NUM_THREADS"] == "2" and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    finally:
        torch.set_num_threads(before)


def test_devices_resolve_or_are_refused_by_name():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(BloraError, match="--device mps: .*float64"):
        resolve_device("mps")
    with pytest.raises(BloraError, match="--device tpu: unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BloraError, match="--device cuda: no CUDA device"):
            resolve_device("cuda")
    else:
        with pytest.raises(BloraError, match="only"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_ahead_runs_the_next_jobs_on_a_worker_in_key_order():
    ran: dict[str, str] = {}

    def job(key: str):
        def run():
            ran[key] = threading.current_thread().name
            return key.upper()

        return run

    ahead = Ahead(depth=2)
    takers = {k: ahead.add(k, job(k)) for k in ("c", "a", "d", "b")}
    assert takers["a"]() == "A"  # the first runs when asked, and starts b and c
    deadline = time.monotonic() + 10
    while len(ran) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert sorted(ran) == ["a", "b", "c"]  # never more than `depth` ahead
    assert ran["a"] == threading.current_thread().name
    assert ran["b"].startswith("blora-ahead") and ran["c"].startswith("blora-ahead")
    assert [takers[k]() for k in ("b", "c", "d")] == ["B", "C", "D"]
    assert sorted(ran) == ["a", "b", "c", "d"]


@pytest.mark.parametrize("workers", [1, 2])
def test_ahead_with_several_workers_computes_modules_side_by_side(workers):
    """The first job runs in the caller while the next ones run on the workers: three jobs meet at a barrier only
    when two workers run side by side; results stay per key either way."""
    started = threading.Barrier(3, timeout=2)

    def job(key: str):
        def run():
            try:
                started.wait()
                return key * 2
            except threading.BrokenBarrierError:
                return key

        return run

    ahead = Ahead(workers=workers)
    takers = {k: ahead.add(k, job(k)) for k in ("a", "b", "c", "d")}
    together = [takers[k]() for k in ("a", "b", "c")]
    assert together == (["aa", "bb", "cc"] if workers == 2 else ["a", "b", "c"])
    started.reset()
    assert takers["d"]() in ("d", "dd")


def test_in_order_keeps_order_bounds_the_look_ahead_and_passes_errors():
    running = threading.Semaphore(0)
    seen: list[int] = []

    def job(n: int) -> int:
        seen.append(n)
        if n == 6:
            raise ValueError("job 6 failed")
        running.release()
        time.sleep(0.01 * (5 - n % 5))  # later items finish first
        return n * n

    results = in_order(job, range(10), workers=3)
    got = [next(results) for _ in range(6)]
    assert got == [n * n for n in range(6)]
    assert max(seen) <= 6 + 2 * 3  # never more than two per worker ahead of the consumer
    with pytest.raises(ValueError, match="job 6 failed"):
        next(results)
    assert list(in_order(lambda n: n + 1, [3, 1, 2], workers=1)) == [4, 2, 3]  # one worker: the caller's thread


def test_ahead_out_of_order_and_failing_jobs():
    calls: list[str] = []

    def job(key: str):
        def run():
            calls.append(key)
            if key == "b":
                raise ValueError("job b failed")
            return key

        return run

    ahead = Ahead(depth=1)
    takers = {k: ahead.add(k, job(k)) for k in ("a", "b", "c")}
    assert takers["c"]() == "c"  # out of the guessed order: runs when asked
    with pytest.raises(ValueError, match="job b failed"):
        takers["b"]()  # a worker's error reaches the caller
    assert takers["a"]() == "a"
    assert sorted(calls) == ["a", "b", "c"]
