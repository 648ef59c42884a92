"""The library's exception types. The CLI maps each to a one-line message and an exit code."""

from __future__ import annotations

from pathlib import Path


class BloraError(Exception):
    """Base of every error the library raises for bad input or a refused operation."""

    exit_code = 1

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.message = message
        self.path = None if path is None else str(path)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class AdapterFileError(BloraError):
    """A file that is not a readable adapter: corrupt, unsupported, pickle, missing."""


class SelectorError(BloraError):
    """An unknown selector term, a bad weight string or an LBW vector of the wrong length."""


class SpecError(BloraError, ValueError):
    """A bad training specification (`--network_args` value, inconsistent ranks)."""


class OutputError(BloraError):
    """An output path that may not be written: exists, is an input, or its folder is missing."""


class NonFiniteError(BloraError):
    """NaN or Inf values where a finite tensor is required."""
