"""blora-tools: block-wise LoRA for Stable Diffusion (taxonomy, file surgery, kohya plugin)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("blora-tools")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
