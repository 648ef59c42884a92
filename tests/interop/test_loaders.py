"""The loader matrix: every file the product writes loads in diffusers, PEFT and LyCORIS with the right effect.

Each cell writes one output on the tiny SD1 or SDXL-shaped models, loads it with a real loader, and checks
the U-Net and text-encoder outputs against the same models with the file's dense ΔW added to their weights
(`interop_helpers.deltas`: the test's own arithmetic). For lossless conversions the reference is the *input*
file's ΔW, so the cell also proves the conversion kept every module's ΔW.

Loaders:
* diffusers — `pipe.load_lora_weights(path)` on a StableDiffusionPipeline / StableDiffusionXLPipeline built
  around tiny models (SDXL: a diffusers U-Net with the tiny SdxlUNet's layout; kohya's LDM names go through
  diffusers' own `_maybe_map_sgm_blocks_to_diffusers`).
* peft — `inject_adapter_in_model(LoraConfig(**metadata))` + `set_peft_model_state_dict`, per component.
* lycoris — lycoris-lora's `create_lycoris_from_weights` per component (LORA_PREFIX set to `lora_unet`,
  `lora_te`, …), then `apply_to()`; SDXL LDM names load into the LDM-named SdxlUNet kohya trains.
"""

from __future__ import annotations

import json
import warnings
from functools import cache
from pathlib import Path

import pytest
import torch
from adapters import make_adapter, metadata_of
from interop_helpers import TinyModels, deltas, diffusers_written_lora, effect_error
from safetensors.torch import load_file
from torch import nn

from blora_tools.adapter.model import open_adapter
from blora_tools.ops.convert import convert
from blora_tools.taxonomy.selectors import resolve_selector

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

TOLERANCE = 1e-4
"""Allowed ‖loader output − reference‖ / ‖reference − base output‖ (float32 round-off is ~1e-6)."""


def uniform_rank_mix(layer):
    return {"linear": 4, "conv1x1": 2, "conv3x3": 3}[layer.kind]


def mixed_alpha(layer):
    return {"linear": 1.0, "conv1x1": 3.0, "conv3x3": 8.0}[layer.kind]


def block_alpha(layer):
    """Attention projections of the outermost down level get another alpha: what diffusers mis-scales."""
    return 8.0 if layer.block in ("IN01", "IN02", "IN04", "IN05") else 2.0


# --- inputs and outputs ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loaders")


@cache
def _source(workdir: Path, arch: str, kind: str, alphas: str, blocks: str = "all", seed: int = 0) -> Path:
    """A kohya input file (cached per session): every layer of the tiny model in `blocks`."""
    alpha = {"one": 2.0, "mixed": mixed_alpha, "block": block_alpha}[alphas]
    rank = 2 if kind == "lokr" else uniform_rank_mix  # LyCORIS keeps a LoKr factor whole at larger ranks
    name = f"src-{arch}-{kind}-{alphas}-{blocks.replace(',', '+')}-{seed}.safetensors"
    # Four layers of each kind per LBW block: every block and layer kind, and a whole attention of each text
    # encoder (diffusers cannot read kohya text-encoder modules without an out_proj among them).
    return make_adapter(workdir / name, arch, kind, blocks=blocks, rank=rank, alpha=alpha, per_block=4, seed=seed)


def _plugin_file(workdir: Path, arch: str) -> Path:
    """A file the kohya plugin's save_weights writes: per-block ranks and alphas, LoCon, text encoder(s)."""
    from kohya_plugin.blockwise import create_network

    models = TinyModels.fresh(arch, "ldm")
    te_arg = models.encoders if arch == "sdxl" else models.encoders[0]
    args = dict(block_ranks="in0=4,out2=2,mid=8", block_alphas="in0=1,out2=8,mid=16", te_alpha="2", conv_dim="2",
                conv_alpha="0.5")
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        network = create_network(1.0, 4, 4.0, None, te_arg, models.unet, **args)
    network.apply_to(te_arg, models.unet, True, True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in network.text_encoder_loras + network.unet_loras:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=gen) * 0.05)
    path = workdir / f"plugin-{arch}.safetensors"
    network.save_weights(path, None, {"ss_output_name": "plugin"})
    return path


def produce(output: str, arch: str, workdir: Path) -> tuple[Path, Path]:
    """Write one product output; returns (output file, file whose ΔW is the reference)."""
    from blora_tools.ops.lowrank import RankPlan
    from blora_tools.ops.merge import Source, merge
    from blora_tools.ops.prune import prune
    from blora_tools.ops.resize import resize
    from blora_tools.ops.reweight import reweight
    from blora_tools.taxonomy.weights import parse_weights

    out = workdir / f"{output}-{arch}.safetensors"
    if out.exists():
        return out, _reference_of[out]
    kind = "locon"
    if output == "save_weights":
        _plugin_file(workdir, arch).replace(out)
        _reference_of[out] = out
        return out, out
    src = _source(workdir, arch, kind, "one")
    reference = out
    if output == "prune":
        result = prune(open_adapter(src), resolve_selector("mid,out1", arch), keep=False)
    elif output == "reweight":
        result = reweight(open_adapter(src), parse_weights("in0=0.5,out1=2,te=0.7").resolve(arch))
    elif output in ("merge-concat", "merge-svd"):
        style = _source(workdir, arch, "lora", "mixed", blocks="in1,te", seed=3)
        sources = [Source(open_adapter(src)), Source(open_adapter(style), ratio=0.8)]
        plan = RankPlan(default=6) if output == "merge-svd" else None
        result = merge(sources, method=output.split("-")[1], plan=plan)
    elif output == "resize":
        result = resize(open_adapter(src), RankPlan(default=2))
    elif output == "convert-peft":
        src = _source(workdir, arch, kind, "mixed")
        result, reference = convert(open_adapter(src), to="peft"), src
    elif output in ("convert-kohya", "convert-kohya-uniform"):
        src = diffusers_written_lora(workdir / f"diffusers-written-{arch}.safetensors", arch)
        result = convert(open_adapter(src), to="kohya", uniform_alpha=output.endswith("uniform"))
        reference = src
    elif output == "convert-uniform":
        src = _source(workdir, arch, kind, "block")
        result, reference = convert(open_adapter(src), to="kohya", uniform_alpha=True), src
    elif output == "convert-names-diffusers":
        src = _source(workdir, arch, kind, "mixed")
        result, reference = convert(open_adapter(src), to="kohya", names="diffusers", uniform_alpha=True), src
    elif output == "convert-names-ldm":
        diffusers_named, src = produce("convert-names-diffusers", arch, workdir)
        result, reference = convert(open_adapter(diffusers_named), to="kohya", names="ldm"), src
    else:
        raise ValueError(output)
    result.save(out)
    _reference_of[out] = reference
    return out, reference


_reference_of: dict[Path, Path] = {}


# --- loaders --------------------------------------------------------------------------------------------


def load_diffusers(path: Path, arch: str) -> TinyModels:
    models = TinyModels.fresh(arch, "diffusers")
    models.pipeline().load_lora_weights(str(path), adapter_name="tested")
    return models


def load_peft(path: Path, arch: str) -> TinyModels:
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    models = TinyModels.fresh(arch, "diffusers")
    config = json.loads(metadata_of(path)["lora_adapter_metadata"])
    state = load_file(str(path))
    targets = {"unet": models.unet, "text_encoder": models.encoders[0]}
    if arch == "sdxl":
        targets["text_encoder_2"] = models.encoders[1]
    loaded = 0
    for component, model in targets.items():
        fields = {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith(component + ".")}
        part = {k[len(component) + 1 :]: v for k, v in state.items() if k.startswith(component + ".")}
        if not part:
            continue
        if not hasattr(model, "text_model") and component != "unet":  # transformers 5's CLIPTextModel
            part = {k.removeprefix("text_model."): v for k, v in part.items()}
        inject_adapter_in_model(LoraConfig(**fields), model)
        result = set_peft_model_state_dict(model, part)
        assert not result.unexpected_keys, result.unexpected_keys[:3]
        loaded += len(part)
    assert loaded == len(state)
    return models


@pytest.fixture(scope="session")
def lycoris_network():
    try:
        from lycoris.wrapper import LycorisNetwork, create_lycoris_from_weights
    except ImportError as err:  # a test-only dependency: pip install lycoris-lora
        pytest.skip(f"lycoris-lora is not installed or does not import ({err}); pip install lycoris-lora")
    return LycorisNetwork, create_lycoris_from_weights


def load_lycoris(path: Path, arch: str, lycoris_network, monkeypatch) -> tuple[TinyModels, int]:
    """LyCORIS on the U-Net kohya trains (SDXL: LDM names) unless the file uses diffusers-style SDXL names."""
    network_cls, create = lycoris_network
    weights = load_file(str(path))
    ldm = any(k.startswith("lora_unet_input_blocks_") for k in weights)
    models = TinyModels.fresh(arch, "ldm" if ldm else "diffusers")
    loaded = 0
    for component, model in models.components.items():
        if component != "unet" and not hasattr(model, "text_model"):
            holder = nn.Module()  # kohya names carry transformers 4's `text_model.` level
            holder.text_model = model
            model = holder
        monkeypatch.setattr(network_cls, "LORA_PREFIX", f"lora_{component}")
        network, _ = create(1.0, str(path), model, weights)
        network.apply_to()
        loaded += len(network.loras)
    return models, loaded


# --- the matrix -------------------------------------------------------------------------------------------

KOHYA_OUTPUTS = ["save_weights", "prune", "reweight", "merge-concat", "merge-svd", "resize", "convert-kohya",
                 "convert-uniform"]
DIFFUSERS_OUTPUTS = [o for o in KOHYA_OUTPUTS if o != "convert-kohya"] + ["convert-kohya-uniform", "convert-peft"]
"""A PEFT file with mixed alphas converted to kohya keeps them; diffusers needs --uniform-alpha for those."""
SDXL_ONLY = ["convert-names-diffusers", "convert-names-ldm"]
CELLS = (
    [(o, a, "diffusers") for o in DIFFUSERS_OUTPUTS for a in ("sd1", "sdxl")]
    + [(o, "sdxl", "diffusers") for o in SDXL_ONLY]
    + [("convert-peft", a, "peft") for a in ("sd1", "sdxl")]
    + [(o, a, "lycoris") for o in KOHYA_OUTPUTS for a in ("sd1", "sdxl")]
    + [(o, "sdxl", "lycoris") for o in SDXL_ONLY]
)


@pytest.mark.parametrize("output, arch, loader", CELLS, ids=["-".join(c) for c in CELLS])
def test_loader_matrix(output, arch, loader, workdir, request, monkeypatch):
    path, reference = produce(output, arch, workdir)
    n_modules = len(open_adapter(path).modules)
    if loader == "diffusers":
        got = load_diffusers(path, arch)
        naming = "diffusers"
    elif loader == "peft":
        got = load_peft(path, arch)
        naming = "diffusers"
    else:
        got, loaded = load_lycoris(path, arch, request.getfixturevalue("lycoris_network"), monkeypatch)
        assert loaded == n_modules, f"LyCORIS loaded {loaded} of {n_modules} modules"
        naming = "ldm" if hasattr(got.unet, "input_blocks") else "diffusers"
    errors = effect_error(got.outputs(), reference_outputs(reference, arch, naming), base_outputs(arch, naming))
    assert max(errors.values()) < TOLERANCE, errors


@cache
def base_outputs(arch: str, naming: str = "diffusers") -> dict[str, torch.Tensor]:
    return TinyModels.fresh(arch, naming).outputs()


@cache
def reference_outputs(reference: Path, arch: str, naming: str = "diffusers") -> dict[str, torch.Tensor]:
    """The models' outputs with the reference file's dense ΔW added to their weights."""
    return TinyModels.fresh(arch, naming).merge(deltas(reference)).outputs()


@pytest.mark.parametrize("kind", ["lora", "locon", "tucker", "loha", "lokr", "dora"])  # full: no alpha to unify
def test_lycoris_loads_uniform_alpha_output_of_every_kind(kind, workdir, lycoris_network, monkeypatch):
    """`convert --uniform-alpha` keeps every kind loadable and ΔW unchanged (DoRA: same output as the input)."""
    src = _source(workdir, "sd1", kind, "block")
    out = workdir / f"uniform-{kind}.safetensors"
    if not out.exists():
        convert(open_adapter(src), to="kohya", uniform_alpha=True).save(out)
    got, loaded = load_lycoris(out, "sd1", lycoris_network, monkeypatch)
    assert loaded == len(open_adapter(out).modules)
    if kind == "dora":  # ΔW ignores the magnitude vector: compare with LyCORIS on the input file instead
        want = load_lycoris(src, "sd1", lycoris_network, monkeypatch)[0].outputs()
    else:
        want = reference_outputs(src, "sd1")
    errors = effect_error(got.outputs(), want, base_outputs("sd1"))
    assert max(errors.values()) < TOLERANCE, errors


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_misscales_mixed_alphas_and_uniform_alpha_repairs_it(arch, workdir):
    """docs/architecture.md §3: diffusers (0.42) gives attention projections the file's most common alpha. If this starts
    failing on the first assertion, diffusers fixed it: update the README's compatibility table."""
    src = _source(workdir, arch, "lora", "block")
    want, base = reference_outputs(src, arch), base_outputs(arch)
    mixed = effect_error(load_diffusers(src, arch).outputs(), want, base)
    assert mixed["unet"] > 1e-2, mixed
    fixed = workdir / f"fixed-{arch}.safetensors"
    convert(open_adapter(src), to="kohya", uniform_alpha=True).save(fixed)
    repaired = effect_error(load_diffusers(fixed, arch).outputs(), want, base)
    assert max(repaired.values()) < TOLERANCE, repaired


# --- every writing command × every input kind ---------------------------------------------------------------

DIFFUSERS_KINDS = ("lora", "locon")
"""Kinds diffusers loads as they are; merge and resize turn every other kind into LoRA factors."""


@cache
def _kind_source(workdir: Path, kind: str) -> Path:
    """An SD1 kohya file of `kind`, LoHa/LoKr/full on linear layers and on 3×3 / 1×1 convolutions (LyCORIS's
    flattened conv form), per-module alphas that differ."""
    from safetensors.torch import save_file

    rank = 2 if kind == "lokr" else 3
    tensors = {}
    for on in ("linear", "conv") if kind in ("loha", "lokr", "full") else ("linear",):
        # four linear layers per block: diffusers reads kohya text-encoder modules only with an out_proj among them
        part = make_adapter(workdir / f"kind-{kind}-{on}.safetensors", "sd1", kind, rank=rank, alpha=mixed_alpha,
                            per_block=4 if on == "linear" else 1, on=on)
        tensors.update(load_file(str(part)))
    path = workdir / f"kind-{kind}.safetensors"
    save_file(tensors, str(path))
    return path


def _kind_output(command: str, kind: str, workdir: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(output file, the dense ΔW it must apply) for one command on one input kind."""
    from adapters import block_of

    from blora_tools.ops.lowrank import RankPlan
    from blora_tools.ops.merge import Source, merge
    from blora_tools.ops.prune import prune
    from blora_tools.ops.resize import resize
    from blora_tools.ops.reweight import reweight
    from blora_tools.taxonomy.weights import parse_weights

    src = _kind_source(workdir, kind)
    adapter = open_adapter(src)
    want = deltas(src)
    if command == "merge-svd":
        result = merge([Source(adapter)], method="svd")  # lossless: every rank kept
    elif command == "resize":
        result = resize(adapter, RankPlan(default=64))
    elif command == "prune":
        result = prune(adapter, resolve_selector("mid", "sd1"), keep=False, uniform_alpha=kind != "full")
        want = {s: d for s, d in want.items() if block_of(s, "sd1") != "M00"}
    elif command == "reweight":
        weights = parse_weights("in0=0.5,out3=2").resolve("sd1")
        result = reweight(adapter, weights, uniform_alpha=kind != "full")
        want = {s: weights[block_of(s, "sd1")] * d for s, d in want.items()}
    elif command == "convert-uniform":
        result = convert(adapter, to="kohya", uniform_alpha=True)
    else:
        result = convert(adapter, to="peft")
    out = workdir / f"{command}-{kind}.safetensors"
    result.save(out, force=True)
    return out, want


KIND_COMMANDS = ["merge-svd", "resize", "prune", "reweight", "convert-uniform", "convert-peft"]
_ALL_KIND_CELLS = (
    [(c, k, "diffusers") for c in ("merge-svd", "resize") for k in ("tucker", "loha", "lokr", "full")]
    + [(c, k, "diffusers") for c in KIND_COMMANDS for k in DIFFUSERS_KINDS]
    + [(c, k, "lycoris") for c in KIND_COMMANDS[:-1] for k in ("lora", "locon", "tucker", "loha", "lokr", "full")
       if not (c == "convert-uniform" and k == "full")]
)
_DEFAULT_KIND_CELLS = {
    *[("merge-svd", k, "diffusers") for k in ("tucker", "loha", "lokr", "full")],
    ("resize", "loha", "diffusers"),
    *[(c, k, "lycoris") for c in ("merge-svd", "prune", "reweight") for k in ("tucker", "loha", "lokr", "full")],
    ("convert-uniform", "loha", "lycoris"),
}
"""The default suite's share (resize is an svd merge; LoRA/LoCon outputs are in test_loader_matrix); the rest
runs with `-m slow`."""
KIND_CELLS = [
    pytest.param(*cell, id="-".join(cell), marks=() if cell in _DEFAULT_KIND_CELLS else pytest.mark.slow)
    for cell in _ALL_KIND_CELLS
]


@pytest.mark.parametrize("command, kind, loader", KIND_CELLS)
def test_every_command_on_every_kind_loads_with_the_expected_delta(command, kind, loader, workdir, request,
                                                                   monkeypatch):
    """SD1, every writing command on every input kind: diffusers (where it takes the kind) and LyCORIS apply
    exactly the ΔW the operation promises (merge/resize: conv-shaped LoRA factors for conv layers)."""
    path, want = _kind_output(command, kind, workdir)
    if loader == "diffusers":
        got = load_diffusers(path, "sd1")
    else:
        got, loaded = load_lycoris(path, "sd1", request.getfixturevalue("lycoris_network"), monkeypatch)
        assert loaded == len(open_adapter(path).modules)
    reference = TinyModels.fresh("sd1").merge(want).outputs()
    errors = effect_error(got.outputs(), reference, base_outputs("sd1"))
    assert max(errors.values()) < TOLERANCE, errors


@pytest.mark.parametrize("command", ["merge-svd", "resize", "convert-peft"])
def test_dora_is_refused_where_it_cannot_be_kept(command, workdir):
    from blora_tools.errors import BloraError

    with pytest.raises(BloraError, match="DoRA|dora"):
        _kind_output(command, "dora", workdir)
