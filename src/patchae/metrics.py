"""Evaluation metrics for anomaly detection: image/pixel AUROC, F1-max and the MVTec AUPRO.

Scores are "higher = more anomalous" and may be any real numbers (distances, not probabilities): every
torchmetrics object here is built with ``normalization=None`` so torchmetrics never squashes them through a
sigmoid (which, in float32, collapses all scores above ~17 into ties).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torchmetrics.classification import BinaryAUROC, BinaryPrecisionRecallCurve

from patchae.distributed import all_gather_objects, first_of_each, world_size
from patchae.errors import PatchAEError

log = logging.getLogger(__name__)

# 8-connectivity inside each image, no connectivity across the stacked image axis.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True

_BINNED_UPDATE_CHUNK = 1 << 20

ArrayLike = Tensor | np.ndarray


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_maps(x: ArrayLike, name: str) -> np.ndarray:
    """Return a (N,H,W) array, accepting (H,W) and (N,1,H,W) too."""
    arr = _to_numpy(x)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"{name} must have shape (N,H,W), got {tuple(arr.shape)}")
    return arr


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise PatchAEError(
            f"metrics fpr_limit must be in (0, 1], got {fpr_limit}; the MVTec convention is 0.3"
        )


def _flatten_with_regions(
    map_batches: Sequence[np.ndarray], mask_batches: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Flatten (N,H,W) batches into pixel scores and per-pixel region ids (0 = normal, 1..R = defect regions).

    Regions are the 8-connected components of each image's mask; ids are unique over all batches.
    """
    scores, regions = [], []
    offset = 0
    for maps, masks in zip(map_batches, mask_batches, strict=True):
        if maps.shape != masks.shape:
            raise ValueError(f"anomaly maps {maps.shape} and masks {masks.shape} must have the same shape")
        labels, count = ndimage.label(masks.astype(bool, copy=False), structure=_REGION_STRUCTURE)
        labels = labels.astype(np.int32, copy=False).ravel()
        if offset:
            labels[labels > 0] += offset
        offset += count
        scores.append(np.ascontiguousarray(maps, dtype=np.float32).ravel())
        regions.append(labels)
    return np.concatenate(scores), np.concatenate(regions)


def _pro_curve(scores: np.ndarray, regions: np.ndarray, fpr_limit: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO-vs-FPR curve, starting at (0, 0), up to the first point with FPR >= ``fpr_limit``.

    Pixels are sorted by descending score once; every normal pixel adds ``1/n_normal`` to the FPR and every
    defect pixel of region ``r`` adds ``1/(R*|r|)`` to the PRO (mean overlap over all R regions). The curve
    has one point per distinct score (the end of each tie group).
    """
    sizes = np.bincount(regions)
    n_normal, n_regions = int(sizes[0]), len(sizes) - 1
    region_weight = np.zeros(len(sizes), dtype=np.float64)
    region_weight[1:] = 1.0 / (n_regions * sizes[1:].astype(np.float64))

    sorted_scores, order = torch.sort(torch.from_numpy(scores), descending=True)
    sorted_regions = regions[order.numpy()]
    del order
    count_dtype = np.int32 if len(scores) < np.iinfo(np.int32).max else np.int64
    fp_count = np.cumsum(sorted_regions == 0, dtype=count_dtype)

    # Only the prefix up to (the tie group of) the first pixel reaching fpr_limit is needed.
    cut = int(np.searchsorted(fp_count, fpr_limit * n_normal, side="left"))
    cut = min(cut, len(scores) - 1)
    cut_score = sorted_scores[cut]
    cut += int((sorted_scores[cut:] == cut_score).sum()) - 1

    prefix_scores = sorted_scores[: cut + 1].numpy()
    pro = np.cumsum(region_weight[sorted_regions[: cut + 1]])
    group_ends = np.append(np.flatnonzero(prefix_scores[1:] != prefix_scores[:-1]), cut)

    fpr = np.concatenate([[0.0], fp_count[group_ends] / n_normal])
    pro = np.concatenate([[0.0], pro[group_ends]])
    return fpr, pro


def _normalized_area(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Area under the curve on [0, fpr_limit] (interpolated exactly at the limit), divided by ``fpr_limit``."""
    end = int(np.searchsorted(fpr, fpr_limit, side="left"))
    if end >= len(fpr):  # curve stops short of the limit (cannot happen with fpr_limit <= 1): extend flat
        x, y = np.append(fpr, fpr_limit), np.append(pro, pro[-1])
    else:
        x0, x1, y0, y1 = fpr[end - 1], fpr[end], pro[end - 1], pro[end]
        y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x, y = np.append(fpr[:end], fpr_limit), np.append(pro[:end], y_limit)
    return float(np.trapezoid(y, x) / fpr_limit)


def _aupro_from_batches(
    map_batches: Sequence[np.ndarray], mask_batches: Sequence[np.ndarray], fpr_limit: float
) -> float:
    scores, regions = _flatten_with_regions(map_batches, mask_batches)
    if scores.size == 0 or not (regions > 0).any():
        log.warning("AUPRO is undefined without defect pixels in the ground-truth masks; returning nan")
        return float("nan")
    if not (regions == 0).any():
        log.warning("AUPRO is undefined without normal pixels in the ground-truth masks; returning nan")
        return float("nan")
    if not np.isfinite(scores).all():
        log.warning("anomaly maps contain nan/inf values; AUPRO is nan")
        return float("nan")
    fpr, pro = _pro_curve(scores, regions, fpr_limit)
    return _normalized_area(fpr, pro, fpr_limit)


def aupro(anomaly_maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised so a perfect map scores 1.0.

    Args:
        anomaly_maps: (N,H,W) scores, higher = more anomalous.
        masks: (N,H,W) ground truth, non-zero = defect. Each 8-connected component of each image is one
            region; PRO is the mean over all regions of the fraction of the region above the threshold.
        fpr_limit: upper FPR bound of the integral (false positives counted on all mask==0 pixels).

    Returns:
        The normalised area, or nan when there are no defect (or no normal) pixels.
    """
    _check_fpr_limit(fpr_limit)
    maps_np, masks_np = _as_maps(anomaly_maps, "anomaly_maps"), _as_maps(masks, "masks")
    return _aupro_from_batches([maps_np], [masks_np != 0], fpr_limit)


def f1_max(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold achieving it (a sample is positive when score >= it).

    Returns (nan, nan) when there are no positive labels.
    """
    scores_t = torch.as_tensor(_to_numpy(scores)).flatten().to(torch.float64)
    labels_t = torch.as_tensor(_to_numpy(labels)).flatten().to(torch.long)
    if scores_t.numel() != labels_t.numel():
        raise ValueError(f"scores ({scores_t.numel()}) and labels ({labels_t.numel()}) differ in length")
    if not bool((labels_t == 1).any()):
        return float("nan"), float("nan")
    curve = BinaryPrecisionRecallCurve(thresholds=None, normalization=None, validate_args=False)
    precision, recall, thresholds = curve(scores_t, labels_t)
    thresholds = thresholds.reshape(-1)  # a 0-dim tensor when every score is the same
    # The last (precision=1, recall=0) point has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    f1 = (2 * precision * recall / (precision + recall)).nan_to_num(0.0)
    best = int(torch.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def _exact_auroc(scores: Tensor, target: Tensor) -> float:
    metric = BinaryAUROC(thresholds=None, normalization=None, validate_args=False)
    metric.update(scores, target)
    return float(metric.compute())


def _binned_auroc(scores: Tensor, target: Tensor, num_thresholds: int) -> float:
    """AUROC on ``num_thresholds`` equally spaced thresholds between the min and max score (fixed memory)."""
    low, high = float(scores.min()), float(scores.max())
    scale = 1.0 / (high - low) if high > low else 0.0
    metric = BinaryAUROC(thresholds=num_thresholds, normalization=None, validate_args=False)
    for start in range(0, scores.numel(), _BINNED_UPDATE_CHUNK):
        chunk = scores[start : start + _BINNED_UPDATE_CHUNK]
        metric.update(((chunk - low) * scale).clamp_(0.0, 1.0), target[start : start + _BINNED_UPDATE_CHUNK])
    return float(metric.compute())


class AnomalyMetrics:
    """Accumulates image scores and anomaly maps on CPU, then computes every evaluation metric at once.

    Pixel metrics use only images whose ground-truth mask is known (``has_mask``); an anomalous image
    without a mask file must be marked ``has_mask=False`` so its pixels are not counted as normal.

    Under DDP every process updates with its share of the split (and its sampler's repeated samples):
    :meth:`gather` then gives every process all samples, once each, in dataset order (``indices``).

    Args:
        fpr_limit: FPR bound of the AUPRO integral.
        pixel_thresholds: None for the exact pixel AUROC (sorts all pixels; fine up to ~10M pixels), or a
            number of equally spaced thresholds for a binned AUROC in fixed memory.
    """

    def __init__(self, fpr_limit: float = 0.3, pixel_thresholds: int | None = None) -> None:
        _check_fpr_limit(fpr_limit)
        if pixel_thresholds is not None and pixel_thresholds < 2:
            raise PatchAEError(f"pixel_thresholds must be None (exact) or >= 2, got {pixel_thresholds}")
        self.fpr_limit = fpr_limit
        self.pixel_thresholds = pixel_thresholds
        self.reset()

    def reset(self) -> None:
        self._scores: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._maps: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._indices: list[Tensor] = []  # dataset index of every score ...
        self._map_indices: list[Tensor] = []  # ... and of every map
        self._indices_missing = False

    def update(
        self,
        image_scores: Tensor,
        labels: Tensor,
        anomaly_maps: Tensor | None = None,
        masks: Tensor | None = None,
        has_mask: Tensor | None = None,
        indices: Tensor | None = None,
    ) -> None:
        """Add a batch. Maps/masks are (B,H,W) or (B,1,H,W); masks non-zero = defect. ``indices``: the
        dataset index of each image, needed only by :meth:`gather` on several processes."""
        scores = image_scores.detach().flatten().to("cpu", torch.float64)
        batch_labels = labels.detach().flatten().to("cpu", torch.long)
        if scores.numel() != batch_labels.numel():
            raise ValueError(f"image_scores ({scores.numel()}) and labels ({batch_labels.numel()}) differ")
        if indices is None:  # fine in one process, where arrival order is dataset order
            self._indices_missing = True
            start = sum(len(batch) for batch in self._indices)
            batch_indices = torch.arange(start, start + scores.numel())
        else:
            batch_indices = indices.detach().flatten().to("cpu", torch.long)
        self._scores.append(scores)
        self._labels.append(batch_labels)
        self._indices.append(batch_indices)
        if anomaly_maps is None or masks is None:
            return
        maps_np = _as_maps(anomaly_maps, "anomaly_maps").astype(np.float32, copy=False)
        masks_np = _as_maps(masks, "masks") > 0.5
        if maps_np.shape != masks_np.shape or maps_np.shape[0] != scores.numel():
            raise ValueError(
                f"anomaly maps {maps_np.shape}, masks {masks_np.shape} and {scores.numel()} scores do not match"
            )
        if has_mask is not None:
            keep = has_mask.detach().flatten().cpu().numpy().astype(bool)
            maps_np, masks_np = maps_np[keep], masks_np[keep]
            batch_indices = batch_indices[torch.from_numpy(keep)]
        if len(maps_np):
            self._maps.append(np.array(maps_np, dtype=np.float32, copy=True))
            self._masks.append(np.array(masks_np, copy=True))
            self._map_indices.append(batch_indices)

    def gather(self) -> None:
        """On several processes (DDP): replace this process's share by every process's samples, each dataset
        index once, in index order, so :meth:`compute` gives every process the metrics of the whole split.
        A no-op in a single process."""
        if world_size() == 1:
            return
        if self._indices_missing:
            raise PatchAEError(
                f"evaluating on {world_size()} processes needs the dataset index of every image "
                "(an 'index' in each batch) to drop the sampler's repeated images; evaluate on one device"
            )
        state = (self._scores, self._labels, self._indices, self._maps, self._masks, self._map_indices)
        shares = all_gather_objects(state)
        scores, labels, indices = (
            torch.cat([t for share in shares for t in share[i]] or [torch.empty(0)]) for i in range(3)
        )
        keep = first_of_each(indices.long())
        self._scores, self._labels, self._indices = (
            [scores[keep]],
            [labels[keep].long()],
            [indices[keep].long()],
        )
        # Maps one image each (sizes may differ between batches), then stacked again where they all agree.
        maps = [image for share in shares for batch in share[3] for image in batch]
        masks = [image for share in shares for batch in share[4] for image in batch]
        map_indices = torch.cat(
            [t for share in shares for t in share[5]] or [torch.empty(0, dtype=torch.long)]
        )
        keep = first_of_each(map_indices).tolist()
        self._maps, self._masks = [maps[i][None] for i in keep], [masks[i][None] for i in keep]
        self._map_indices = [map_indices[keep]]
        if len({image.shape for image in self._maps}) == 1:
            self._maps, self._masks = [np.concatenate(self._maps)], [np.concatenate(self._masks)]

    def scores_and_labels(self) -> tuple[Tensor, Tensor]:
        """All image scores (float64) and labels so far, in arrival order (dataset order after ``gather``)."""
        if not self._scores:
            return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.long)
        return torch.cat(self._scores), torch.cat(self._labels)

    def compute(self) -> dict[str, float]:
        """Return image_auroc, image_f1_max, image_f1_threshold, pixel_auroc and aupro (nan when undefined)."""
        nan = float("nan")
        result = {"image_auroc": nan, "image_f1_max": nan, "image_f1_threshold": nan}
        result.update(self._image_metrics())
        result["pixel_auroc"], result["aupro"] = self._pixel_metrics()
        return result

    def _image_metrics(self) -> dict[str, float]:
        if not self._scores:
            log.warning("no images were evaluated; image metrics are nan")
            return {}
        scores, labels = torch.cat(self._scores), torch.cat(self._labels)
        if not bool(torch.isfinite(scores).all()):
            log.warning("image scores contain nan/inf values; image metrics are nan")
            return {}
        n_anomalous = int((labels == 1).sum())
        if n_anomalous == 0 or n_anomalous == labels.numel():
            kind = "anomalous" if n_anomalous == 0 else "normal"
            log.warning("the evaluated images contain no %s image; image AUROC and F1 are nan", kind)
            return {}
        best_f1, threshold = f1_max(scores, labels)
        return {
            "image_auroc": _exact_auroc(scores, labels),
            "image_f1_max": best_f1,
            "image_f1_threshold": threshold,
        }

    def _pixel_metrics(self) -> tuple[float, float]:
        nan = float("nan")
        if not self._maps:
            log.warning("no images with known ground-truth masks; pixel_auroc and aupro are nan")
            return nan, nan
        defect = sum(int(m.sum()) for m in self._masks)
        total = sum(m.size for m in self._masks)
        if defect == 0 or defect == total:
            kind = "defect" if defect == 0 else "normal"
            log.warning("the ground-truth masks contain no %s pixel; pixel_auroc and aupro are nan", kind)
            return nan, nan
        if not all(np.isfinite(m).all() for m in self._maps):
            log.warning("anomaly maps contain nan/inf values; pixel_auroc and aupro are nan")
            return nan, nan

        pixel_scores = torch.from_numpy(np.concatenate([m.ravel() for m in self._maps]))
        pixel_target = torch.from_numpy(np.concatenate([m.ravel() for m in self._masks]).view(np.uint8))
        if self.pixel_thresholds is None:
            pixel_auroc = _exact_auroc(pixel_scores, pixel_target)
        else:
            pixel_auroc = _binned_auroc(pixel_scores, pixel_target, self.pixel_thresholds)
        del pixel_scores, pixel_target
        return pixel_auroc, _aupro_from_batches(self._maps, self._masks, self.fpr_limit)


def nan_safe_mean(values: Sequence[float]) -> float:
    """Mean of the finite values (e.g. a metric over categories), nan if none is finite."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")
