"""Render images and labelled grids of adapters on a user's own Stable Diffusion model (diffusers).

* `grid` — `--lora` and axis syntax, the cell plan, which modules each selector picks, the labelled PNG.
  No torch.
* `pipeline` — load a diffusers pipeline once, merge adapters' ΔW into the touched layers per cell
  (float32, cast back) and put the original tensors back afterwards, render with a progress callback.

Importing this package imports neither torch nor diffusers.
"""

from __future__ import annotations

from types import MappingProxyType

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
