"""Patch AE (Cui, Liu, Lian): the network and its Lightning wrapper."""

from patchae.models.patch_ae.module import PatchAEModule
from patchae.models.patch_ae.network import PatchAE, patch_ae_loss

__all__ = ["PatchAE", "PatchAEModule", "patch_ae_loss"]
