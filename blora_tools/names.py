"""The base of the product's named values: enums whose members are their names in files, JSON and on the command line."""

from __future__ import annotations

from enum import Enum


class Named(str, Enum):
    """A str enum that prints as its value (`str(Arch.SDXL) == "sdxl"`), as `enum.StrEnum` does on Python ≥ 3.11."""

    def __str__(self) -> str:
        return self.value
