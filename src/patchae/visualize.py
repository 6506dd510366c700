"""Anomaly-map overlays for people to look at."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage


def denormalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) uint8."""
    mean_t = torch.tensor(mean, dtype=image.dtype).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=image.dtype).view(3, 1, 1)
    pixels = (image.cpu() * std_t + mean_t).clamp(0, 1)
    return (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def heatmap(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 'jet' colours."""
    return (colormaps["jet"](np.clip(values, 0, 1))[..., :3] * 255).astype(np.uint8)


def overlay(
    image: np.ndarray, anomaly_map: np.ndarray, low: float, high: float, mask: np.ndarray | None = None
) -> Image.Image:
    """Side by side: the image (ground truth outlined in green) and the map blended over it.

    ``low`` and ``high`` fix the colour scale, so overlays of one run compare with each other.
    """
    scaled = (anomaly_map - low) / max(high - low, 1e-12)
    blended = (0.5 * image + 0.5 * heatmap(scaled)).astype(np.uint8)
    original = image.copy()
    if mask is not None and mask.any():
        edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
        original[edge] = (0, 255, 0)
        blended[edge] = (0, 255, 0)
    return Image.fromarray(np.concatenate([original, blended], axis=1))


def save_overlay(path: Path, *args, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay(*args, **kwargs).save(path)
