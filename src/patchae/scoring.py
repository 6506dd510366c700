"""From patch distances to anomaly maps and image scores."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur

from patchae.errors import PatchAEError
from patchae.memory import torch_nearest

# max: the map's maximum (Patch AE, PatchCore's default here) | topk: mean of the top_k share of map pixels |
# reweight: PatchCore's Eq. 7, which needs the patch features and the bank (see AnomalyModule.score).
IMAGE_SCORES = ("max", "topk", "reweight")


def check_image_score(method: str, top_k: float) -> None:
    if method not in IMAGE_SCORES:
        raise PatchAEError(f"scoring.image_score={method} is unknown; use one of {', '.join(IMAGE_SCORES)}")
    if not 0.0 < float(top_k) <= 1.0:
        raise PatchAEError(f"scoring.top_k={top_k} must be a share of the map's pixels in (0, 1]")


def blur_kernel_size(sigma: float) -> int:
    """An odd kernel wide enough for a Gaussian of ``sigma`` (4 sigma each side, as PatchCore)."""
    return 2 * int(4.0 * sigma + 0.5) + 1


def anomaly_maps(patch_scores: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """(B, h, w) patch scores -> (B, H, W) maps: bilinear upsampling, then a Gaussian blur (sigma in pixels)."""
    maps = F.interpolate(patch_scores.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
    if sigma > 0:
        maps = gaussian_blur(maps, kernel_size=[blur_kernel_size(sigma)] * 2, sigma=[sigma, sigma])
    return maps.squeeze(1)


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
