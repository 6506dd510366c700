"""PatchCore (Roth et al.), the baseline: no network of its own, the shared base scores pretrained features."""

from patchae.models.patchcore.module import PatchCoreModule

__all__ = ["PatchCoreModule"]
