"""The block taxonomy: architectures, blocks, selectors and block-weight vectors."""

from blora_tools.taxonomy.arch import Arch
from blora_tools.taxonomy.blocks import OTHER, Component, Placement, place, table

__all__ = ["Arch", "Component", "OTHER", "Placement", "place", "table"]
