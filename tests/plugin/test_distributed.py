"""The fake trainer under torch.distributed (gloo, 2 CPU processes): adapter weights stay identical."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import fake_trainer


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_keep_identical_adapters(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    fake_trainer.tiny_models("sd1")  # import diffusers/transformers here, once, before forking
    # fork: the children inherit the imported libraries (spawn would re-import diffusers and transformers in
    # each); like DataLoader workers, they set one thread before any torch work, so OpenMP is not re-entered.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        fake_trainer.distributed_worker, args=(2, init, str(tmp_path), 5), nprocs=2, join=True, start_method=method
    )
    a = load_file(str(tmp_path / "rank0.safetensors"))
    b = load_file(str(tmp_path / "rank1.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ups = [v for k, v in a.items() if k.endswith("lora_up.weight")]
    assert all(torch.count_nonzero(u) > 0 for u in ups), "training moved every up factor"
