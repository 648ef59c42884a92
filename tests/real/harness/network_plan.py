"""What a network module plans for a tiny Flux/SD3 model, and what its merge_to does to it, computed the way the
trainer would: the model loaded by kohya's own loaders (with launch.py's sizing), the network built by the module.

    python network_plan.py plan  --arch flux|sd3 --model DIR/model --module M --out plan.json [--dim 4 --alpha 1]
                                 [-- NETWORK_ARGS key=value ...]
    python network_plan.py merge --arch flux|sd3 --model DIR/model --module M --weights FILE --out merged.safetensors

plan: `M.create_network(1.0, dim, alpha, None, text_encoders, model, **args)` and `apply_to`; writes {module name: [rank, in, out]}
for every module of the network's state dict (names as in a saved file), text-encoder modules included.
merge: `M.create_network_from_weights(1.0, FILE, None, text_encoders, model, for_inference=True)` and
`merge_to(...)`; writes, for each module in FILE, `<name>.base` and `<name>.merged`: the wrapped layer's weight
before and after, so a test can compare the merge with a dense oracle computed from FILE alone.
Runs under the harness interpreter with sd-scripts on sys.path.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from launch import SIZERS  # noqa: E402
from prepare import DIT_FILES  # noqa: E402

TE_PREFIXES = {"flux": ("lora_te1", "lora_te3"), "sd3": ("lora_te1", "lora_te2", "lora_te3")}
"""kohya's text-encoder prefixes, in the order of the trainer's text-encoder list (lora_flux / lora_sd3)."""


def load_models(arch: str, model: Path):
    """(text encoders, transformer) as the arch's trainer loads them, in fp32 on the CPU."""
    import torch

    SIZERS[arch](model)
    files = {k: str(model / v) for k, v in DIT_FILES[arch].items()}
    if arch == "flux":
        from library import flux_utils

        _, transformer = flux_utils.load_flow_model(files["model"], torch.float32, "cpu")
        tes = [flux_utils.load_clip_l(files["clip_l"], torch.float32, "cpu"),
               flux_utils.load_t5xxl(files["t5xxl"], torch.float32, "cpu")]
    else:
        from library import sd3_utils
        from library.safetensors_utils import load_safetensors

        transformer = sd3_utils.load_mmdit(load_safetensors(files["model"], "cpu", dtype=torch.float32),
                                           torch.float32, "cpu")
        tes = [getattr(sd3_utils, f"load_{name}")(files[name], torch.float32, "cpu")
               for name in ("clip_l", "clip_g", "t5xxl")]
    return tes, transformer


def module_names(state: dict) -> dict[str, list[int]]:
    """{module name: [rank, in, out]} from a network's state dict (kohya keys: name.lora_down..., name.alpha)."""
    found: dict[str, list[int]] = {}
    for key, tensor in state.items():
        name, _, rest = key.partition(".")
        if rest.startswith("lora_down") and rest.endswith("weight") and name not in found:
            found[name] = [int(tensor.shape[0]), int(tensor.shape[1]), 0]
        elif rest.startswith("lora_up") and rest.endswith("weight"):
            found.setdefault(name, [0, 0, 0])[2] += int(tensor.shape[0])  # split_qkv: the parts' rows add up
    return found


def named_layers(arch: str, tes, transformer) -> dict:
    """Every Linear/Conv2d layer under its kohya module name (lora_unet_ / lora_teN_ + path with '.' -> '_')."""
    layers = {}
    roots = [("lora_unet", transformer), *zip(TE_PREFIXES[arch], tes)]
    for prefix, root in roots:
        for path, layer in root.named_modules():
            if type(layer).__name__ in ("Linear", "Conv2d"):
                layers[f"{prefix}_{path}".replace(".", "_")] = layer
    return layers


def main() -> None:
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["plan", "merge"])
    parser.add_argument("--arch", choices=sorted(TE_PREFIXES), required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--module", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dim", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--weights", type=Path)
    args = parser.parse_args(argv[:cut])
    network_args = dict(arg.split("=", 1) for arg in argv[cut + 1:])

    import torch

    torch.manual_seed(0)
    module = importlib.import_module(args.module)
    tes, transformer = load_models(args.arch, args.model)
    if args.mode == "plan":
        network = module.create_network(1.0, args.dim, args.alpha, None, tes, transformer, **network_args)
        network.apply_to(tes, transformer, True, True)  # kohya's networks register their modules here
        args.out.write_text(json.dumps(module_names(network.state_dict()), indent=1, sort_keys=True))
        return
    from safetensors.torch import load_file, save_file

    weights = load_file(str(args.weights))
    layers = named_layers(args.arch, tes, transformer)
    names = sorted(module_names(weights))
    missing = [n for n in names if n not in layers]
    if missing:
        raise SystemExit(f"{args.weights}: modules with no layer in the tiny {args.arch} model: {missing[:5]}")
    base = {f"{n}.base": layers[n].weight.detach().clone() for n in names}
    network, weights_sd = module.create_network_from_weights(1.0, str(args.weights), None, tes, transformer,
                                                             for_inference=True)
    network.merge_to(tes, transformer, weights_sd, torch.float32, "cpu")
    merged = {f"{n}.merged": layers[n].weight.detach().clone() for n in names}
    save_file({k: v.float().contiguous() for k, v in {**base, **merged}.items()}, str(args.out))


if __name__ == "__main__":
    main()
