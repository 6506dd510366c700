"""From patch distances to anomaly maps and image scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur


def blur_kernel_size(sigma: float) -> int:
    """An odd kernel wide enough for a Gaussian of ``sigma`` (4 sigma each side, as PatchCore)."""
    return 2 * int(4.0 * sigma + 0.5) + 1


def anomaly_maps(patch_scores: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """(B, h, w) patch scores -> (B, H, W) maps: bilinear upsampling, then a Gaussian blur (sigma in pixels)."""
    maps = F.interpolate(patch_scores.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
    if sigma > 0:
        maps = gaussian_blur(maps, kernel_size=[blur_kernel_size(sigma)] * 2, sigma=[sigma, sigma])
    return maps.squeeze(1)


def image_scores(maps: torch.Tensor) -> torch.Tensor:
    """The image score is the map's maximum."""
    return maps.flatten(1).amax(dim=1)
