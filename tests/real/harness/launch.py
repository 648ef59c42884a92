"""Run an sd-scripts trainer script, unmodified, on a tiny model written by prepare.py.

    python launch.py --arch sd1|sdxl --model DIR/model --script SD_SCRIPTS/<trainer>.py -- TRAINER ARGS...

Runs under the harness interpreter with the sd-scripts tree on sys.path. kohya's own U-Net classes take their
channel widths from module globals that they read when constructed (sd-scripts library/original_unet.py,
library/sdxl_original_unet.py). This sets those globals from the tiny model's unet/config.json, then runs the
trainer script as __main__, so kohya's own argument parser, checks, loaders and training loop run. A global that
sd-scripts renamed stops the run here; one that was not applied fails kohya's strict U-Net load on shapes.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path


def _set(module, values: dict) -> str:
    for name, value in values.items():
        if not hasattr(module, name):
            raise SystemExit(f"{module.__name__} has no {name}: sd-scripts changed, update launch.py")
        setattr(module, name, value)
    return f"{module.__name__}: " + ", ".join(f"{k}={v}" for k, v in values.items())


def size_sd1(config: dict) -> str:
    import library.original_unet as unet

    if [*config["down_block_types"], *config["up_block_types"]] != [*unet.DOWN_BLOCK_TYPES, *unet.UP_BLOCK_TYPES]:
        raise SystemExit("the tiny U-Net's block types differ from kohya's SD1 layout")
    widths = tuple(config["block_out_channels"])
    groups = config["norm_num_groups"]
    return _set(unet, {"BLOCK_OUT_CHANNELS": widths, "TIMESTEP_INPUT_DIM": widths[0], "TIME_EMBED_DIM": widths[0] * 4,
                       "LAYERS_PER_BLOCK": config["layers_per_block"],
                       "LAYERS_PER_BLOCK_UP": config["layers_per_block"] + 1,
                       "NORM_GROUPS": groups, "TRANSFORMER_NORM_NUM_GROUPS": groups})


def size_sdxl(config: dict) -> str:
    import library.sdxl_original_unet as unet

    width = config["block_out_channels"][0]
    fixed = {"block_out_channels": [width, 2 * width, 4 * width], "layers_per_block": 2,
             "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": unet.CONTEXT_DIM,
             "projection_class_embeddings_input_dim": unet.ADM_IN_CHANNELS}
    for key, needed in fixed.items():
        if config[key] != needed:
            raise SystemExit(f"the tiny U-Net has {key}={config[key]}; kohya's SDXL U-Net hard-codes {needed}")
    return _set(unet, {"MODEL_CHANNELS": width, "TIME_EMBED_DIM": width * 4})


SIZERS = {"sd1": size_sd1, "sdxl": size_sdxl}


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
    config = json.loads((args.model / "unet" / "config.json").read_text())
    print(f"[launch] sized {SIZERS[args.arch](config)}", flush=True)
    sys.argv = [str(script), *argv[cut + 1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
