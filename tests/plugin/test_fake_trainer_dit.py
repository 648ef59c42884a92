"""Flux.1 and SD3 through the fake trainer's replay of flux_train_network.py / sd3_train_network.py.

The sd-scripts-shaped fixtures (tests/dit_models.py) are checked here to train, and to carry the kohya module names
of the golden lora_flux / lora_sd3 manifests; the opt-in tests/real/test_dit_sd_scripts.py also runs kohya's own
modules on them through the fake trainer. The plugin tests are written and
ready, and skip with the plugin's own refusal while kohya_plugin.blockwise does not build a network for the arch.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dit_models import transformer
from fake_trainer import TrainerArgs, loss_of, predict, synthetic_batch, text_encoder_arg, tiny_models, train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ARCHS = ("flux", "sd3")
SMALL = {"flux": {"double_blocks": 2, "single_blocks": 4}, "sd3": {}}
"""Fixture sizes for the default suite: every kind of block, a few of each."""
TEXT_ENCODERS = {"flux": 2, "sd3": 3}


def _models(arch: str):
    return tiny_models(arch, **SMALL[arch])


@pytest.mark.parametrize("arch", ARCHS)
def test_fixture_trains_and_every_layer_gets_a_gradient(arch):
    """A loss falls when the fixture's own weights train, and every Linear/Conv2d (a LoRA target) gets a
    gradient: a LoRA on any layer of the fixture can learn."""
    tes, model = _models(arch)
    batch = synthetic_batch(arch)
    assert predict(arch, tes, model, batch).shape == batch["noise"].shape
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(8):
        loss = loss_of(arch, tes, model, batch)
        loss.backward()
        if step == 0:
            silent = [name for name, layer in model.named_modules() if isinstance(layer, (nn.Linear, nn.Conv2d))
                      and (layer.weight.grad is None or not layer.weight.grad.abs().max() > 0)]
            assert silent == []
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0], losses


def _kohya_names(model: nn.Module, block_classes: tuple[str, ...], outside: tuple[str, ...]) -> dict[str, str]:
    """kohya's lora_flux / lora_sd3 selection restated (sd-scripts 48d368f `LoRANetwork.create_modules`): every
    Linear/Conv2d inside a module whose class name is one of `block_classes`, plus the ones whose kohya name contains
    one of the `outside` filters (in_dims / emb_dims); name = "lora_unet_" + path with "." -> "_"."""
    found = {}
    for path, parent in model.named_modules():
        for child_path, layer in parent.named_modules():
            name = "lora_unet_" + f"{path}.{child_path}".strip(".").replace(".", "_")
            inside = type(parent).__name__ in block_classes
            if type(layer).__name__ in ("Linear", "Conv2d") and (inside or (not path and any(f in name for f in outside))):
                found[name] = "linear" if isinstance(layer, nn.Linear) else "conv"
    return found


@pytest.mark.parametrize(("arch", "manifest", "size", "blocks", "outside"), [
    ("flux", "flux_dev_in_dims", {}, ("DoubleStreamBlock", "SingleStreamBlock"),
     ("_img_in", "_time_in", "_vector_in", "_guidance_in", "_txt_in")),
    ("sd3", "sd35_medium_emb_dims", {"depth": 24, "attn2_blocks": tuple(range(13))}, ("SingleDiTBlock",),
     ("context_embedder", "_t_embedder", "x_embedder", "y_embedder", "final_layer_adaLN_modulation",
      "final_layer_linear")),
])
def test_fixture_has_kohyas_module_names(arch, manifest, size, blocks, outside, load_manifest):
    """At the real block layout the fixture's kohya names and layer kinds are the golden manifest's, made by
    sd-scripts' own lora_flux / lora_sd3 on its own full-size models (FLUX.1-dev with in_dims; SD3.5 Medium,
    attn2 in x-blocks 0-12, with emb_dims)."""
    model = transformer(arch, **size)
    golden = {m["name"]: "linear" if m["kind"] == "linear" else "conv" for m in load_manifest(manifest)["modules"]}
    assert _kohya_names(model, blocks, outside) == golden


@pytest.mark.parametrize("arch", ARCHS)
def test_text_encoders_arrive_as_the_trainers_list(arch):
    tes, _ = _models(arch)
    handed = text_encoder_arg(arch, tes)
    assert isinstance(handed, list) and len(handed) == TEXT_ENCODERS[arch]
    assert [type(t).__name__ for t in handed][-1] == "T5EncoderModel"


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory):
    """One plugin run per arch: text encoders trained with one rate each, diff output preservation on."""
    runs = {}

    def run(arch: str):
        if arch not in runs:
            tes, model = _models(arch)
            before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model, *tes)]
            path = tmp_path_factory.mktemp(arch) / "net.safetensors"
            args = TrainerArgs(network_args=["preset=all"], network_dim=4, network_alpha=4, max_train_steps=12,
                               text_encoder_lr=[5e-3] * TEXT_ENCODERS[arch], diff_output_preservation=True,
                               output=str(path))
            result = train(arch, tes, model, synthetic_batch(arch), args)
            runs[arch] = {"tes": tes, "model": model, "before": before, "result": result, "path": path}
        return runs[arch]

    return run


@pytest.mark.parametrize("arch", ARCHS)
def test_plugin_trains_a_dit_through_the_trainer_calls(arch, plugin_run):
    run = plugin_run(arch)
    result, network = run["result"], run["result"].network
    assert result.losses[-1] < 0.9 * result.losses[0], result.losses
    after = [m.state_dict() for m in (run["model"], *run["tes"])]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(run["before"], after) for k in a), "base weights unchanged"
    assert network.train_t5xxl is False
    assert result.text_encoder_train_flags == {"flux": [True, False], "sd3": [True, True, False]}[arch]
    assert result.multiple_te_lrs == hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs")
    saved = {k.split(".")[0] for k in load_file(str(run["path"]))}
    assert saved == {k.split(".")[0] for k in network.state_dict()}
    assert any(n.startswith("lora_unet_") for n in saved) and any(n.startswith("lora_te1_") for n in saved)
    assert not any(n.startswith("lora_te3_") for n in saved), "T5 is trained only with train_t5xxl"


@pytest.mark.parametrize("arch", ARCHS)
def test_plugin_multiplier_zero_is_the_base_model(arch, plugin_run):
    """Diff output preservation predicts the prior with set_multiplier(0.0): the prediction without the network."""
    run = plugin_run(arch)
    network, tes, model = run["result"].network, run["tes"], run["model"]
    batch = synthetic_batch(arch)
    with torch.no_grad():
        network.set_multiplier(0.0)
        off = predict(arch, tes, model, batch)
        network.set_multiplier(1.0)
        on = predict(arch, tes, model, batch)
    clean_tes, clean_model = _models(arch)
    with torch.no_grad():
        base = predict(arch, clean_tes, clean_model, batch)
    torch.testing.assert_close(off, base)
    assert not torch.allclose(on, base)


@pytest.mark.parametrize("arch", ARCHS)
def test_plugin_train_t5xxl_is_refused_with_cached_text_encoder_outputs(arch):
    tes, model = _models(arch)
    args = TrainerArgs(network_args=["preset=all", "train_t5xxl=true"], cache_text_encoder_outputs=True,
                       max_train_steps=0)
    with pytest.raises(ValueError, match="cache_text_encoder_outputs"):
        train(arch, tes, model, synthetic_batch(arch), args)


@pytest.mark.parametrize("arch", ARCHS)
def test_plugin_resumes_a_dit_file(arch, plugin_run):
    """--network_weights with --dim_from_weights: create_network_from_weights with the text-encoder list, then
    load_weights; the resumed network starts where the saved one stopped."""
    run = plugin_run(arch)
    tes, model = _models(arch)
    batch = synthetic_batch(arch)
    args = TrainerArgs(network_weights=str(run["path"]), dim_from_weights=True, max_train_steps=0)
    resumed = train(arch, tes, model, batch, args)
    assert set(resumed.network.state_dict()) == set(run["result"].network.state_dict())
    run["result"].network.eval()
    with torch.no_grad():
        expected = predict(arch, run["tes"], run["model"], batch)
    resumed.network.eval()
    with torch.no_grad():
        torch.testing.assert_close(predict(arch, tes, model, batch), expected)
