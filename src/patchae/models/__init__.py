"""Every model is a plug-in in its own package (network and Lightning wrapper side by side) on the shared base."""

from patchae.models.base import AnomalyModule
from patchae.models.daad import DAADModule
from patchae.models.patch_ae import PatchAE, PatchAEModule, patch_ae_loss
from patchae.models.patchcore import PatchCoreModule
from patchae.models.ssl_ae import SSLAEModule

__all__ = [
    "AnomalyModule",
    "DAADModule",
    "PatchAE",
    "PatchAEModule",
    "PatchCoreModule",
    "SSLAEModule",
    "patch_ae_loss",
]
