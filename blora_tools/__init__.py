"""blora-tools: block-wise LoRA for Stable Diffusion, Flux.1 and SD3 (taxonomy, file surgery, kohya plugin)."""


def __getattr__(name: str) -> str:
    """`__version__`, read from the installed package's metadata on first use (importlib.metadata costs a
    twentieth of a second at start-up, which every command would pay)."""
    if name != "__version__":
        raise AttributeError(f"module 'blora_tools' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("blora-tools")
    except PackageNotFoundError:  # running from a source tree that was never installed
        found = "0.0.0+source"
    globals()["__version__"] = found
    return found
