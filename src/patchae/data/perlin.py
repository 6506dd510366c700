"""Perlin-noise-shaped synthetic defects (as DRAEM, Zavrtanik et al., ICCV 2021) on [0, 1] image tensors.

A mask is cut from 2D Perlin noise at a random lattice scale (blobs of many sizes and shapes, not CutPaste's
rectangles and scars), and inside it the image is blended with a source image: ``(1 - opacity) * source +
opacity * image``. The validation set uses it as the defect kind the model was *not* trained on. The mask is
exactly the set of pixels written; every pixel outside it is bit-identical to the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from patchae.errors import PatchAEError

_MAX_TRIES = 10


def perlin_noise(height: int, width: int, scale: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """(height, width) gradient noise in about [-0.7, 0.7] with ``scale`` = (rows, columns) lattice cells."""
    rows, columns = scale
    angles = 2 * math.pi * torch.rand(rows + 1, columns + 1, generator=generator)
    gradients = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    y = torch.arange(height, dtype=torch.float32) * rows / height
    x = torch.arange(width, dtype=torch.float32) * columns / width
    y0, x0 = y.floor().long(), x.floor().long()
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = gradients[(y0 + dy)[:, None], (x0 + dx)[None, :]]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: torch.Tensor) -> torch.Tensor:
        return t * t * t * (t * (6 * t - 15) + 10)

    wy, wx = fade(fy), fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), wx)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), wx)
    return torch.lerp(top, bottom, wy)


@dataclass(eq=False)
class PerlinBlend:
    """Blend a source image into ``image`` inside a thresholded Perlin-noise mask.

    Args:
        scale_exponents: lattice cells per side are ``2 ** e``, ``e`` drawn per axis from this inclusive range.
        threshold: noise above it is the defect (higher: smaller, rarer blobs).
        opacity: how much of the original shows through inside the mask (uniform in the range; DRAEM: 0-0.8).
    """

    scale_exponents: tuple[int, int] = (0, 5)
    threshold: float = 0.5
    opacity: tuple[float, float] = (0.0, 0.8)

    def __post_init__(self) -> None:
        low, high = self.scale_exponents
        if not 0 <= low <= high:
            raise PatchAEError(
                f"PerlinBlend scale_exponents must be 0 <= low <= high, got {self.scale_exponents}"
            )
        if not 0.0 <= self.opacity[0] <= self.opacity[1] < 1.0:
            raise PatchAEError(f"PerlinBlend opacity must be 0 <= low <= high < 1, got {self.opacity}")

    def mask(self, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """A (height, width) bool mask with at least one pixel."""
        low, high = self.scale_exponents
        noise = torch.zeros(height, width)
        for _ in range(_MAX_TRIES):
            exponents = torch.randint(low, high + 1, (2,), generator=generator).tolist()
            noise = perlin_noise(height, width, (2 ** exponents[0], 2 ** exponents[1]), generator)
            mask = noise > self.threshold
            if mask.any():
                return mask
        return noise >= noise.max()  # a very rare draw with no blob: keep its peak

    def __call__(
        self, image: torch.Tensor, source: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(image, mask)``: the defective image and its ``1 x H x W`` {0, 1} mask."""
        if image.shape != source.shape or image.ndim != 3:
            raise ValueError(
                f"image {tuple(image.shape)} and source {tuple(source.shape)} must be C x H x W alike"
            )
        mask = self.mask(image.shape[1], image.shape[2], generator)
        low, high = self.opacity
        opacity = low + (high - low) * torch.rand((), generator=generator).item()
        blended = (1 - opacity) * source + opacity * image
        out = torch.where(mask, blended, image)
        changed = (out != image).any(dim=0)
        return out, changed.to(torch.float32).unsqueeze(0)
