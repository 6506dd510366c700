from patchae.models.module import AnomalyModule, PatchAEModule
from patchae.models.patch_ae import PatchAE, patch_ae_loss

__all__ = ["AnomalyModule", "PatchAE", "PatchAEModule", "patch_ae_loss"]
