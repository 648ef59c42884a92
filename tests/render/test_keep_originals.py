"""Where render keeps the original weights while adapters are merged (`--keep-originals`): the choice rule, exact
restoring with the originals kept on the device or copied to the host (also after an error or Ctrl-C part-way
through applying), and the option. No GPU here: the host path is forced on the CPU, where it copies the same way
(without pinning)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from blora_tools.adapter.model import open_adapter
from blora_tools.cli import main
from blora_tools.errors import BloraError
from blora_tools.render import pipeline
from blora_tools.render.pipeline import KEEP_MARGIN, WeightPatcher, attach_adapter, keep_originals_where, load_model, touched_bytes
from blora_tools.render.run import RenderRequest, render

from render_fixtures import SIZE, STEPS, load_pipe, make_lora, model_dirs  # noqa: F401 - model_dirs is a fixture

GIB = 1 << 30


@pytest.mark.parametrize("mode, needed, free, expected", [
    ("auto", 10 * GIB, None, "device"),  # CPU/MPS: the device's memory is the host's, never copy
    ("auto", 2 * GIB, 2 * GIB + KEEP_MARGIN, "device"),  # fits exactly with the margin
    ("auto", 2 * GIB + 1, 2 * GIB + KEEP_MARGIN, "host"),  # one byte short
    ("auto", 22 * GIB, 20 * GIB, "host"),  # Flux.1 with a LoRA on every block beside a loaded model
    ("device", 22 * GIB, 0, "device"),  # forcing wins over the free memory
    ("host", 0, 100 * GIB, "host"),
    ("host", 0, None, "host"),
])
def test_choice_rule(mode, needed, free, expected):
    assert keep_originals_where(mode, needed, free) == expected


def test_choice_rule_margin_is_a_parameter():
    assert keep_originals_where("auto", GIB, 2 * GIB, margin=GIB) == "device"
    assert keep_originals_where("auto", GIB, 2 * GIB, margin=GIB + 1) == "host"


def test_free_memory_counts_what_the_caching_allocator_holds_unused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (5 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 30 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 27 * GIB)
    assert pipeline._free_device_bytes(torch.device("cuda")) == 8 * GIB
    assert pipeline._free_device_bytes(torch.device("cpu")) is None


@pytest.mark.parametrize("mode", ["gpu", "", "Host"])
def test_unknown_mode_is_refused(mode):
    with pytest.raises(BloraError, match="use auto, device or host"):
        keep_originals_where(mode, 0, None)
    with pytest.raises(BloraError):
        WeightPatcher(mode)


def _setup(tmp_path, model_dirs, dtype="fp32", device="cpu"):
    """A tiny SD1 pipeline (on the CPU unless told) with its conv weights in channels_last (strides a copy must keep), an
    attached LoCon on every layer, the uses of weight 0.8, and the base parameters as they were."""
    folder = model_dirs("sd1")
    deltas = make_lora(tmp_path / "style.safetensors", load_pipe(folder), "sd1", conv=True, seed=21)
    model = load_model(folder, device=device, dtype=dtype)
    model.pipe.unet.to(memory_format=torch.channels_last)
    adapter = open_adapter(tmp_path / "style.safetensors")
    attached = attach_adapter(model, "style", adapter, list(adapter.modules))
    uses = [(attached, m, 0.8) for m in adapter.modules.values()]
    params = {f"{c}.{n}": p for c, net in model.components().items() for n, p in net.named_parameters()}
    return model, attached, uses, deltas, params


def _state(params):
    """name → (the tensor now held, a clone of its values with the same strides)."""
    return {name: (p.data, p.data.clone()) for name, p in params.items()}


def _assert_restored(params, before):
    for name, p in params.items():
        original, values = before[name]
        assert p.dtype == values.dtype and p.stride() == values.stride(), name
        assert torch.equal(p.data, values), f"{name} changed"


@pytest.mark.parametrize("keep, dtype", [("device", "fp32"), ("host", "fp32"), ("host", "bf16")])
def test_restore_is_bit_exact_and_host_keeps_separate_copies(tmp_path, model_dirs, keep, dtype):
    model, attached, uses, deltas, params = _setup(tmp_path, model_dirs, dtype)
    before = _state(params)
    networks = {"unet": model.pipe.unet, "te": model.pipe.text_encoder}
    touched = {f"{d.component}.{d.path}.weight" for d in deltas}
    assert touched <= set(params) and len(touched) < len(params)
    patcher = WeightPatcher(keep)
    for _ in range(2):  # a second cell applies again over the restored weights
        assert patcher.apply(uses) == len(deltas)
        for d in deltas:
            weight = networks[d.component].get_submodule(d.path).weight
            original = before[f"{d.component}.{d.path}.weight"][1]
            torch.testing.assert_close(weight.float(), original.float() + 0.8 * d.dense, rtol=1e-2, atol=1e-2)
        patcher.restore()
        assert not patcher.active
        _assert_restored(params, before)
    for name, p in params.items():
        shares = p.data.data_ptr() == before[name][0].data_ptr()
        # kept on the device: the very tensors come back; on the host: copies of the touched ones come back
        assert shares == (keep == "device" or name not in touched), name
    assert touched_bytes([attached]) == sum(
        p.nbytes for name, p in params.items()
        if name in touched or (name.endswith(".bias") and name[: -len("bias")] + "weight" in touched)
    )


@pytest.mark.parametrize("keep", ["device", "host"])
@pytest.mark.parametrize("error", [torch.OutOfMemoryError, KeyboardInterrupt])
def test_error_part_way_through_apply_restores_every_weight(tmp_path, model_dirs, monkeypatch, keep, error):
    model, attached, uses, deltas, params = _setup(tmp_path, model_dirs)
    before = _state(params)
    merge = pipeline._merge_layer
    calls = []

    def failing_merge(layer, items):
        calls.append(layer)
        if len(calls) == 3:
            changed = [name for name, p in params.items() if not torch.equal(p.data, before[name][1])]
            assert len(changed) >= 2, "two layers are merged before the failure"
            raise error("out of memory on the third layer")
        return merge(layer, items)

    monkeypatch.setattr(pipeline, "_merge_layer", failing_merge)
    patcher = WeightPatcher(keep)
    with pytest.raises(error):
        patcher.apply(uses)
    assert len(calls) == 3 and not patcher.active
    _assert_restored(params, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("keep", ["device", "host"])
def test_on_cuda_host_keeping_frees_the_originals_and_restores_them_exactly(tmp_path, model_dirs, keep):
    model, attached, uses, deltas, params = _setup(tmp_path, model_dirs, "fp16", "cuda")
    before = _state(params)
    touched = sum(model.components()[d.component].get_submodule(d.path).weight.nbytes for d in deltas)
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    patcher = WeightPatcher(keep)
    patcher.apply(uses)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - allocated
    # kept on the device, every touched weight is there twice; kept on the host, the merged ones replace them
    assert held >= touched if keep == "device" else held < touched // 4, (held, touched)
    patcher.restore()
    _assert_restored(params, before)


def _render_cli(runner, folder, lora, out, *extra):
    args = ["render", "--model", folder, "--lora", lora, "--prompt", "a cat", "--steps", STEPS, "--size",
            f"{SIZE}x{SIZE}", "--device", "cpu", "--grid-x", "style@none|upper|all", "-o", out, "--json", *extra]
    return runner.invoke(main, [str(a) for a in args])


def test_cli_host_renders_the_same_grid_and_says_where_originals_were_kept(tmp_path, model_dirs, runner):
    folder = model_dirs("sd1")
    make_lora(tmp_path / "style.safetensors", load_pipe(folder), "sd1", seed=22, every=2)
    lora = f"style={tmp_path / 'style.safetensors'}"
    auto = _render_cli(runner, folder, lora, tmp_path / "auto.png")
    host = _render_cli(runner, folder, lora, tmp_path / "host.png", "--keep-originals", "host")
    assert auto.exit_code == 0 and host.exit_code == 0, auto.output + host.output
    assert "originals kept on the device" in auto.stdout and "originals kept on the host" in host.stdout
    assert json.loads((tmp_path / "auto.json").read_text())["keep_originals"] == "device"  # the CPU: no copy
    assert json.loads((tmp_path / "host.json").read_text())["keep_originals"] == "host"
    assert json.loads(Image.open(tmp_path / "host.png").text["blora-render"])["keep_originals"] == "host"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "auto.png")), np.asarray(Image.open(tmp_path / "host.png")))


def test_cli_refuses_an_unknown_value(tmp_path, runner):
    result = runner.invoke(main, ["render", "--model", str(tmp_path), "--prompt", "a cat", "--keep-originals", "gpu",
                                  "-o", str(tmp_path / "out.png")])
    errors = [line for line in result.stderr.splitlines() if "Error" in line]
    assert result.exit_code == 2 and len(errors) == 1, result.stderr
    assert "--keep-originals" in errors[0] and "'gpu' is not one of 'auto', 'device', 'host'" in errors[0]
    assert not list(tmp_path.iterdir())


def test_library_refuses_an_unknown_value_before_loading(tmp_path):
    request = RenderRequest(model=tmp_path / "absent", output=tmp_path / "out.png", prompt="a cat", keep_originals="gpu")
    with pytest.raises(BloraError, match="'gpu': use auto, device or host"):
        render(request)
    assert not list(tmp_path.iterdir())
