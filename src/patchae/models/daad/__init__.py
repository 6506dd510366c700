"""DAAD, Divide-and-Assemble (Hou et al., ICCV 2021): the network and its Lightning wrapper."""

from patchae.models.daad.module import DAADModule
from patchae.models.daad.network import BlockMemory, DAADNetwork, Discriminator

__all__ = ["BlockMemory", "DAADModule", "DAADNetwork", "Discriminator"]
