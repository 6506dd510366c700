"""patchae: Patch-wise Auto-Encoder for unsupervised visual anomaly detection."""

from patchae.errors import PatchAEError

__all__ = ["PatchAEError"]
__version__ = "0.1.0"
