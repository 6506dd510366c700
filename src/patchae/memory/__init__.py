"""Memory bank of normal patch features: coreset subsampling and nearest-neighbour search."""

from patchae.memory.bank import MemoryBank, torch_nearest
from patchae.memory.coreset import greedy_coreset

__all__ = ["MemoryBank", "greedy_coreset", "torch_nearest"]
