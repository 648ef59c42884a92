"""Every SD-family key dialect is read by every command with the ΔW its producer applies.

Each file comes from `dialect_files`: written by the producer's own code where it is installed (diffusers,
PEFT, LyCORIS), else in the key layout restated from the producer's source. The oracle is the producer's ΔW per
layer — its loader's weight change on fresh tiny models, or for diffusers' training-script output the ΔW of the
PEFT network it saved — never the product's own reading.

Writing commands on a foreign dialect keep the input's key names and tensor bytes (prune, reweight: the output
loads wherever the input loaded, checked with the same loader); commands that compute factors (merge, resize,
convert --to kohya) write kohya names.
"""

from __future__ import annotations

import json
import warnings
from functools import cache
from pathlib import Path

import pytest
import torch
from dialect_files import (
    COMFYUI,
    OMI,
    ONETRAINER_LEGACY,
    Produced,
    as_peft_folder,
    assert_same,
    diffusers_legacy,
    load_diffusers,
    lycoris_wrapped,
    our_deltas,
    peft_saved,
    restated,
    weight_deltas,
)
from interop_helpers import TinyModels, diffusers_written_lora
from safetensors import safe_open

from blora_tools.adapter.formats import diffusers_to_ldm, ldm_to_diffusers
from blora_tools.adapter.model import open_adapter
from blora_tools.cli import main
from blora_tools.errors import BloraError
from blora_tools.ops.compare import compare
from blora_tools.ops.convert import convert
from blora_tools.ops.lowrank import RankPlan
from blora_tools.ops.merge import Source, merge
from blora_tools.ops.prune import prune
from blora_tools.ops.resize import resize
from blora_tools.ops.reweight import reweight
from blora_tools.taxonomy.selectors import resolve_selector
from blora_tools.taxonomy.weights import parse_weights

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

CASES = {
    "diffusers": "diffusers",
    "diffusers-legacy": "diffusers-legacy",
    "diffusers-legacy-no-metadata": "diffusers-legacy",
    "diffusers-legacy-sdxl": "diffusers-legacy",
    "peft-unet": "peft-saved",
    "peft-text-encoder": "peft-saved",
    "peft-rslora": "peft-saved",
    "lycoris": "lycoris",
    "comfyui": "comfyui",
    "omi": "omi",
    "onetrainer-legacy": "kohya",
}
"""case → the dialect `inspect` must name."""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dialects")


@cache
def _tolerance(case: str) -> float:
    """Relative ΔW tolerance of a computed output: the restated files are fp16, as ComfyUI saves."""
    return 2e-3 if case in ("comfyui", "omi", "onetrainer-legacy") else 1e-5


def _produced(workdir: Path, case: str) -> Produced:
    if case == "diffusers":
        path = diffusers_written_lora(workdir / "diffusers-sd1.safetensors", "sd1")
        return Produced("diffusers", "sd1", path, "diffusers", lambda p: load_diffusers(p, "sd1"))
    if case.startswith("diffusers-legacy"):
        return diffusers_legacy(workdir, "sdxl" if case.endswith("sdxl") else "sd1", "no-metadata" not in case)
    if case.startswith("peft"):
        return peft_saved(workdir, rslora=case == "peft-rslora", component="te" if case == "peft-text-encoder" else "unet")
    if case == "lycoris":
        return lycoris_wrapped(workdir, "sd1")
    rule = {"comfyui": COMFYUI, "omi": OMI, "onetrainer-legacy": ONETRAINER_LEGACY}[case]
    return restated(workdir, rule, with_alpha=rule is not COMFYUI)


@cache
def _reference(workdir: Path, case: str):
    return _produced(workdir, case).reference


@cache
def _loaded(workdir: Path, case: str):
    """What the producer's loader makes of the input (for diffusers' training-script files, less than it trained)."""
    p = _produced(workdir, case)
    return p.load(p.path)


COMMAND_CASES = [c for c in CASES if c not in ("diffusers-legacy-no-metadata", "peft-rslora", "diffusers-legacy-sdxl")]
"""The commands run on one file per dialect (the variants differ from their sibling only in the alpha rule or
architecture, which the reading test covers; SDXL's te1 naming is exercised by the ComfyUI and OMI files)."""


def _models(p: Produced) -> TinyModels:
    return TinyModels.fresh(p.arch, p.unet_kind)


def _layer_of(adapter, models: TinyModels) -> dict[str, str]:
    """stem → `component:path` of the layer it adapts in `models`."""
    layers = models.layer_of_stem()
    names = {id(m): f"{c}:{n}" for c, model in models.components.items() for n, m in model.named_modules()}
    return {stem: names[id(layers[stem])] for stem in adapter.modules}


def _written(p: Produced, out: Path, workdir: Path) -> Path:
    """What the producer's loader takes for an output: the file, or for PEFT a folder with the input's config."""
    if p.dialect == "peft-saved":
        return as_peft_folder(out, p.path, workdir / f"{out.stem}-folder")
    return out


# --- reading -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_reading_gives_the_producers_delta(case, workdir):
    p = _produced(workdir, case)
    adapter = open_adapter(p.path)
    assert adapter.dialect.value == CASES[case]
    assert adapter.arch.value == p.arch
    assert_same(our_deltas(adapter, _models(p)), _reference(workdir, case))


@pytest.mark.parametrize("case", list(CASES))
def test_inspect_names_the_dialect(case, workdir, runner):
    p = _produced(workdir, case)
    result = runner.invoke(main, ["inspect", "--json", "--no-stats", str(p.path)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)[0]
    assert report["dialect"] == CASES[case]
    assert report["format"] == ("peft" if CASES[case].startswith(("diffusers", "peft")) else "kohya")
    assert report["modules"] == len(_reference(workdir, case))
    text = runner.invoke(main, ["inspect", "--no-stats", str(p.path)])
    assert text.exit_code == 0
    if CASES[case] not in ("kohya", "diffusers"):
        assert f"({CASES[case]} keys)" in text.stdout


def test_diffusers_drops_the_attention_layers_of_its_own_training_scripts_files(workdir):
    """diffusers 0.42 converts `.lora.down` keys only when the first key is not `lora_A`; the training scripts'
    files mix both, so their attention projections are silently not loaded (A1111/ComfyUI-style loaders and this
    product read them). If this starts failing, diffusers fixed it: the README's dialect table should say so."""
    loaded = _loaded(workdir, "diffusers-legacy")
    trained = _reference(workdir, "diffusers-legacy")
    missing = [k for k in trained if k not in loaded]
    assert missing
    assert all(k.endswith(("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")) for k in missing)


# --- writing commands keep the key names -------------------------------------------------------------------


def _selector_present(adapter, wanted: str) -> str:
    """`wanted`'s groups that hold modules in this file (so every case drops something and keeps something)."""
    groups = {m.group for m in adapter.modules.values()}
    return ",".join(g for g in wanted.split(",") if g in groups)


@pytest.mark.parametrize("case", COMMAND_CASES)
def test_prune_keeps_key_names_and_loads_where_the_input_loaded(case, workdir):
    p = _produced(workdir, case)
    adapter = open_adapter(p.path)
    if len({m.group for m in adapter.modules.values()}) == 1:
        pytest.skip("a file of one block has nothing to prune but everything")
    drop = _selector_present(adapter, "mid,out1,te,te2")
    result = prune(adapter, resolve_selector(drop, p.arch), keep=False, selector=drop)
    out = workdir / f"pruned-{case}.safetensors"
    result.save(out)
    with safe_open(str(adapter.path), "pt") as src, safe_open(str(out), "pt") as dst:
        kept = list(dst.keys())
        assert set(kept) < set(src.keys())
        for key in kept:
            assert torch.equal(dst.get_tensor(key), src.get_tensor(key))
    pruned = open_adapter(out)
    assert pruned.dialect is adapter.dialect
    kept_layers = set(_layer_of(pruned, _models(p)).values())
    assert 0 < len(kept_layers) < len(adapter.modules)
    reference = _reference(workdir, case)
    assert_same(our_deltas(pruned, _models(p)), {k: v for k, v in reference.items() if k in kept_layers})
    loaded_input = _loaded(workdir, case)
    assert_same(p.load(_written(p, out, workdir)), {k: v for k, v in loaded_input.items() if k in kept_layers})


@pytest.mark.parametrize("case", COMMAND_CASES)
def test_reweight_scales_one_factor_under_the_same_names(case, workdir):
    p = _produced(workdir, case)
    adapter = open_adapter(p.path)
    weights = parse_weights("mid=0.5,out1=2,te=0.25,te2=3" if p.arch == "sdxl" else "mid=0.5,out1=2,te=0.25")
    result = reweight(adapter, weights.resolve(p.arch))
    out = workdir / f"reweighted-{case}.safetensors"
    result.save(out)
    with safe_open(str(adapter.path), "pt") as src, safe_open(str(out), "pt") as dst:
        assert set(dst.keys()) == set(src.keys())
    factor = {}
    resolved = weights.resolve(p.arch)
    for stem, layer in _layer_of(adapter, _models(p)).items():
        block = adapter.modules[stem].block
        factor[layer] = 1.0 if block is None else float(resolved[block])
    assert len(set(factor.values())) > 1 or case == "peft-text-encoder"
    expect = {k: factor[k] * v for k, v in _reference(workdir, case).items()}
    assert_same(our_deltas(open_adapter(out), _models(p)), expect, _tolerance(case))
    if case in ("diffusers-legacy", "peft-unet"):  # a loader whose alpha lives outside the tensors
        loaded = _loaded(workdir, case)
        assert_same(p.load(_written(p, out, workdir)), {k: factor[k] * v for k, v in loaded.items()}, _tolerance(case))


# --- computing commands write kohya names ----------------------------------------------------------------


@pytest.mark.parametrize("case", COMMAND_CASES)
def test_merge_resize_convert_and_compare_read_the_dialect(case, workdir):
    p = _produced(workdir, case)
    adapter = open_adapter(p.path)
    reference = _reference(workdir, case)
    models = _models(p)

    merged = workdir / f"merged-{case}.safetensors"
    merge([Source(adapter), Source(adapter, ratio=0.5)], method="concat").save(merged)
    merged_adapter = open_adapter(merged)
    assert merged_adapter.dialect.value == "kohya"
    assert_same(our_deltas(merged_adapter, models), {k: 1.5 * v for k, v in reference.items()}, _tolerance(case))

    resized = workdir / f"resized-{case}.safetensors"
    resize(adapter, RankPlan(default=8)).save(resized)
    assert_same(our_deltas(open_adapter(resized), models), reference, max(1e-4, _tolerance(case)))

    kohya = workdir / f"kohya-{case}.safetensors"
    convert(adapter, to="kohya", names="ldm" if CASES[case] == "kohya" else None).save(kohya)
    kohya_adapter = open_adapter(kohya)
    assert kohya_adapter.dialect.value == "kohya"
    ldm_models = TinyModels.fresh(p.arch, "ldm" if p.arch == "sdxl" else "diffusers")
    assert_same(our_deltas(kohya_adapter, ldm_models), _renamed(reference, p, "ldm"), _tolerance(case))
    if CASES[case] != "diffusers":
        peft = workdir / f"peft-{case}.safetensors"
        convert(adapter, to="peft").save(peft)
        # PEFT output has alpha = rank: each module's scale is folded into lora_B (rounded in an fp16 file)
        assert_same(our_deltas(open_adapter(peft), TinyModels.fresh(p.arch)), _renamed(reference, p), _tolerance(case))

    report = compare(adapter, kohya_adapter)
    cosines = [b["cosine"] for b in report["blocks"].values() if b.get("cosine") is not None]
    assert cosines and min(cosines) > 1 - 1e-6


def _renamed(deltas, p: Produced, naming: str = "diffusers"):
    """Reference keys in another U-Net naming: diffusers (a PEFT output, render's models) or SDXL's LDM (kohya)."""
    if p.arch != "sdxl" or p.unet_kind == naming:
        return deltas
    rename = ldm_to_diffusers if naming == "diffusers" else diffusers_to_ldm
    out = {}
    for key, value in deltas.items():
        component, path = key.split(":", 1)
        out[f"{component}:{rename(path, p.arch) if component == 'unet' else path}"] = value
    return out


@pytest.mark.parametrize("case", COMMAND_CASES)
def test_render_applies_the_dialect_to_the_right_layers(case, workdir):
    from blora_tools.render.pipeline import RenderModel, attach_adapter, merged_weights

    p = _produced(workdir, case)
    adapter = open_adapter(p.path)
    models = TinyModels.fresh(p.arch)
    model = RenderModel.from_pipeline(models.pipeline(), sampler=None)
    attached = attach_adapter(model, "tested", adapter, list(adapter.modules))
    with torch.no_grad():
        for layer, params in merged_weights([(attached, m, 1.0) for m in adapter.modules.values()]):
            layer.weight.copy_(params["weight"])
    assert_same(weight_deltas(TinyModels.fresh(p.arch), models), _renamed(_reference(workdir, case), p))


# --- a PEFT folder ---------------------------------------------------------------------------------------


def test_a_peft_folder_is_an_input_and_its_config_travels_with_the_output(workdir, runner):
    p = _produced(workdir, "peft-unet")
    out = workdir / "cli-pruned.safetensors"
    result = runner.invoke(main, ["prune", str(p.path), "--drop", "mid", "-o", str(out)])
    assert result.exit_code == 0, result.output
    with safe_open(str(out), "pt") as f:
        carried = json.loads(f.metadata()["lora_adapter_metadata"])
    assert carried["lora_alpha"] == 6 and carried["alpha_pattern"]
    alone = workdir / "alone"
    alone.mkdir()
    (alone / "x.safetensors").write_bytes(out.read_bytes())  # no adapter_config.json beside it
    lonely = open_adapter(alone / "x.safetensors")
    assert not lonely.warnings
    assert_same(our_deltas(lonely, _models(p)), our_deltas(open_adapter(out), _models(p)))


def test_a_peft_file_without_its_config_reads_alpha_as_rank_and_says_so(workdir):
    p = _produced(workdir, "peft-unet")
    bare = workdir / "bare"
    bare.mkdir()
    (bare / "adapter_model.safetensors").write_bytes((p.path / "adapter_model.safetensors").read_bytes())
    adapter = open_adapter(bare)
    assert any("adapter_config.json" in w for w in adapter.warnings)
    assert all(m.alpha is None for m in adapter.modules.values())


# --- DoRA --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_dora(workdir) -> Produced:
    return peft_saved(workdir, dora=True)


def test_peft_dora_converts_to_kohya_dora_scale_with_the_same_effect(peft_dora, workdir):
    """PEFT's magnitude vector and LyCORIS's `dora_scale` hold the same per-output-row values; converted, the
    file merges in LyCORIS to PEFT's own merged weights (up to LyCORIS's ε in the norm)."""
    from lycoris import create_lycoris_from_weights

    adapter = open_adapter(peft_dora.path)
    assert all(m.dora for m in adapter.modules.values())
    out = workdir / "dora-kohya.safetensors"
    convert(adapter, to="kohya").save(out)
    with safe_open(str(out), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys() if k.endswith("dora_scale")}
    assert shapes and all(s[0] > 1 and all(d == 1 for d in s[1:]) for s in shapes.values())
    models = TinyModels.fresh("sd1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from lycoris import LycorisNetwork

        prefix = LycorisNetwork.LORA_PREFIX
        LycorisNetwork.LORA_PREFIX = "lora_unet"
        try:
            network, _ = create_lycoris_from_weights(1.0, str(out), models.unet)
        finally:
            LycorisNetwork.LORA_PREFIX = prefix
        network.merge_to()
    got = weight_deltas(TinyModels.fresh("sd1"), models)
    assert_same(got, peft_dora.load(peft_dora.path), tol=1e-4)


def test_dora_reweight_other_than_0_or_1_is_refused_and_prune_keeps_magnitudes(peft_dora, workdir):
    adapter = open_adapter(peft_dora.path)
    with pytest.raises(BloraError, match="DoRA"):
        reweight(adapter, parse_weights("mid=0.5").resolve("sd1"))
    out = workdir / "dora-pruned.safetensors"
    prune(adapter, resolve_selector("mid", "sd1"), keep=False).save(out)
    folder = as_peft_folder(out, peft_dora.path, workdir / "dora-pruned-folder")
    kept = set(_layer_of(open_adapter(out), TinyModels.fresh("sd1")).values())
    want = {k: v for k, v in peft_dora.load(peft_dora.path).items() if k in kept}
    assert_same(peft_dora.load(folder), want)


# --- bad inputs (issue #12) ---------------------------------------------------------------------------------


def _with_metadata(workdir: Path, name: str, doc) -> Path:
    from safetensors.torch import load_file, save_file

    p = _produced(workdir, "diffusers")
    path = workdir / f"bad-{name}.safetensors"
    save_file(load_file(str(p.path)), str(path), {"lora_adapter_metadata": doc if isinstance(doc, str) else json.dumps(doc)})
    return path


BAD_CONFIGS = {
    "nan-alpha": ('{"unet.r": 4, "unet.lora_alpha": NaN}', "NaN is not JSON"),
    "infinite-alpha": ('{"unet.r": 4, "unet.lora_alpha": Infinity}', "Infinity is not JSON"),
    "nan-pattern": ('{"unet.r": 4, "unet.lora_alpha": 4, "unet.alpha_pattern": {"proj_in": NaN}}', "NaN is not JSON"),
    "list-alpha-pattern": ({"unet.r": 4, "unet.lora_alpha": 4, "unet.alpha_pattern": ["proj_in", 2]}, "alpha_pattern must be an object"),
    "string-rank-pattern": ({"unet.r": 4, "unet.lora_alpha": 4, "unet.rank_pattern": "proj_in=2"}, "rank_pattern must be an object"),
    "string-alpha": ({"unet.r": 4, "unet.lora_alpha": "4"}, "expected a number"),
    "list-config": ("[1, 2]", "must be a JSON object"),
    "not-json": ("{unet.r: 4", "not valid JSON"),
    "bad-pattern": ({"unet.lora_alpha": 4, "unet.alpha_pattern": {"proj_in(": 2}}, "not a valid pattern"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_malformed_peft_config_is_a_one_line_error(name, workdir, runner):
    doc, message = BAD_CONFIGS[name]
    path = _with_metadata(workdir, name, doc)
    result = runner.invoke(main, ["inspect", "--no-stats", str(path)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and path.name in lines[0] and message in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_mixing_kohya_and_peft_keys_is_an_error_naming_both(workdir):
    """The old check could never fire: such a file read as kohya and the PEFT module's alpha was ignored."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(_produced(workdir, "diffusers").path))
    kohya = load_file(str(_produced(workdir, "onetrainer-legacy").path))
    mixed = workdir / "mixed.safetensors"
    save_file({**tensors, **dict(list(kohya.items())[:3])}, str(mixed))
    with pytest.raises(BloraError, match=r"mixes (kohya|diffusers) keys .* and (kohya|diffusers) keys"):
        open_adapter(mixed)


def test_lycoris_keys_beside_kohya_keys_are_refused(workdir):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(_produced(workdir, "lycoris").path))
    kohya = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32, 1, 1),
             "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 2, 1, 1)}
    mixed = workdir / "mixed-lycoris.safetensors"
    save_file({**tensors, **kohya}, str(mixed))
    with pytest.raises(BloraError, match="mixes"):
        open_adapter(mixed)


def test_alpha_pattern_follows_peft_first_match_rule(workdir):
    """PEFT takes the first pattern whose regex matches the end of the module path (`get_pattern_key`)."""
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    patterns = {r"attentions\.0\.proj_in": 3, "proj_in": 5}
    path = _with_metadata(workdir, "pattern-order", {"unet.r": 4, "unet.lora_alpha": 4, "unet.alpha_pattern": patterns})
    adapter = open_adapter(path)
    checked = 0
    for module in adapter.modules.values():
        if module.path and module.path.endswith("proj_in"):
            want = patterns.get(get_pattern_key(list(patterns), module.path), 4)
            assert module.alpha == want, module.path
            checked += 1
    assert checked and LoraConfig is not None


@pytest.mark.parametrize("case", ["comfyui", "lycoris"])
def test_uniform_alpha_on_a_foreign_dialect_writes_alphas_in_its_own_spelling(case, workdir):
    """`prune --uniform-alpha` adds alpha tensors: named like the file's other keys (`diffusion_model.x.alpha`,
    `lycoris_x.alpha`), never with kohya stems, which would make the output a mix of dialects."""
    p = _produced(workdir, case)
    adapter = open_adapter(p.path)
    drop = _selector_present(adapter, "mid,out1")
    out = workdir / f"uniform-{case}.safetensors"
    prune(adapter, resolve_selector(drop, p.arch), keep=False, uniform_alpha=True).save(out)
    written = open_adapter(out)
    assert written.dialect is adapter.dialect
    assert len({m.alpha for m in written.modules.values()}) == 1
    kept_layers = set(_layer_of(written, _models(p)).values())
    want = {k: v for k, v in _reference(workdir, case).items() if k in kept_layers}
    assert_same(our_deltas(written, _models(p)), want, _tolerance(case))
