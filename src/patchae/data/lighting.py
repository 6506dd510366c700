"""A random global change of lighting (brightness gain, contrast around the image's mean) of [0, 1] images.

Real lines drift in lighting (MVTec AD screw's normal test images are darker than its training images: mean grey
170 against 184). A reconstruction model trained on one lighting learns to rebuild only that one, and its error
map then calls a darker normal part anomalous. Training on lit variants of the normal images (input and target
changed alike) teaches it to pass the lighting through.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from patchae.errors import PatchAEError


@dataclass(frozen=True)
class LightingJitter:
    """``brightness``: range of the gain on every pixel; ``contrast``: range of the factor on each pixel's
    distance to the image's mean. Both drawn uniformly; (1, 1) leaves the image as it is."""

    brightness: Sequence[float] = (1.0, 1.0)
    contrast: Sequence[float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast"):
            low, high = (float(v) for v in getattr(self, name))
            if not 0.0 < low <= high:
                raise PatchAEError(
                    f"lighting.{name}={[low, high]} must be a range [low, high] with 0 < low <= high"
                )
            object.__setattr__(self, name, (low, high))

    @property
    def active(self) -> bool:
        return self.brightness != (1.0, 1.0) or self.contrast != (1.0, 1.0)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A lit variant of a float (3, H, W) image in [0, 1], clipped to [0, 1]."""
        gain, factor = (
            low + (high - low) * float(torch.rand((), generator=generator))
            for low, high in (self.brightness, self.contrast)
        )
        mean = image.mean()
        return (((image - mean) * factor + mean) * gain).clamp(0.0, 1.0)
