"""The render plan without a model: --lora and axis syntax, cells, selections, the labelled image."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from blora_tools.errors import BloraError, SelectorError
from blora_tools.render.args import OFF, Axis, AxisKind, LoraArg
from blora_tools.render.draw import draw_grid
from blora_tools.render.plan import CellSettings, LoraUse, plan_grid, select_modules


@pytest.mark.parametrize(
    "text, name, path, weight, selector",
    [
        ("style.safetensors", "style", "style.safetensors", 1.0, "all"),
        ("dir/style.safetensors:0.5", "style", "dir/style.safetensors", 0.5, "all"),
        ("s=dir/v3.safetensors:-1e-1@upper", "s", "dir/v3.safetensors", -0.1, "upper"),
        ("char.safetensors:1@NOT te", "char", "char.safetensors", 1.0, "NOT te"),
        ("x@2.safetensors", "x_2", "x@2.safetensors", 1.0, "all"),
        ("my lora [v2].safetensors:.8", "my_lora__v2_", "my lora [v2].safetensors", 0.8, "all"),
    ],
    ids=["plain", "weight", "name-weight-selector", "selector-with-space", "at-in-filename", "odd-name"],
)
def test_lora_arg_syntax(text, name, path, weight, selector):
    arg = LoraArg.from_text(text)
    assert (arg.name, arg.path, arg.weight, arg.selector) == (name, Path(path), weight, selector)


@pytest.mark.parametrize("text", ["", "style.safetensors@nonsense", ":0.5", "s=:1"], ids=["empty", "bad-selector", "no-file", "name-no-file"])
def test_lora_arg_rejects(text):
    with pytest.raises(SelectorError):
        LoraArg.from_text(text)


@pytest.mark.parametrize(
    "text, kind, target, values",
    [
        ("style@upper|middle|bottom|all", AxisKind.BLOCKS, "style", ("upper", "middle", "bottom", "all")),
        ("blocks:style@none|in0,out3", AxisKind.BLOCKS, "style", (OFF, "in0,out3")),
        ("weight:style@0,0.5,1", AxisKind.WEIGHT, "style", (0.0, 0.5, 1.0)),
        ("seed:1,2,3", AxisKind.SEED, None, (1, 2, 3)),
        ("prompt:a cat|a dog, oil", AxisKind.PROMPT, None, ("a cat", "a dog, oil")),
        ("cfg:5|7.5", AxisKind.CFG, None, (5.0, 7.5)),
        ("lora:none|a|b", AxisKind.ADAPTER, None, (OFF, "a", "b")),
        ("steps:10,20", AxisKind.STEPS, None, (10, 20)),
    ],
    ids=["blocks", "blocks-prefixed", "weight", "seed", "prompt", "cfg", "lora", "steps"],
)
def test_axis_syntax(text, kind, target, values):
    axis = Axis.from_text(text)
    assert (axis.kind, axis.target, axis.values) == (kind, target, values)


@pytest.mark.parametrize(
    "text, message",
    [
        ("upper|all", "expected one of"),
        ("weight:0,1", "name the adapter"),
        ("seed:1,x", "not an integer"),
        ("seed:1,1", "repeated"),
        ("style@upper||all", "empty value"),
        ("style@upper|nonsense", "unknown block"),
        ("steps:0", "at least 1"),
    ],
)
def test_axis_rejects(text, message):
    with pytest.raises(SelectorError, match=message):
        Axis.from_text(text)


def _base(*loras):
    return CellSettings("a cat", "", 1, 2, 7.0, tuple(LoraUse(n, 1.0, "all") for n in loras))


def test_plan_is_row_major_with_labels_and_settings():
    plan = plan_grid(_base("style"), Axis.from_text("style@none|upper"), Axis.from_text("seed:5,6,7"))
    assert (plan.columns, plan.rows, len(plan.cells)) == (2, 3, 6)
    assert [(c.col, c.row) for c in plan.cells[:3]] == [(0, 0), (1, 0), (0, 1)]
    cell = plan.cells[3]
    assert (cell.x_label, cell.y_label, cell.settings.seed) == ("upper", "6", 6)
    assert cell.settings.loras == (LoraUse("style", 1.0, "upper"),)
    assert plan.cells[0].settings.adapter_state == ()  # 'none' = off
    # run order groups cells by adapter state: all 'none' cells, then all 'upper' cells
    assert [c.x_label for c in plan.run_order()] == ["none"] * 3 + ["upper"] * 3


def test_lora_axis_switches_one_adapter_of_the_list_on():
    base = CellSettings("a cat", "", 1, 2, 7.0, (LoraUse("a", 1.0, "all"), LoraUse("b", 0.5, "upper"), LoraUse("c", 1.0, "all")))
    plan = plan_grid(base, Axis.from_text("lora:none|a|b"))
    states = [tuple(u.name for u in cell.settings.adapter_state) for cell in plan.cells]
    assert states == [("c",), ("a", "c"), ("b", "c")]  # c is not on the axis: always on
    assert plan.cells[2].settings.adapter_state[0] == LoraUse("b", 0.5, "upper")
    assert plan.x.title == "adapter" and [c.x_label for c in plan.cells] == ["none", "a", "b"]
    with pytest.raises(BloraError, match="no adapter named 'd'"):
        plan_grid(base, Axis.from_text("lora:a|d"))


def test_plan_refuses_unknown_adapter_and_same_axis_twice():
    with pytest.raises(BloraError, match="no adapter named 'style'.*adapters: char"):
        plan_grid(_base("char"), Axis.from_text("style@upper|all"))
    with pytest.raises(BloraError, match="both vary"):
        plan_grid(_base(), Axis.from_text("seed:1,2"), Axis.from_text("seed:3,4"))


class _FakeModule:
    def __init__(self, block):
        self.block = block
        self.placement = SimpleNamespace(block=block, layer=None)


class _FakeAdapter:
    path = Path("style.safetensors")

    def __init__(self, blocks):
        self.modules = {f"m{i}": _FakeModule(b) for i, b in enumerate(blocks)}


def test_selector_naming_only_empty_blocks_is_an_error_naming_them():
    adapter = _FakeAdapter(["IN01", "OUT09", "te"])
    with pytest.raises(SelectorError, match=r"blocks 'out0' \(out0\) hold none of adapter 'style'.*modules in te,IN01,OUT09"):
        select_modules("style", adapter, "out0", "sd1")
    picked = select_modules("style", adapter, "upper", "sd1")
    assert picked.stems == ("m0", "m1") and picked.empty_groups == ()
    partly = select_modules("style", adapter, "in0,in3", "sd1")
    assert partly.stems == ("m0",) and partly.empty_groups == ("in3",)
    assert select_modules("style", adapter, OFF, "sd1").stems == ()


def test_draw_grid_size_and_boxes():
    from PIL import Image

    plan = plan_grid(_base("style"), Axis.from_text("style@none|upper|IN04-OUT05,te"),
                     Axis.from_text("prompt:a cat|a dog in a long prompt that wraps"))
    images = [Image.new("RGB", (64, 48), (i * 40, 0, 0)) for i in range(len(plan.cells))]
    grid, layout = draw_grid(plan, images)
    assert grid.size == (layout.width, layout.height)
    assert len(layout.boxes) == 6
    for (x0, y0, x1, y1), image in zip(layout.boxes, images):
        assert (x1 - x0, y1 - y0) == (64, 48)
        assert grid.crop((x0, y0, x1, y1)).tobytes() == image.tobytes()
    boxes = layout.boxes
    assert boxes[0][0] > 0 and boxes[0][1] > 0  # room for labels on the left and top
    assert len({b for b in boxes}) == 6 and max(b[2] for b in boxes) <= layout.width


def test_single_cell_is_the_image_itself():
    from PIL import Image

    plan = plan_grid(_base())
    image = Image.new("RGB", (40, 24), "red")
    grid, layout = draw_grid(plan, [image])
    assert grid is image and layout.boxes == [(0, 0, 40, 24)]
