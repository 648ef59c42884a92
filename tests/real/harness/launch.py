"""Run an sd-scripts trainer script, unmodified, on a tiny model written by prepare.py.

    python launch.py --arch sd1|sdxl|flux|sd3 --model DIR/model --script SD_SCRIPTS/<trainer>.py -- TRAINER ARGS...

Runs under the harness interpreter with the sd-scripts tree on sys.path. kohya's own U-Net classes take their
channel widths from module globals that they read when constructed (sd-scripts library/original_unet.py,
library/sdxl_original_unet.py). This sets those globals from the tiny model's unet/config.json, then runs the
trainer script as __main__, so kohya's own argument parser, checks, loaders and training loop run. A global that
sd-scripts renamed stops the run here; one that was not applied fails kohya's strict U-Net load on shapes.

Flux and SD3 (sizes in tiny_dit.py): kohya's own loaders read the transformer (load_flow_model, load_mmdit) and the
Flux AE (load_ae), with the Flux configs they build from set to the tiny sizes. The text-encoder loaders, which
build the full CLIP-L / CLIP-G / T5-XXL from configs written inside them, and SD3's load_vae, which builds the
full SDVAE, are replaced by loaders of the tiny models that refuse any missing or unexpected key. The trainer reads
the replacements because it calls every loader as an attribute of its module (flux_utils.load_clip_l(...)).
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path


def _unet_config(model: Path) -> dict:
    return json.loads((model / "unet" / "config.json").read_text())


def _set(module, values: dict) -> str:
    for name, value in values.items():
        if not hasattr(module, name):
            raise SystemExit(f"{module.__name__} has no {name}: sd-scripts changed, update launch.py")
        setattr(module, name, value)
    return f"{module.__name__}: " + ", ".join(f"{k}={v}" for k, v in values.items())


def size_sd1(model: Path) -> str:
    import library.original_unet as unet

    config = _unet_config(model)
    if [*config["down_block_types"], *config["up_block_types"]] != [*unet.DOWN_BLOCK_TYPES, *unet.UP_BLOCK_TYPES]:
        raise SystemExit("the tiny U-Net's block types differ from kohya's SD1 layout")
    widths = tuple(config["block_out_channels"])
    groups = config["norm_num_groups"]
    return _set(unet, {"BLOCK_OUT_CHANNELS": widths, "TIMESTEP_INPUT_DIM": widths[0], "TIME_EMBED_DIM": widths[0] * 4,
                       "LAYERS_PER_BLOCK": config["layers_per_block"],
                       "LAYERS_PER_BLOCK_UP": config["layers_per_block"] + 1,
                       "NORM_GROUPS": groups, "TRANSFORMER_NORM_NUM_GROUPS": groups})


def size_sdxl(model: Path) -> str:
    import library.sdxl_original_unet as unet

    config = _unet_config(model)
    width = config["block_out_channels"][0]
    fixed = {"block_out_channels": [width, 2 * width, 4 * width], "layers_per_block": 2,
             "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": unet.CONTEXT_DIM,
             "projection_class_embeddings_input_dim": unet.ADM_IN_CHANNELS}
    for key, needed in fixed.items():
        if config[key] != needed:
            raise SystemExit(f"the tiny U-Net has {key}={config[key]}; kohya's SDXL U-Net hard-codes {needed}")
    return _set(unet, {"MODEL_CHANNELS": width, "TIME_EMBED_DIM": width * 4})


def _pretrained_loader(model_class, label: str):
    """A replacement for a kohya text-encoder loader: the tiny transformers model saved in the folder it is given
    (--clip_l / --clip_g / --t5xxl), every key matched, in the dtype asked for."""

    def load(path, dtype=None, device="cpu", disable_mmap=False, state_dict=None):
        model, info = model_class.from_pretrained(str(path), output_loading_info=True)
        if any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")):
            raise SystemExit(f"{path}: the tiny {label} does not load cleanly: {info}")
        print(f"[launch] Loaded tiny {label} from {path}: all keys matched", flush=True)
        return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)

    return load


def _replace(module, name: str, value) -> None:
    if not hasattr(module, name):
        raise SystemExit(f"{module.__name__} has no {name}: sd-scripts changed, update launch.py")
    setattr(module, name, value)


def size_flux(model: Path) -> str:
    """kohya's dev/schnell configs at the tiny sizes; CLIP-L and T5 loaders of the tiny folders."""
    import dataclasses

    from library import flux_models, flux_utils
    from transformers import CLIPTextModel, T5EncoderModel

    from tiny_dit import FLUX_AE_PARAMS, FLUX_PARAMS

    for name in (flux_utils.MODEL_NAME_DEV, flux_utils.MODEL_NAME_SCHNELL):
        spec = flux_models.configs[name]
        sizes = {k: v for k, v in FLUX_PARAMS.items() if k != "guidance_embed"}  # dev and schnell keep theirs
        spec.params = dataclasses.replace(spec.params, **sizes)
        spec.ae_params = dataclasses.replace(spec.ae_params, **FLUX_AE_PARAMS)
    _replace(flux_utils, "load_clip_l", _pretrained_loader(CLIPTextModel, "CLIP-L"))
    _replace(flux_utils, "load_t5xxl", _pretrained_loader(T5EncoderModel, "T5xxl"))
    return f"flux_models.configs: {FLUX_PARAMS}, AE {FLUX_AE_PARAMS}; flux_utils.load_clip_l, load_t5xxl"


def size_sd3(model: Path) -> str:
    """Loaders of the tiny CLIP-L, CLIP-G and T5 folders, and of the tiny SDVAE (loaded strictly)."""
    from library import sd3_utils
    from safetensors.torch import load_file
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from tiny_dit import tiny_sdvae

    def load_vae(path, dtype=None, device="cpu", disable_mmap=False, state_dict=None):
        vae = tiny_sdvae(dtype, device)
        vae.load_state_dict(load_file(str(path)), strict=True)
        print(f"[launch] Loaded tiny VAE from {path}: all keys matched", flush=True)
        return vae

    _replace(sd3_utils, "load_clip_l", _pretrained_loader(CLIPTextModelWithProjection, "CLIP-L"))
    _replace(sd3_utils, "load_clip_g", _pretrained_loader(CLIPTextModelWithProjection, "CLIP-G"))
    _replace(sd3_utils, "load_t5xxl", _pretrained_loader(T5EncoderModel, "T5xxl"))
    _replace(sd3_utils, "load_vae", load_vae)
    return "sd3_utils.load_clip_l, load_clip_g, load_t5xxl, load_vae"


SIZERS = {"sd1": size_sd1, "sdxl": size_sdxl, "flux": size_flux, "sd3": size_sd3}


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit(__doc__)
    cut = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=sorted(SIZERS), required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--script", type=Path, required=True)
    args = parser.parse_args(argv[:cut])
    script = args.script.resolve()
    sys.path.insert(0, str(script.parent))  # as `python train_network.py`; networks/ is a namespace package
    print(f"[launch] sized {SIZERS[args.arch](args.model)}", flush=True)
    sys.argv = [str(script), *argv[cut + 1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
