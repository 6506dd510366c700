from patchae.models.module import AnomalyModule, PatchAEModule
from patchae.models.patch_ae import PatchAE, patch_ae_loss
from patchae.models.patchcore import PatchCoreModule

__all__ = ["AnomalyModule", "PatchAE", "PatchAEModule", "PatchCoreModule", "patch_ae_loss"]
