"""Render images and labelled grids of adapters on a user's own Stable Diffusion model (diffusers).

* `args` — the command-line values: `--lora` and axis syntax, `--size`.
* `plan` — the cells of a grid and which modules each adapter's selector picks.
* `draw` — the labelled grid image (PIL).
* `files` — the checks before writing, the cell → settings map (JSON) and the PNG bytes.
* `pipeline` — load a diffusers pipeline once, merge adapters' ΔW into the touched layers per cell
  (float32, cast back) and put the original tensors back afterwards (kept on the device, or in host memory
  when the device lacks room), render with a progress callback.
* `run` — `render(request)`: every check, the plan, then (unless a dry run) the model, the cells and the files.

Only `pipeline` imports torch and diffusers (`run` imports it when rendering, not for a dry run).
"""

from __future__ import annotations

from types import MappingProxyType

from blora_tools.errors import BloraError

SAMPLERS = MappingProxyType(
    {
        "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
        "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
        "euler": ("EulerDiscreteScheduler", {}),
        "euler-a": ("EulerAncestralDiscreteScheduler", {}),
        "ddim": ("DDIMScheduler", {}),
    }
)
"""Sampler name → (diffusers scheduler class, config overrides). The paper's setting is DPM++ 2M Karras."""

DEFAULT_SAMPLER = "dpmpp-2m-karras"
DEFAULT_STEPS = 25
DEFAULT_CFG = 7.0
DTYPES = ("auto", "fp32", "fp16", "bf16")

KEEP_ORIGINALS = ("auto", "device", "host")
"""Where render keeps the original weights of the layers adapters change (`pipeline.keep_originals_where`)."""


def check_keep_originals(mode: str) -> str:
    """`mode` if it is one of KEEP_ORIGINALS, else BloraError naming the choices (checked before a model loads)."""
    if mode not in KEEP_ORIGINALS:
        raise BloraError(f"keep originals {mode!r}: use {', '.join(KEEP_ORIGINALS[:-1])} or {KEEP_ORIGINALS[-1]}")
    return mode
