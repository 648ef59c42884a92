"""`render` on tiny SD1 / SD2 / SDXL pipelines: exact ΔW, bit-identical base weights and images, grids, errors.

Oracles: the pipeline called directly (base images), the same pipeline with the dense ΔW added by hand from
the factors (adapter images), and a snapshot of the state dict (restoration).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from blora_tools.adapter.model import open_adapter
from blora_tools.cli import main
from blora_tools.render.args import Axis
from blora_tools.render.plan import CellSettings, LoraUse, plan_grid, resolve_plan
from blora_tools.render.pipeline import WeightPatcher, attach_adapter, load_model, render_plan

from render_fixtures import (  # noqa: F401 - model_dirs is a fixture
    SIZE,
    STEPS,
    load_pipe,
    make_lora,
    merge_by_hand,
    model_dirs,
    reference_image,
    targets,
)

PROMPT = "a cat"


def _render(model, adapters: dict, base: CellSettings, x=None, y=None, on_step=None):
    """Library route: plan, resolve, attach, render (what the CLI does)."""
    plan = plan_grid(base, x, y)
    opened = {name: open_adapter(path) for name, path in adapters.items()}
    selections, warnings = resolve_plan(plan, opened)
    stems: dict[str, set] = {n: set() for n in opened}
    for (name, _), s in selections.items():
        stems[name] |= set(s.stems)
    attached = {n: attach_adapter(model, n, a, sorted(stems[n])) for n, a in opened.items()}
    return plan, render_plan(model, plan, attached, selections, (SIZE, SIZE), on_step=on_step), warnings


def _settings(*uses, seed=3):
    return CellSettings(PROMPT, "", seed, STEPS, 7.0, tuple(uses))


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_adapter_equals_hand_merged_pipeline_and_weight_zero_equals_base(tmp_path, model_dirs, arch):
    folder = model_dirs(arch)
    reference = load_pipe(folder)
    deltas = make_lora(tmp_path / "style.safetensors", reference, arch, conv=True, seed=1)
    model = load_model(folder, device="cpu")
    assert model.arch.value == arch

    plan, images, _ = _render(model, {"style": tmp_path / "style.safetensors"},
                              _settings(LoraUse("style", 1.0, "all")), Axis.from_text("weight:style@0,0.7"))
    base = reference_image(reference, PROMPT, seed=3)
    assert np.array_equal(images[0], base), "weight 0 must render the base model bit for bit"

    merge_by_hand(reference, deltas, 0.7)
    expected = reference_image(reference, PROMPT, seed=3)
    assert np.abs(images[1] - base).max() > 1e-2, "the adapter must change the image"
    np.testing.assert_allclose(images[1], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kind, fmt",
    [("locon", "kohya"), ("tucker", "kohya"), ("loha", "kohya"), ("lokr", "kohya"), ("full", "kohya"), ("lora", "peft")],
    ids=["locon", "tucker", "loha", "lokr", "full", "peft-lora"],
)
def test_every_kind_and_format_matches_the_dense_oracle(tmp_path, model_dirs, kind, fmt):
    from adapters import dense_deltas, make_adapter

    folder = model_dirs("sd1")
    reference = load_pipe(folder)
    path = make_adapter(tmp_path / "a.safetensors", "sd1", kind, fmt=fmt, seed=11, per_block=None)
    model = load_model(folder, device="cpu")
    _, images, _ = _render(model, {"a": path}, _settings(LoraUse("a", 0.6, "all")))
    layers = {stem: layer for stem, _, _, layer in targets(reference, "sd1", conv=True)}
    with torch.no_grad():
        for stem, dense in dense_deltas(path, 0.6).items():
            layers[stem].weight += dense.reshape(layers[stem].weight.shape).float()
    expected = reference_image(reference, PROMPT, seed=3)
    assert np.abs(expected - reference_image(load_pipe(folder), PROMPT, seed=3)).max() > 1e-3
    np.testing.assert_allclose(images[0], expected, rtol=0, atol=1e-5)


def test_upper_blocks_only_touch_upper_layers(tmp_path, model_dirs):
    folder = model_dirs("sd1")
    reference = load_pipe(folder)
    deltas = make_lora(tmp_path / "style.safetensors", reference, "sd1", seed=2)
    model = load_model(folder, device="cpu")
    _, images, _ = _render(model, {"style": tmp_path / "style.safetensors"}, _settings(LoraUse("style", 1.0, "upper")))
    upper = [d for d in deltas if d.path.startswith(("down_blocks.0.", "up_blocks.3."))]
    assert 0 < len(upper) < len(deltas)
    merge_by_hand(reference, upper, 1.0)
    np.testing.assert_allclose(images[0], reference_image(reference, PROMPT, seed=3), rtol=0, atol=1e-5)


def _snapshot(model):
    return {name: {k: v.detach().clone() for k, v in net.state_dict().items()} for name, net in model.components().items()}


def _assert_same(model, snapshot):
    for name, net in model.components().items():
        for key, value in net.state_dict().items():
            assert torch.equal(value, snapshot[name][key]), f"{name}.{key} changed"
            assert value.dtype == snapshot[name][key].dtype


def test_cells_apply_and_remove_adapters_leaving_base_weights_bit_identical(tmp_path, model_dirs):
    folder = model_dirs("sd1")
    reference = load_pipe(folder)
    make_lora(tmp_path / "char.safetensors", reference, "sd1", conv=True, seed=3)
    make_lora(tmp_path / "style.safetensors", reference, "sd1", seed=4, every=2)  # overlaps char's layers
    model = load_model(folder, device="cpu")
    before = _snapshot(model)
    base = _settings(LoraUse("char", 1.0, "all"), LoraUse("style", 0.8, "all"))
    steps = []
    plan, images, _ = _render(model, {"char": tmp_path / "char.safetensors", "style": tmp_path / "style.safetensors"},
                              base, Axis.from_text("style@none|upper|all"), Axis.from_text("weight:char@0,1"),
                              on_step=lambda: steps.append(1))
    assert len(images) == 6 and len(steps) == 6 * STEPS  # the progress callback fires once per step
    _assert_same(model, before)
    # the first cell has both adapters off: exactly the base image
    assert np.array_equal(images[0], reference_image(reference, PROMPT, seed=3))


def _cli(runner, *args):
    """Run the CLI; renders go to the CPU (float32) unless a test names a device, so that images compare bit
    for bit with the CPU references also on a machine with a GPU."""
    args = [str(a) for a in args]
    if args[0] == "render" and "--device" not in args:
        args += ["--device", "cpu"]
    return runner.invoke(main, args)


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_cli_grid_cells_size_labels_and_json_map(tmp_path, model_dirs, runner):
    folder = model_dirs("sd1")
    make_lora(tmp_path / "style.safetensors", load_pipe(folder), "sd1", seed=6)
    out = tmp_path / "grid.png"
    result = _cli(runner, "render", "--model", folder, "--lora", f"s={tmp_path / 'style.safetensors'}", "--prompt", PROMPT,
                  "--steps", STEPS, "--size", f"{SIZE}x{SIZE}", "--grid-x", "s@none|upper|all", "--grid-y", "seed:1,2",
                  "-o", out, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "grid.json").read_text())
    grid = Image.open(out)
    assert grid.size == (doc["image"]["width"], doc["image"]["height"])
    assert json.loads(grid.text["blora-render"])["cells"] == doc["cells"]
    assert (doc["columns"], doc["rows"], len(doc["cells"])) == (3, 2, 6)
    assert doc["x"]["title"] == "s: blocks" and doc["x"]["labels"] == ["none", "upper", "all"]
    assert doc["y"]["title"] == "seed" and doc["y"]["labels"] == ["1", "2"]
    assert [(c["x_label"], c["y_label"]) for c in doc["cells"]] == [
        (x, y) for y in ("1", "2") for x in ("none", "upper", "all")
    ]
    cell = doc["cells"][4]
    assert cell["settings"]["seed"] == 2 and cell["settings"]["loras"] == [{"name": "s", "weight": 1.0, "blocks": "upper"}]
    selections = {s["blocks"]: s for s in doc["selections"]}
    assert selections["upper"]["resolved"] == "in0,out3" and 0 < selections["upper"]["modules"] < selections["all"]["modules"]

    # the 'none' cell of seed 2 is the base model's image, as `render` without adapters draws it
    single = tmp_path / "base.png"
    result = _cli(runner, "render", "--model", folder, "--prompt", PROMPT, "--steps", STEPS, "--seed", 2,
                  "--size", f"{SIZE}x{SIZE}", "-o", single)
    assert result.exit_code == 0, result.output
    x0, y0, x1, y1 = doc["cells"][3]["box"]
    assert np.array_equal(_png(out)[y0:y1, x0:x1], _png(single))
    assert not np.array_equal(_png(out)[y0:y1, x0 + SIZE + 1 : x1 + SIZE + 1], _png(single))
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".png", ".json", ".tmp")) == ["base.png", "grid.json", "grid.png"]


def test_cli_weight_zero_png_equals_no_adapter(tmp_path, model_dirs, runner):
    folder = model_dirs("sd2")
    make_lora(tmp_path / "style.safetensors", load_pipe(folder), "sd2", seed=7)
    common = ["--model", folder, "--prompt", PROMPT, "--steps", STEPS, "--size", f"{SIZE}x{SIZE}"]
    assert _cli(runner, "render", *common, "-o", tmp_path / "a.png").exit_code == 0
    assert _cli(runner, "render", *common, "--lora", f"{tmp_path / 'style.safetensors'}:0", "-o", tmp_path / "b.png").exit_code == 0
    assert _cli(runner, "render", *common, "--lora", f"{tmp_path / 'style.safetensors'}:1", "-o", tmp_path / "c.png").exit_code == 0
    assert np.array_equal(_png(tmp_path / "a.png"), _png(tmp_path / "b.png"))
    assert not np.array_equal(_png(tmp_path / "a.png"), _png(tmp_path / "c.png"))


def _assert_clean_error(result, tmp_path, *needles):
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


def test_cli_missing_model(tmp_path, runner):
    result = _cli(runner, "render", "--model", tmp_path / "nowhere", "--prompt", PROMPT, "-o", tmp_path / "out.png")
    _assert_clean_error(result, tmp_path, "nowhere", "model not found")


def test_cli_single_file_without_config_says_how_to_give_one(tmp_path, runner):
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "ckpt.safetensors")
    result = _cli(runner, "render", "--model", tmp_path / "ckpt.safetensors", "--prompt", PROMPT, "--device", "cpu",
                  "-o", tmp_path / "out.png")
    _assert_clean_error(result, tmp_path, "ckpt.safetensors", "--config")


def test_cli_adapter_of_another_architecture(tmp_path, model_dirs, runner):
    make_lora(tmp_path / "xl.safetensors", load_pipe(model_dirs("sdxl")), "sdxl", seed=8, every=4)
    result = _cli(runner, "render", "--model", model_dirs("sd1"), "--lora", tmp_path / "xl.safetensors",
                  "--prompt", PROMPT, "--steps", STEPS, "--size", f"{SIZE}x{SIZE}", "-o", tmp_path / "out.png")
    _assert_clean_error(result, tmp_path, "xl.safetensors", "sdxl adapter but the model is sd1")


@pytest.mark.parametrize("how", ["--lora", "--grid-x"])
def test_cli_selector_naming_only_empty_blocks(tmp_path, model_dirs, runner, how):
    # attention-only SD1 LoRA: in3 and out0 have no attention layers, hence no modules
    make_lora(tmp_path / "style.safetensors", load_pipe(model_dirs("sd1")), "sd1", seed=9, every=3)
    lora = str(tmp_path / "style.safetensors")
    extra = ["--lora", f"{lora}@in3,out0"] if how == "--lora" else ["--lora", lora, "--grid-x", "style@upper|in3,out0"]
    result = _cli(runner, "render", "--model", model_dirs("sd1"), *extra, "--prompt", PROMPT, "--steps", STEPS,
                  "--size", f"{SIZE}x{SIZE}", "-o", tmp_path / "out.png", "--json")
    _assert_clean_error(result, tmp_path, "style.safetensors", "'in3,out0'", "in3,out0", "hold none")


def test_cli_syntax_errors_exit_2(tmp_path, runner):
    result = _cli(runner, "render", "--model", tmp_path, "--prompt", PROMPT, "--grid-x", "upper|all", "-o", tmp_path / "out.png")
    assert result.exit_code == 2 and "expected one of" in result.stderr
    result = _cli(runner, "render", "--model", tmp_path, "--prompt", PROMPT, "--size", "30x30", "-o", tmp_path / "out.png")
    assert result.exit_code == 2 and "multiples of 8" in result.stderr


def test_cli_refuses_existing_output_and_dry_run_loads_nothing(tmp_path, model_dirs, runner):
    make_lora(tmp_path / "style.safetensors", load_pipe(model_dirs("sd1")), "sd1", seed=10, every=3)
    (tmp_path / "out.png").write_bytes(b"keep")
    result = _cli(runner, "render", "--model", model_dirs("sd1"), "--prompt", PROMPT, "-o", tmp_path / "out.png")
    assert result.exit_code == 1 and "--force" in result.stderr
    assert (tmp_path / "out.png").read_bytes() == b"keep"
    result = _cli(runner, "render", "--model", tmp_path / "absent", "--lora", tmp_path / "style.safetensors",
                  "--prompt", PROMPT, "--grid-x", "style@none|upper|middle|bottom|all", "--dry-run", "-o", tmp_path / "new.png")
    assert result.exit_code == 0, result.output
    assert "in0,out3" in result.stdout and "in1,out2" in result.stdout and "5 cell(s)" in result.stdout
    assert not (tmp_path / "new.png").exists()


def _half_precision_check(tmp_path, model_dirs, arch, dtype, device):
    """Apply + restore on a half-precision model: merged weights are cast(float32(W) + ΔW) to within one rounding
    step, the base weights come back bit for bit, and the 'none' cells render the base model's image."""
    folder = model_dirs(arch)
    reference = load_pipe(folder)
    deltas = make_lora(tmp_path / "style.safetensors", reference, arch, conv=True, seed=12, std=0.3)
    model = load_model(folder, device=device, dtype=dtype)
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert model.pipe.unet.dtype == torch_dtype
    before = _snapshot(model)

    adapter = open_adapter(tmp_path / "style.safetensors")
    attached = attach_adapter(model, "style", adapter, list(adapter.modules))
    patcher = WeightPatcher()
    patcher.apply([(attached, m, 0.8) for m in adapter.modules.values()])
    networks = {"unet": model.pipe.unet, "te": model.pipe.text_encoder, "te1": model.pipe.text_encoder,
                "te2": getattr(model.pipe, "text_encoder_2", None)}
    step = torch.finfo(torch_dtype).eps
    for d in deltas:
        layer = networks[d.component].get_submodule(d.path)
        original = before[d.component][d.path + ".weight"].float()
        expected = original + 0.8 * d.dense.to(original.device)
        assert layer.weight.dtype == torch_dtype
        torch.testing.assert_close(layer.weight.float(), expected, rtol=step, atol=step * expected.abs().max().item())
    patcher.restore()
    _assert_same(model, before)

    _, images, _ = _render(model, {"style": tmp_path / "style.safetensors"}, _settings(LoraUse("style", 1.0, "all")),
                           Axis.from_text("style@none|all|upper"), Axis.from_text("seed:3,4"))
    _assert_same(model, before)
    _, again, _ = _render(model, {}, _settings())
    assert np.array_equal(images[0], again[0]), "the 'none' cell is the base model's image"
    assert all(np.isfinite(i).all() for i in images) and not np.array_equal(images[0], images[1])


@pytest.mark.parametrize("arch, dtype", [("sd1", "fp16"), ("sdxl", "bf16")])
def test_half_precision_merge_and_restore_on_cpu(tmp_path, model_dirs, arch, dtype):
    _half_precision_check(tmp_path, model_dirs, arch, dtype, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch, dtype", [("sd1", "fp16"), ("sd1", "bf16"), ("sdxl", "fp16")])
def test_half_precision_merge_and_restore_on_gpu(tmp_path, model_dirs, arch, dtype):
    _half_precision_check(tmp_path, model_dirs, arch, dtype, "cuda")
