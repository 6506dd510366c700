"""Greedy k-center coreset selection (PatchCore's memory-bank subsampling)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from torch import Tensor

from patchae.errors import PatchAEError

log = logging.getLogger(__name__)

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


def project_features(features: Tensor, projection_dim: int | None, seed: int) -> Tensor:
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


CORESET_METHODS = ("auto", "greedy", "partitioned")

# method="auto" picks exact greedy when its predicted time is at most this many seconds, else partitioned.
DEFAULT_GREEDY_SECONDS = 20.0
# Rows of the two random samples on which auto runs exact greedy to see how much it prunes.
_SAMPLE_ROWS = (4096, 16384)
# The samples' rows fit in the CPU's cache, a whole bank's do not: measured per row, exact greedy on the whole
# bank ran slower than the samples predicted, the more so the larger the bank (2 AMD EPYC cores: 2.2x on bottle's
# 147k vectors, 2.5x on 157k generated-texture vectors, 4.7x on bottle's 1.18M vectors under 8 rotations / flips;
# docs/results.md "Coreset at scale"). Fitted: 2.5 x (N / 150k) ** 0.3 from 150k rows on.
_WHOLE_BANK_SLOWDOWN = 2.5
_SLOWDOWN_ROWS = 150_000
_SLOWDOWN_GROWTH = 0.3


def whole_bank_slowdown(num: int) -> float:
    """How many times slower per measured row exact greedy runs on ``num`` rows than on the cached samples."""
    return _WHOLE_BANK_SLOWDOWN * max(1.0, num / _SLOWDOWN_ROWS) ** _SLOWDOWN_GROWTH


# From this many rows on, exact greedy on a CPU skips the rows a new center cannot be nearer to (see
# _pruned_greedy); below it, its per-step bookkeeping costs more than updating every row.
_PRUNED_MIN_ROWS = 10_000

# Mean vectors per k-means cell of the partitioned method: a step then reads one cell (4 MB at 128-d, within a
# CPU's last-level cache) instead of all N vectors, and the selection costs about N x ratio x part size
# distance terms instead of N x ratio x N.
DEFAULT_PART_SIZE = 8192


def greedy_coreset(
    features: Tensor,
    ratio: float | None = None,
    size: int | None = None,
    projection_dim: int | None = 128,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    method: str = "greedy",
    part_size: int = DEFAULT_PART_SIZE,
    greedy_seconds: float = DEFAULT_GREEDY_SECONDS,
) -> Tensor:
    """Select a subset of rows that covers ``features`` well (greedy farthest-point / k-center).

    Starting from a seeded random row, each step adds the row farthest from everything selected so far,
    which greedily minimises the covering radius max_i min_j ||x_i - c_j||. Runs on ``features.device``
    and uses O(N) memory beyond the projected features: distances to the newest center are one
    matrix-vector product, never an N x N matrix.

    ``method="greedy"`` is exact: on a GPU it updates all N rows at each step (cost N x size); on a CPU,
    for banks of 10k rows or more, it skips the rows the newest center provably cannot be nearer to
    (triangle inequality; same selection), which measures only ~1-3 % of the rows per step on real patch
    features. ``method="partitioned"`` first splits
    the rows into about N / ``part_size`` k-means cells (faiss), then runs the same greedy over all cells
    at once with one approximation: a row's distance counts only the centers of its own cell. Each step then
    updates one cell, not all N rows (about N / part_size times less work: ~60x for 1M rows), and the
    covering radius stays close to exact greedy's, because a row's nearest center is nearly always in its
    own cell. Random cells instead (tried) cover like a random subset: each would hold only size / cells
    centers for the same volume. A bank of fewer than 1.5 x ``part_size`` rows is one cell: exact greedy.
    ``method="auto"`` predicts exact greedy's time (:func:`choose_method`) and runs it when that is at most
    ``greedy_seconds``, else the partitioned method; it logs which and why.

    Args:
        features: (N, D) patch features.
        ratio: fraction of rows to keep, in (0, 1]. Exactly one of ``ratio`` / ``size``.
        size: number of rows to keep; >= N keeps all.
        projection_dim: random Gaussian projection size used for the distances (None = none).
        seed: seeds the projection, the first center (of each cell) and the k-means.
        progress: called as ``progress(done, total)`` about every 1% of the selection.
        method: "greedy" (exact, over all rows), "partitioned" (inside k-means cells) or "auto".
        part_size: mean rows per cell of the partitioned method.
        greedy_seconds: auto: the longest predicted exact-greedy time that is still run.

    Returns:
        CPU int64 indices (size,), in selection order (greedy: every prefix is itself a greedy coreset).
    """
    check_coreset_method(method, part_size)
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

    points = project_features(features, projection_dim, seed)
    if method == "auto":
        method, reason = choose_method(points, target, seed, part_size, greedy_seconds)
        log.info("coreset: %s (bank.coreset_method=auto): %s", method, reason)
    generator = torch.Generator().manual_seed(seed)
    counter = _ProgressCounter(target, progress)
    num_cells = 1 if method == "greedy" else min(target, round(num / part_size))
    if num_cells <= 1:
        return _greedy_select(points, target, generator, counter).cpu()
    cells = [_Cell(points[rows], rows, generator) for rows in _kmeans_cells(points, num_cells, seed)]
    return _select_across_cells(cells, target, counter).cpu()


@dataclass(frozen=True)
class GreedyForecast:
    """Exact greedy's predicted CPU cost on a bank, from two samples (:func:`forecast_greedy`)."""

    seconds: float
    rows_per_step: float  # share of the bank's rows it measures per step, in [0, 1]
    samples: tuple[int, ...]  # rows of the samples it ran on


def forecast_greedy(points: Tensor, target: int, seed: int = 0) -> GreedyForecast:
    """Predicted time of exact greedy selecting ``target`` of ``points`` (projected, float32) on a CPU.

    Its cost is the rows it must measure per step (how much the triangle inequality prunes) times its steps.
    Pruning depends on the data: smooth surfaces whose patches lie near a few directions prune ~99 %, fine
    uniform textures almost nothing. So exact greedy runs on two random samples (4k and 16k rows, at the
    same ratio, i.e. the same rows per center); the growth of rows per step between them, as a power of the
    sample size, extrapolates it to all N rows, and the two timings give the seconds per step and per
    measured row. A first sample that barely prunes ends it: the growth is then taken as linear.
    """
    num = points.shape[0]
    ratio = target / num
    generator = torch.Generator().manual_seed(seed)
    samples = []  # (rows, steps, rows measured, seconds)
    for size in _SAMPLE_ROWS:
        size = min(size, num)
        sample = points[torch.randperm(num, generator=generator)[:size]].cpu()
        sample -= sample.mean(dim=0)
        steps = max(2, round(ratio * size))
        counter = _ProgressCounter(steps, None)
        start = time.perf_counter()
        _pruned_greedy(sample.numpy(), steps, 0, counter)
        samples.append((size, steps, counter.measured, time.perf_counter() - start))
        if counter.measured > 0.5 * steps * size:
            break
    (size_a, steps_a, measured_a, seconds_a), (size_b, steps_b, measured_b, seconds_b) = (
        samples if len(samples) == 2 else samples * 2
    )
    per_step_a, per_step_b = measured_a / steps_a, measured_b / steps_b
    growth = 1.0 if size_a == size_b else math.log(per_step_b / per_step_a) / math.log(size_b / size_a)
    per_step = min(float(num), per_step_b * (num / size_b) ** min(1.0, max(0.0, growth)))
    # seconds = steps x overhead + rows measured / rate, solved from the two samples
    step_seconds, row_seconds = 0.0, seconds_b / measured_b
    determinant = steps_a * measured_b - steps_b * measured_a
    if len(samples) == 2 and determinant != 0:
        step_seconds = (seconds_a * measured_b - seconds_b * measured_a) / determinant
        row_seconds = (steps_a * seconds_b - steps_b * seconds_a) / determinant
        if step_seconds < 0 or row_seconds <= 0:  # noisy timings: all cost per row (an upper bound)
            step_seconds, row_seconds = 0.0, max(seconds_a / measured_a, seconds_b / measured_b)
    seconds = target * (step_seconds + per_step * row_seconds)
    if num > size_b:
        seconds *= whole_bank_slowdown(num)
    return GreedyForecast(seconds, per_step / num, tuple(sample[0] for sample in samples))


def choose_method(
    points: Tensor,
    target: int,
    seed: int = 0,
    part_size: int = DEFAULT_PART_SIZE,
    greedy_seconds: float = DEFAULT_GREEDY_SECONDS,
) -> tuple[str, str]:
    """``("greedy" | "partitioned", why)`` for selecting ``target`` of ``points`` (projected, float32):
    exact greedy where :func:`forecast_greedy` predicts at most ``greedy_seconds``. On a GPU exact greedy
    updates every row in a few kernels per step: it is always chosen there."""
    num = points.shape[0]
    if points.device.type != "cpu":
        return "greedy", "on the GPU exact greedy updates all rows in a few kernels per step"
    if num < max(1.5 * part_size, 2 * _SAMPLE_ROWS[-1]):
        return "greedy", f"{num} vectors are few: exact greedy takes seconds"
    forecast = forecast_greedy(points, target, seed)
    sampled = " and ".join(str(size) for size in forecast.samples)
    why = (
        f"exact greedy would measure ~{100 * forecast.rows_per_step:.1f} % of the {num} vectors per step "
        f"(predicted {forecast.seconds:.0f} s from samples of {sampled} vectors)"
    )
    if forecast.seconds <= greedy_seconds:
        return "greedy", f"{why}, within bank.coreset_greedy_seconds={greedy_seconds:g}"
    return "partitioned", f"{why}, over bank.coreset_greedy_seconds={greedy_seconds:g}"


def _kmeans_cells(points: Tensor, num_cells: int, seed: int) -> list[Tensor]:
    """Row indices of each non-empty cell of a k-means clustering of ``points`` (faiss, on CPU)."""
    data = points.detach().cpu().numpy()
    kmeans = faiss.Kmeans(data.shape[1], num_cells, niter=10, seed=seed)
    kmeans.train(data)
    labels = torch.from_numpy(kmeans.index.search(data, 1)[1][:, 0]).to(points.device)
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=num_cells).tolist()
    return [rows for rows in order.split(counts) if len(rows)]


class _Cell:
    """One k-means cell's points, the greedy state inside it, and its first center (a seeded random row)."""

    def __init__(self, points: Tensor, rows: Tensor, generator: torch.Generator) -> None:
        self.points, self.rows = points - points.mean(dim=0), rows
        self.squared_norms = self.points.pow(2).sum(dim=1)
        self.min_distance = torch.full((len(rows),), float("inf"), device=points.device)
        self.next = torch.randint(len(rows), (1,), generator=generator).to(points.device)[0]

    def take(self) -> tuple[Tensor, Tensor]:
        """Select the cell's farthest row; return its global index and the cell's new largest distance."""
        current = self.next
        center = self.points[current]
        distance = torch.addmv(self.squared_norms, self.points, center, alpha=-2.0).add_(center.dot(center))
        torch.minimum(self.min_distance, distance.clamp_(min=0.0), out=self.min_distance)
        self.min_distance[current] = -1.0
        self.next = torch.argmax(self.min_distance)
        return self.rows[current], self.min_distance[self.next]


def _select_across_cells(cells: list[_Cell], target: int, counter: _ProgressCounter) -> Tensor:
    """Greedy farthest-point over all cells, each vector's distance counting only its own cell's centers:
    every step pays for one cell, not for all N vectors."""
    device = cells[0].points.device
    selected = torch.empty(target, dtype=torch.long, device=device)
    largest = torch.full((len(cells),), float("inf"), device=device)  # inf: the cell has no center yet
    with torch.no_grad():
        for step in range(target):
            cell = int(torch.argmax(largest))
            selected[step], largest[cell] = cells[cell].take()
            counter.step()
    return selected


def check_coreset_method(method: str, part_size: int = DEFAULT_PART_SIZE) -> None:
    """A :class:`PatchAEError` for an unknown ``bank.coreset_method`` or a part size below 1."""
    if method not in CORESET_METHODS:
        raise PatchAEError(
            f"bank.coreset_method must be one of {', '.join(CORESET_METHODS)}, got {method!r}; "
            "use auto (the default), greedy (exact) or partitioned (fast on millions of vectors)"
        )
    if isinstance(part_size, bool) or not isinstance(part_size, int) or part_size < 1:
        raise PatchAEError(f"bank.coreset_part_size must be a positive integer, got {part_size!r}")


def _shares(total: int, sizes: list[int]) -> list[int]:
    """``total`` split in proportion to ``sizes`` (largest remainders get the leftovers)."""
    exact = [total * size / sum(sizes) for size in sizes]
    shares = [int(share) for share in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: shares[i] - exact[i])
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


class _ProgressCounter:
    """Calls ``progress(done, total)`` about every 1% of ``total`` steps, across parts."""

    def __init__(self, total: int, progress: ProgressCallback | None) -> None:
        self.total, self.progress, self.done = total, progress, 0
        self.measured = 0  # rows whose distance exact greedy computed (what choose_method extrapolates)
        self.every = max(1, total // 100)

    def step(self) -> None:
        self.done += 1
        if self.progress is not None and (self.done % self.every == 0 or self.done == self.total):
            self.progress(self.done, self.total)


def _greedy_select(
    points: Tensor, target: int, generator: torch.Generator, counter: _ProgressCounter
) -> Tensor:
    """Exact greedy farthest-point selection of ``target`` rows of ``points`` (float32, modified in place)."""
    # Centering shrinks the norms, and with them the cancellation error of the norm identity used below.
    points -= points.mean(dim=0)
    first = int(torch.randint(points.shape[0], (1,), generator=generator))
    with torch.no_grad():
        if points.device.type == "cpu" and points.shape[0] >= _PRUNED_MIN_ROWS:
            return torch.from_numpy(_pruned_greedy(points.numpy(), target, first, counter))
        return _dense_greedy(points, target, first, counter)


def _dense_greedy(points: Tensor, target: int, first: int, counter: _ProgressCounter) -> Tensor:
    """Greedy farthest-point that updates every row's distance at every step: N x target distance terms, in
    a few large kernels per step (the fast way on a GPU)."""
    num = points.shape[0]
    squared_norms = points.pow(2).sum(dim=1)
    selected = torch.empty(target, dtype=torch.long, device=points.device)
    min_distance = torch.full((num,), float("inf"), dtype=torch.float32, device=points.device)
    current = torch.tensor(first, device=points.device)
    for step in range(target):
        selected[step] = current
        center = points[current]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, clamped: rounding can make it slightly negative.
        distance = torch.addmv(squared_norms, points, center, alpha=-2.0).add_(center.dot(center))
        torch.minimum(min_distance, distance.clamp_(min=0.0), out=min_distance)
        # Already-selected rows must never win again, even when all remaining rows are duplicates.
        min_distance[current] = -1.0
        current = torch.argmax(min_distance)
        counter.step()
    return selected


def _matvec(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    # torch's matrix-vector product: numpy's BLAS may spin up threads that fight the caller's for small sizes.
    return torch.mv(torch.from_numpy(matrix), torch.from_numpy(vector)).numpy()


def _pruned_greedy(points: np.ndarray, target: int, first: int, counter: _ProgressCounter) -> np.ndarray:
    """The same selection as :func:`_dense_greedy` (up to float rounding in near-ties), skipping the rows
    that the newest center provably cannot bring nearer: ~10x less work on real banks, more as N grows.

    Every row belongs to the group of its nearest center so far. By the triangle inequality a row x of center
    a's group can only get nearer to a new center c when ||a - c|| < 2 ||x - a||, so a group whose farthest
    row is within ||a - c|| / 2 of a is skipped whole, and of the other groups only the rows that pass the
    same test are measured. Squared distances throughout; ``tolerance`` keeps rounding from skipping a row
    that the exact test would keep.
    """
    num, dim = points.shape
    squared_norms = np.einsum("ij,ij->i", points, points)
    selected = np.empty(target, dtype=np.int64)
    centers = np.empty((target, dim), dtype=np.float32)
    center_norms = np.empty(target, dtype=np.float32)
    radius = np.full(target, -1.0, dtype=np.float32)  # each group's largest squared distance (-1: none left)
    farthest = np.zeros(target, dtype=np.int64)  # the row that has it
    group = np.full(num, -1, dtype=np.int64)  # each row's nearest center so far
    members: list[np.ndarray] = []  # each group's rows (filtered lazily: rows that moved away are dropped)
    min_distance = np.full(num, np.inf, dtype=np.float32)
    current, source = first, -1
    for step in range(target):
        selected[step] = current
        center, center_norm = points[current], float(squared_norms[current])
        centers[step], center_norms[step] = center, center_norm
        min_distance[current] = -1.0  # selected rows never win again, even among duplicates
        if step == 0:
            rows = np.arange(num)
        else:
            gaps = center_norms[:step] - 2.0 * _matvec(centers[:step], center) + center_norm
            gaps -= 1e-5 * (center_norms[:step] + center_norm) + 1e-6  # tolerance: never skip too much
            candidates = np.flatnonzero(gaps < 4.0 * radius[:step])
            groups = [members[a] for a in candidates.tolist()]
            rows = np.concatenate(groups)
            gap = np.repeat(gaps[candidates], [len(g) for g in groups])
            rows = rows[4.0 * min_distance[rows] > gap]
        distance = squared_norms[rows] - 2.0 * _matvec(points[rows], center) + center_norm
        counter.measured += len(rows)
        closer = distance < min_distance[rows]
        moved = rows[closer]
        min_distance[moved] = np.maximum(distance[closer], 0.0)
        left = group[moved]
        group[moved] = step
        changed = set(np.unique(left[left >= 0]).tolist()) | ({source} if source >= 0 else set())
        for a in changed:  # groups that lost rows (or the new center's old group): new radius
            rows_left = members[a] = members[a][group[members[a]] == a]
            _update_radius(a, rows_left, min_distance, radius, farthest)
        members.append(moved)
        _update_radius(step, moved, min_distance, radius, farthest)
        source = int(np.argmax(radius[: step + 1]))
        current = int(farthest[source])
        counter.step()
    return selected


def _update_radius(
    group: int, rows: np.ndarray, min_distance: np.ndarray, radius: np.ndarray, farthest: np.ndarray
) -> None:
    if len(rows) == 0:
        radius[group] = -1.0
        return
    far = int(np.argmax(min_distance[rows]))
    farthest[group], radius[group] = rows[far], min_distance[rows[far]]
