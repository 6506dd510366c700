"""The config groups a model is built from, as the groups of conf/train.yaml: ``scoring``, ``bank``,
``threshold`` and ``preprocessing`` (the last one derived from ``data.*``).

Each model takes them as mappings (what Hydra passes and what model.ckpt saves) and reads them here, so a key
that does not belong to a group, or a value out of range, is one line naming the override to fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from patchae.errors import PatchAEError, finite_number

# max: the map's maximum (Patch AE, PatchCore's default here) | topk: mean of the top_k share of map pixels |
# reweight: PatchCore's Eq. 7, which needs the patch features and the bank (see patchae.scoring.bank).
IMAGE_SCORES = ("max", "topk", "reweight")
SEARCHES = ("faiss", "torch")
THRESHOLD_METHODS = ("f1", "quantile")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Settings = TypeVar("Settings")


def read_group(cls: type[Settings], values: Mapping[str, Any] | Settings | None, group: str) -> Settings:
    """``values`` (a mapping, or already the dataclass) as the dataclass ``cls`` of config group ``group``."""
    if isinstance(values, cls):
        return values
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise PatchAEError(
            f"{group} has unknown key(s) {', '.join(unknown)}; its keys are {', '.join(sorted(known))}"
        )
    return cls(**values)


def check_image_score(method: str, top_k: float) -> None:
    if method not in IMAGE_SCORES:
        raise PatchAEError(f"scoring.image_score={method} is unknown; use one of {', '.join(IMAGE_SCORES)}")
    if not 0.0 < float(top_k) <= 1.0:
        raise PatchAEError(f"scoring.top_k={top_k} must be a share of the map's pixels in (0, 1]")


def check_quantile(q: float) -> float:
    if not 0.0 < finite_number("threshold.quantile", q) <= 1.0:
        raise PatchAEError(f"threshold.quantile={q} must be in (0, 1], e.g. 0.99")
    return float(q)


def check_method(method: str) -> str:
    if method not in THRESHOLD_METHODS:
        raise PatchAEError(f"threshold.method={method} is unknown; use one of {', '.join(THRESHOLD_METHODS)}")
    return method


@dataclass(frozen=True)
class ScoringSettings:
    """``scoring``: from patch scores to the anomaly map and the image score."""

    blur_sigma: float = 4.0  # Gaussian blur of the upsampled map, in pixels (0 = none)
    image_score: str = "max"  # max | topk | reweight
    top_k: float = 0.01  # topk: the share of the map's pixels averaged
    reweight_neighbors: int = 9  # reweight: neighbourhood of the nearest bank vector

    def __post_init__(self) -> None:
        check_image_score(self.image_score, self.top_k)
        if self.reweight_neighbors < 1:
            raise PatchAEError(f"scoring.reweight_neighbors={self.reweight_neighbors} must be at least 1")
        finite_number("scoring.blur_sigma", self.blur_sigma)
        object.__setattr__(self, "blur_sigma", float(self.blur_sigma))
        object.__setattr__(self, "top_k", float(self.top_k))


@dataclass(frozen=True)
class BankSettings:
    """``bank``: how the memory bank is selected (read by the memory-bank callback) and searched (by the scorer)."""

    coreset_ratio: float = 0.1
    projection_dim: int | None = 128
    coreset_method: str = "auto"
    coreset_part_size: int = 8192
    coreset_greedy_seconds: float = 20.0
    num_neighbors: int = 1  # patch score = mean distance to its k nearest bank vectors
    search: str = "faiss"  # faiss | torch (exact blocked matmul search, the one export traces)
    faiss_device: str = "auto"
    faiss_index: str = "flat"

    def __post_init__(self) -> None:
        if self.search not in SEARCHES:
            raise PatchAEError(f"bank.search={self.search} is unknown; use faiss or torch")
        if isinstance(self.num_neighbors, bool) or int(self.num_neighbors) < 1:
            raise PatchAEError(f"bank.num_neighbors={self.num_neighbors} must be a positive integer")


@dataclass(frozen=True)
class ThresholdSettings:
    """``threshold``: how the decision threshold is calibrated when the model is tested."""

    method: str = "f1"  # f1 (labelled test split) | quantile (label-free, held-out normals)
    quantile: float = 0.99
    value: float | None = None  # a raw image score that overrides both
    holdout_ratio: float = 0.1  # read by the data module: normal training images kept out for `quantile`

    def __post_init__(self) -> None:
        check_method(self.method)
        object.__setattr__(self, "quantile", check_quantile(self.quantile))
        # Checked now: a bad value found only after testing would cost the whole training run.
        if self.value is not None:
            object.__setattr__(self, "value", finite_number("threshold.value", self.value))


@dataclass(frozen=True)
class Preprocessing:
    """``preprocessing`` (from ``data.*``): what a trained model must know to score new images, saved with it."""

    image_size: int | Sequence[int] = 256
    crop_size: int | Sequence[int] | None = 224
    resize_mode: str = "squash"
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    tiling: Mapping[str, Any] | None = field(default=None)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
