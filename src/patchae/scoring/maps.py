"""From patch distances to anomaly maps and image scores."""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F

from patchae.memory import torch_nearest


def blur_kernel_size(sigma: float) -> int:
    """An odd kernel wide enough for a Gaussian of ``sigma`` (4 sigma each side, as PatchCore)."""
    return 2 * int(4.0 * sigma + 0.5) + 1


def gaussian_kernel(sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised 1-D Gaussian of :func:`blur_kernel_size` taps (torchvision's gaussian_blur kernel)."""
    size = blur_kernel_size(sigma)
    half = (size - 1) * 0.5
    density = torch.exp(-0.5 * (torch.linspace(-half, half, size, dtype=torch.float64) / sigma) ** 2)
    return (density / density.sum()).to(dtype)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (B, C, H, W) maps with reflect padding, as torchvision's gaussian_blur, in two 1-D passes."""
    kernel = gaussian_kernel(sigma, maps.dtype).to(maps.device)
    padding = kernel.numel() // 2
    padded = F.pad(maps, [padding] * 4, mode="reflect")
    return F.conv2d(F.conv2d(padded, kernel.view(1, 1, -1, 1)), kernel.view(1, 1, 1, -1))


@functools.lru_cache(maxsize=16)
def map_operator(patches: int, pixels: int, sigma: float) -> torch.Tensor:
    """(pixels, patches) matrix A of one axis of :func:`anomaly_maps`: bilinear upsampling (align_corners=False)
    then the reflect-padded Gaussian blur. Both are linear and separable, so a (h, w) grid P becomes the
    (H, W) map A_h @ P @ A_w^T: two small matmuls instead of an upsampled image and a 33 x 33 convolution."""
    basis = torch.eye(patches, dtype=torch.float64).view(patches, 1, 1, patches)
    upsampled = F.interpolate(basis, size=(1, pixels), mode="bilinear", align_corners=False)
    if sigma > 0:
        kernel = gaussian_kernel(sigma, torch.float64)
        padded = F.pad(upsampled.view(patches, 1, pixels), [kernel.numel() // 2] * 2, mode="reflect")
        upsampled = F.conv1d(padded, kernel.view(1, 1, -1))
    return upsampled.view(patches, pixels).t().float().contiguous()


# Above this side length the dense (pixels x patches) operators cost more than interpolate + separable blur.
MAX_OPERATOR_SIDE = 1024


def anomaly_maps(patch_scores: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """(B, h, w) patch scores -> (B, H, W) maps: bilinear upsampling, then a Gaussian blur (sigma in pixels).

    Computed as two matmuls with :func:`map_operator` (about 20x faster on CPU than upsampling and blurring,
    equal to float rounding); very large maps take the interpolate + separable blur route. While tracing, the
    sizes are fixed ints and the (cached) operators constants of the graph."""
    height, width = int(patch_scores.shape[-2]), int(patch_scores.shape[-1])
    size = (int(size[0]), int(size[1]))
    if max(size) > MAX_OPERATOR_SIDE:
        maps = F.interpolate(patch_scores.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        return (gaussian_blur(maps, sigma) if sigma > 0 else maps).squeeze(1)
    rows = map_operator(height, size[0], float(sigma)).to(patch_scores.device, patch_scores.dtype)
    cols = map_operator(width, size[1], float(sigma)).to(patch_scores.device, patch_scores.dtype)
    return rows @ patch_scores @ cols.t()


def image_scores(maps: torch.Tensor, method: str = "max", top_k: float = 0.01) -> torch.Tensor:
    """The image score: the map's maximum, or (``topk``) the mean of its ``top_k`` share of highest pixels,
    which a single noisy pixel moves less."""
    flat = maps.flatten(1)
    if method == "topk":
        count = max(1, math.ceil(top_k * flat.shape[1]))
        return flat.topk(count, dim=1).values.mean(dim=1)
    return flat.amax(dim=1)


def reweighted_image_scores(
    patch_features: torch.Tensor, patch_scores: torch.Tensor, bank: torch.Tensor, neighbors: int = 9
) -> torch.Tensor:
    """PatchCore's Eq. 7: the largest patch score s* scaled by 1 - softmax weight of its nearest bank vector m*.

    With m_test the patch that scored s*, and N_b(m*) the ``neighbors`` nearest bank vectors of m*
    (m* itself among them): s = (1 - exp||m_test - m*|| / sum_{m in N_b(m*)} exp||m_test - m||) * s*.
    An anomalous patch whose nearest normal vector sits in a dense region of the bank keeps more of its
    score than one that is merely near a rare normal vector.

    Args:
        patch_features: (B, P, D) features of every patch.
        patch_scores: (B, P) patch scores (nearest-neighbour distances).
        bank: (M, D) memory bank.
        neighbors: b, the size of the neighbourhood N_b(m*).
    Returns:
        (B,) image scores.
    """
    batch = patch_features.shape[0]
    s_star, where = patch_scores.max(dim=1)
    m_test = patch_features[torch.arange(batch, device=where.device), where].float()
    bank = bank.to(m_test.device)
    nearest = torch_nearest(m_test, bank, k=1)[1][:, 0]
    support = torch_nearest(bank[nearest], bank, k=min(max(neighbors, 1), bank.shape[0]))[1]
    support[:, 0] = nearest  # m* first; an exact duplicate of m* would otherwise be as good a column 0
    distances = torch.linalg.vector_norm(bank[support] - m_test.unsqueeze(1), dim=-1)
    weights = 1.0 - torch.softmax(distances, dim=1)[:, 0]
    return weights * s_star.to(weights.device)


def full_precision(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context in which ``tensor``'s device computes in float32 even inside a mixed-precision (autocast)
    region: a bf16 or fp16 bank distance, blur or reconstruction error rounds small score differences away, and
    NumPy (the metrics) cannot read bf16 at all. Use with ``tensor.float()``."""
    return torch.autocast(tensor.device.type, enabled=False)
