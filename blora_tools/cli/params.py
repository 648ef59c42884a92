"""Click parameter types and shared options: selectors, weights, output paths."""

from __future__ import annotations

import math
import re
from pathlib import Path

import click

from blora_tools.compute import DEVICES
from blora_tools.errors import SelectorError
from blora_tools.taxonomy.selectors import Selector, parse_selector
from blora_tools.taxonomy.weights import WeightSpec, parse_weights


class SelectorParam(click.ParamType):
    """A block selector such as `in0,out3`, `style`, `NOT te`, `IN04-OUT05` (syntax checked at parse)."""

    name = "SELECTOR"

    def convert(self, value, param, ctx) -> Selector:
        if isinstance(value, Selector):
            return value
        try:
            return parse_selector(value)
        except SelectorError as err:
            self.fail(str(err), param, ctx)


class WeightsParam(click.ParamType):
    """Block weights: `in0=1,out3=0.5`, an LBW vector, an LBW preset name, or `lbw=…` pasted verbatim."""

    name = "WEIGHTS"

    def convert(self, value, param, ctx) -> WeightSpec:
        if isinstance(value, WeightSpec):
            return value
        try:
            return parse_weights(value)
        except SelectorError as err:
            self.fail(str(err), param, ctx)


SELECTOR = SelectorParam()
WEIGHTS = WeightsParam()


def output_option(required: bool = True):
    return click.option(
        "-o",
        "--output",
        type=click.Path(dir_okay=False, path_type=Path),
        required=required,
        help="Where to write the new .safetensors file (never an input; see --force).",
    )


force_option = click.option("--force", is_flag=True, help="Replace the output file if it exists.")
allow_nonfinite_option = click.option(
    "--allow-nonfinite",
    is_flag=True,
    help="Write NaN/Inf values anyway (otherwise a tensor holding any is an error and nothing is written).",
)
def _arch(ctx, param, value):
    from blora_tools.taxonomy.arch import Arch

    return None if value is None else Arch(value)


arch_option = click.option(
    "--arch",
    type=click.Choice(["sd1", "sd2", "sdxl", "flux", "sd3"]),
    callback=_arch,
    help="The architecture, where a file's modules leave it open (SD1 or SD2 with no width to tell them apart: "
    "the default rule is SD1; diffusers `transformer_blocks` below 19 alone: Flux by rule, sd3 for SD3). "
    "Refused where the file's modules contradict it.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout instead of tables.")
input_file = click.argument("file", type=click.Path(path_type=Path))


# --- ranks, ratios and dtypes of computed outputs (merge, resize) -------------------------------------------

DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}


class RatiosParam(click.ParamType):
    """A comma list of finite numbers: `1,0.8`."""

    name = "RATIOS"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            ratios = tuple(float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma list of numbers such as 1,0.8", param, ctx)
        if not all(math.isfinite(r) for r in ratios):
            self.fail(f"{value!r} has a value that is not finite", param, ctx)
        return ratios


MAX_RANK = 65536
"""The largest rank an option accepts (far above any module's size; bounds a mistyped or hostile number)."""


class RankParam(click.ParamType):
    """A rank: `16`, or per block `in0=8,out3=16` (checked here; resolved once the architecture is known)."""

    name = "RANK"

    def convert(self, value, param, ctx):
        from blora_tools.errors import SelectorError
        from blora_tools.taxonomy.weights import parse_weights

        text = str(value).strip()
        if re.fullmatch(r"[0-9]+", text):  # ASCII digits only: str.isdigit() also accepts '²' and other scripts
            if len(text.lstrip("0")) > len(str(MAX_RANK)) or not 1 <= int(text) <= MAX_RANK:
                self.fail(f"{_short(text)}: a rank must be a whole number from 1 to {MAX_RANK}", param, ctx)
            return text
        try:
            spec = parse_weights(text)
        except SelectorError as err:
            self.fail(str(err), param, ctx)
        if spec.vector is not None or any(not 0 <= v <= MAX_RANK or not float(v).is_integer() for _, v in spec.named):
            self.fail(
                f"{_short(text)}: give one whole number (1 to {MAX_RANK}) or block=rank pairs such as in0=8,out3=16",
                param,
                ctx,
            )
        return text


class FiniteFloatParam(click.ParamType):
    """A finite number (nan and inf are refused as usage errors)."""

    name = "FLOAT"

    def convert(self, value, param, ctx) -> float:
        if isinstance(value, float) and math.isfinite(value):
            return value
        try:
            number = float(str(value).strip())
        except ValueError:
            self.fail(f"{_short(str(value))} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{_short(str(value))} is not a finite number", param, ctx)
        return number


def _short(text: str) -> str:
    """A user's value quoted for a message, cut to a readable length (a 5,000-digit number stays one line)."""
    return repr(text) if len(text) <= 40 else repr(text[:37] + "...")


class RuleParam(click.ParamType):
    """A dynamic rank rule: sv_fro:0.95, sv_ratio:20, sv_cumulative:0.9."""

    name = "RULE"

    def convert(self, value, param, ctx):
        from blora_tools.errors import BloraError
        from blora_tools.ops.lowrank import RankRule

        if isinstance(value, RankRule):
            return value
        try:
            return RankRule.from_text(str(value))
        except BloraError as err:
            self.fail(str(err), param, ctx)


RANK = RankParam()
RULE = RuleParam()
FINITE_FLOAT = FiniteFloatParam()

alpha_option = click.option("--alpha", type=FINITE_FLOAT, help="The one alpha value the output uses for every module (default: its largest rank).")
dtype_option = click.option("--dtype", type=click.Choice(sorted(DTYPES)), help="Output tensor dtype (default: the first input's).")
clamp_option = click.option("--clamp-quantile", type=click.FloatRange(0, 1, min_open=True), help="Clamp factor entries at this quantile of their magnitudes (kohya's svd_merge option; off by default).")
conv_rank_option = click.option("--conv-rank", type=click.IntRange(1, MAX_RANK), help="Rank for k×k convolutions (LoCon); default: as --rank.")
uniform_alpha_option = click.option(
    "--uniform-alpha",
    is_flag=True,
    help="Give every module the same alpha (the most common one), folding the rest of its scale into its up "
    "factor: ΔW unchanged, and diffusers, which mis-scales files whose alphas differ, loads it exactly.",
)
names_option = click.option(
    "--names",
    type=click.Choice(["ldm", "diffusers"]),
    help="U-Net naming of kohya output: ldm (input_blocks_…, kohya's SDXL names) or diffusers (down_blocks_…, "
    "kohya's SD1/SD2 names).",
)


# --- where and on how many threads the tensor work runs (blora_tools/compute.py) ----------------------------


def threads_option(work_name: str):
    """`--threads N`, given to every command by the CLI group. Its callback applies the thread policy for
    `work_name` (`per_module` or `whole_model`) while the command's arguments are parsed: before the command
    imports torch, so that OpenMP starts with the right count and a passive wait policy."""

    def apply(ctx, param, value):
        from blora_tools.compute import PER_MODULE, WHOLE_MODEL, apply_threads, thread_count

        work = WHOLE_MODEL if work_name == "whole_model" else PER_MODULE
        apply_threads(thread_count(work, value), work)
        return value

    return click.option(
        "--threads",
        type=click.IntRange(1, 4096),
        is_eager=True,
        expose_value=False,
        callback=apply,
        help="Torch/OpenMP threads (default: chosen from the work and the CPUs other processes leave free; "
        "threads wait passively).",
    )


def _store_device(ctx, param, value):
    ctx.find_root().obj.device = value  # the App every command gets (resolved when the command needs torch)
    return value


device_option = click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="cpu",
    show_default=True,
    expose_value=False,
    callback=_store_device,
    help="Where the decompositions run: cpu, cuda, mps, or auto (CUDA when present, else the CPU). "
    "Modules stream to the device one at a time; results come back in the output dtype.",
)

