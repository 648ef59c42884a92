"""Click parameter types and shared options: selectors, weights, output paths."""

from __future__ import annotations

from pathlib import Path

import click

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
json_option = click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout instead of tables.")
input_file = click.argument("file", type=click.Path(path_type=Path))
