"""Greedy k-center coreset selection (PatchCore's memory-bank subsampling)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from patchae.errors import PatchAEError

ProgressCallback = Callable[[int, int], None]

# Rows per chunk when projecting features, to bound the temporary float32 copies.
_PROJECTION_CHUNK = 65536


def coreset_size(num_features: int, ratio: float | None = None, size: int | None = None) -> int:
    """Number of vectors to keep for ``ratio`` (fraction in (0, 1]) or an explicit ``size``."""
    if (ratio is None) == (size is None):
        raise ValueError("give exactly one of ratio or size")
    if ratio is not None:
        if not 0.0 < ratio <= 1.0:
            raise PatchAEError(
                f"bank.coreset_ratio must be in (0, 1], got {ratio}; use e.g. 0.1 to keep 10% of the patches"
            )
        return max(1, min(num_features, round(num_features * ratio)))
    if size is None or size < 1:
        raise PatchAEError(f"bank.coreset_size must be a positive integer, got {size}")
    return min(num_features, size)


def _project(features: Tensor, projection_dim: int | None, seed: int) -> Tensor:
    """A new float32 copy of the features, randomly projected to ``projection_dim`` when that is smaller than D.

    A Gaussian random projection approximately preserves pairwise distances (Johnson-Lindenstrauss),
    which is all the farthest-point search needs, and makes each step ~D/projection_dim times cheaper.
    """
    num, dim = features.shape
    if projection_dim is None or dim <= projection_dim:
        return features.to(torch.float32, copy=True).contiguous()
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(dim, projection_dim, generator=generator) / projection_dim**0.5
    matrix = matrix.to(features.device)
    projected = torch.empty(num, projection_dim, dtype=torch.float32, device=features.device)
    for start in range(0, num, _PROJECTION_CHUNK):
        chunk = features[start : start + _PROJECTION_CHUNK].to(torch.float32)
        torch.matmul(chunk, matrix, out=projected[start : start + _PROJECTION_CHUNK])
    return projected


def greedy_coreset(
    features: Tensor,
    ratio: float | None = None,
    size: int | None = None,
    projection_dim: int | None = 128,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> Tensor:
    """Select a subset of rows that covers ``features`` well (greedy farthest-point / k-center).

    Starting from a seeded random row, each step adds the row farthest from everything selected so far,
    which greedily minimises the covering radius max_i min_j ||x_i - c_j||. Runs on ``features.device``
    (a GPU makes large banks much faster) and uses O(N) memory beyond the projected features: the
    distance to the newest center is one matrix-vector product, never an N x N matrix.

    Args:
        features: (N, D) patch features.
        ratio: fraction of rows to keep, in (0, 1]. Exactly one of ``ratio`` / ``size``.
        size: number of rows to keep; >= N keeps all.
        projection_dim: random Gaussian projection size used for the distances (None = none).
        seed: seeds both the projection and the first center.
        progress: called as ``progress(done, total)`` about every 1% of the selection.

    Returns:
        CPU int64 indices (size,), in selection order (every prefix is itself a greedy coreset).
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    num = features.shape[0]
    if num == 0:
        raise PatchAEError("cannot build a memory bank from 0 feature vectors; is the training set empty?")
    target = coreset_size(num, ratio, size)
    if target >= num:
        if progress is not None:
            progress(num, num)
        return torch.arange(num, dtype=torch.long)

    points = _project(features, projection_dim, seed)
    # Centering shrinks the norms, and with them the cancellation error of the norm identity below.
    points -= points.mean(dim=0)
    squared_norms = points.pow(2).sum(dim=1)
    generator = torch.Generator().manual_seed(seed)
    first = int(torch.randint(num, (1,), generator=generator))

    selected = torch.empty(target, dtype=torch.long, device=points.device)
    min_distance = torch.full((num,), float("inf"), dtype=torch.float32, device=points.device)
    report_every = max(1, target // 100)
    current = torch.tensor(first, device=points.device)
    with torch.no_grad():
        for step in range(target):
            selected[step] = current
            center = points[current]
            # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, clamped: rounding can make it slightly negative.
            distance = torch.addmv(squared_norms, points, center, alpha=-2.0).add_(center.dot(center))
            torch.minimum(min_distance, distance.clamp_(min=0.0), out=min_distance)
            # Already-selected rows must never win again, even when all remaining rows are duplicates.
            min_distance[current] = -1.0
            current = torch.argmax(min_distance)
            if progress is not None and ((step + 1) % report_every == 0 or step + 1 == target):
                progress(step + 1, target)
    return selected.cpu()
