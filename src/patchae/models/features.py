"""Patch features shared by the models: stage maps pooled over a neighbourhood, resized and concatenated."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from patchae.errors import PatchAEError


def locally_aware_features(
    features: Sequence[torch.Tensor], patch_size: int = 3, embedding_dim: int | None = None
) -> torch.Tensor:
    """PatchCore's patch features: every stage averaged over a ``patch_size`` neighbourhood (zero padded, as
    PatchCore's unfold), deeper stages bilinearly resized to the first stage's grid, then concatenated.

    With ``embedding_dim``, as PatchCore's reference code: each stage's channels are average-pooled to
    ``embedding_dim`` before the concatenation, which is then pooled to ``embedding_dim`` again, so every
    stage weighs the same whatever its channel count.

    Returns (B, sum(C_i), h, w), or (B, embedding_dim, h, w), with (h, w) the grid of ``features[0]``.
    """
    if patch_size < 1 or patch_size % 2 == 0:
        raise PatchAEError(f"model.patch_size={patch_size} must be a positive odd number (PatchCore uses 3)")
    size = features[0].shape[-2:]
    pooled = []
    for feature in features:
        if patch_size > 1:
            feature = F.avg_pool2d(feature, patch_size, stride=1, padding=patch_size // 2)
        if feature.shape[-2:] != size:
            feature = F.interpolate(feature, size=size, mode="bilinear", align_corners=False)
        pooled.append(feature if embedding_dim is None else pool_channels(feature, embedding_dim))
    embedding = torch.cat(pooled, dim=1)
    return embedding if embedding_dim is None else pool_channels(embedding, embedding_dim)


def pool_channels(embedding: torch.Tensor, dim: int) -> torch.Tensor:
    """Adaptive average pooling along the channel axis to exactly ``dim`` channels (fewer are repeated)."""
    batch, channels, height, width = embedding.shape
    if dim == channels:
        return embedding
    flat = embedding.permute(0, 2, 3, 1).reshape(-1, 1, channels)
    reduced = F.adaptive_avg_pool1d(flat, dim)
    return reduced.reshape(batch, height, width, dim).permute(0, 3, 1, 2)
