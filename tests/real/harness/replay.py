"""Drive a network module with tests/fake_trainer.py's Flux/SD3 replay of the trainer's calls, under the harness
interpreter, so kohya's own networks.lora_flux / lora_sd3 check the fake trainer and its sd-scripts-shaped fixtures.

    python replay.py --arch flux|sd3 --module networks.lora_flux --out DIR [--steps 10] [-- NETWORK_ARGS key=value ...]

The fixtures (tests/dit_models.py) get the block layout of the tiny model of tiny_dit.py, so their kohya module
names can be compared with the names the same module plans on the model that sd-scripts' own classes build.
Trains the text encoders too, with one learning rate per text encoder and diff-output preservation, and writes
DIR/net.safetensors and DIR/replay.json: losses, learning-rate descriptions, whether the per-TE-rates method was
used, the text-encoder train flags, the set_multiplier calls, and the trainer's error for train_t5xxl together
with cached text-encoder outputs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # tiny_dit; tests/ (fake_trainer, dit_models)

import fake_trainer  # noqa: E402
from tiny_dit import FLUX_PARAMS, SD3_ATTN2_BLOCKS, SD3_DEPTH  # noqa: E402

FIXTURE_SIZES = {
    "flux": {"double_blocks": FLUX_PARAMS["depth"], "single_blocks": FLUX_PARAMS["depth_single_blocks"]},
    "sd3": {"depth": SD3_DEPTH, "attn2_blocks": tuple(SD3_ATTN2_BLOCKS)},
}
TEXT_ENCODERS = {"flux": 2, "sd3": 3}


def recording_module(name: str, calls: list[float]):
    """The network module, whose networks record every set_multiplier call."""
    module = importlib.import_module(name)

    class Recording:
        def __getattr__(self, attribute):
            return getattr(module, attribute)

        @staticmethod
        def create_network(*args, **kwargs):
            network = module.create_network(*args, **kwargs)
            original = network.set_multiplier

            def set_multiplier(value):
                calls.append(value)
                return original(value)

            network.set_multiplier = set_multiplier
            return network

    return Recording()


def main() -> None:
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(FIXTURE_SIZES), required=True)
    parser.add_argument("--module", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv[:cut])
    network_args = argv[cut + 1:]

    import torch

    torch.set_num_threads(1)
    calls: list[float] = []
    sys.modules["_replay_network"] = recording_module(args.module, calls)
    tes, model = fake_trainer.dit_models.build(args.arch, **FIXTURE_SIZES[args.arch])
    batch = fake_trainer.synthetic_batch(args.arch)
    args.out.mkdir(parents=True, exist_ok=True)
    trainer_args = fake_trainer.TrainerArgs(
        network_module="_replay_network", network_dim=4, network_alpha=4, network_args=network_args,
        max_train_steps=args.steps, text_encoder_lr=[1e-3] * TEXT_ENCODERS[args.arch],
        diff_output_preservation=True, output=str(args.out / "net.safetensors"))
    result = fake_trainer.train(args.arch, tes, model, batch, trainer_args)
    refused = None
    try:
        fake_trainer.train(args.arch, tes, model, batch, fake_trainer.TrainerArgs(
            network_module=args.module, network_args=["train_t5xxl=True"], cache_text_encoder_outputs=True,
            max_train_steps=0))
    except ValueError as err:
        refused = str(err)
    (args.out / "replay.json").write_text(json.dumps({
        "losses": result.losses, "descriptions": result.descriptions, "multiple_te_lrs": result.multiple_te_lrs,
        "text_encoder_train_flags": result.text_encoder_train_flags, "set_multiplier": calls,
        "t5xxl_with_cache": refused}, indent=1))


if __name__ == "__main__":
    main()
