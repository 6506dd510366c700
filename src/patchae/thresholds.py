"""Decision thresholds on image scores, and the score normalisation that puts the threshold at 0.5.

Two thresholds are computed when a model is tested and both travel in its checkpoint:

* ``f1``: the F1-optimal threshold on the labelled test split, placed half-way between the lowest score
  it flags and the highest score it does not (same decisions on the test split, the widest margin);
* ``quantile``: the ``q``-quantile of the scores of held-out normal training images (label-free: it only
  needs images known to be normal, none with defects).

``method`` says which one makes the decisions; a user-given value (``method="manual"``) overrides both.
An image is anomalous when its raw score is ``>= value``. Normalised scores map ``value`` to 0.5:
``clip((score - value) / (high - low) + 0.5, 0, 1)`` with ``low``/``high`` the lowest/highest score seen
while calibrating, so scores of different models and categories read the same way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from patchae.errors import PatchAEError, finite_number
from patchae.metrics import f1_max
from patchae.settings import check_method, check_quantile

log = logging.getLogger(__name__)

NAN = float("nan")


def f1_threshold(scores: Tensor, labels: Tensor) -> float:
    """The F1-optimal threshold, midway between the lowest flagged and the highest unflagged score.

    nan unless both labels occur.
    """
    scores, labels = scores.detach().flatten().double().cpu(), labels.detach().flatten().long().cpu()
    if not (bool((labels == 1).any()) and bool((labels == 0).any())):
        return NAN
    _, threshold = f1_max(scores, labels)
    below = scores[scores < threshold]
    if below.numel() == 0:
        return threshold
    return float((below.max() + threshold) / 2)


def quantile_threshold(normal_scores: Tensor, q: float) -> float:
    """The ``q``-quantile of scores of images known to be normal; nan when there are none."""
    check_quantile(q)
    scores = normal_scores.detach().flatten().double().cpu()
    scores = scores[torch.isfinite(scores)]
    if scores.numel() == 0:
        return NAN
    return float(torch.quantile(scores, q))


def normalize_scores(scores: Tensor, threshold: float, scale: float) -> Tensor:
    """``clip((scores - threshold) / scale + 0.5, 0, 1)``: the threshold lands on 0.5 (pure torch, exportable)."""
    return ((scores - threshold) / scale + 0.5).clamp(0.0, 1.0)


@dataclass
class Thresholds:
    """A model's decision threshold and the alternatives it was chosen from (all raw image scores)."""

    method: str = "none"  # which threshold decides: f1 | quantile | manual | none (not calibrated)
    value: float = NAN
    f1: float = NAN
    quantile: float = NAN
    q: float = 0.99
    low: float = NAN
    high: float = NAN
    normal_scores: list[float] = field(default_factory=list)  # held-out normal scores, to re-pick q later

    @property
    def is_set(self) -> bool:
        return math.isfinite(self.value)

    @property
    def scale(self) -> float:
        """Normalisation width: the calibration score range (1 when unknown or degenerate)."""
        width = self.high - self.low
        return width if math.isfinite(width) and width > 0 else 1.0

    def normalize(self, scores: Tensor) -> Tensor:
        return normalize_scores(scores, self.value, self.scale)

    def is_anomalous(self, scores: Tensor) -> Tensor:
        return scores >= self.value

    def with_value(self, value: float) -> Thresholds:
        """A user-given raw threshold."""
        return replace(self, method="manual", value=finite_number("threshold", value))

    def with_quantile(self, q: float) -> Thresholds:
        """Re-pick the quantile threshold from the stored held-out normal scores."""
        q = check_quantile(q)
        if not self.normal_scores:
            raise PatchAEError(
                "this checkpoint stored no held-out normal scores, so threshold_quantile cannot be re-picked; "
                "retrain with data.holdout_ratio > 0 or pass threshold=<raw score>"
            )
        value = quantile_threshold(torch.tensor(self.normal_scores), q)
        return replace(self, method="quantile", quantile=value, q=q, value=value)

    def with_method(self, method: str) -> Thresholds:
        """Decide with the other stored threshold."""
        value = getattr(self, check_method(method))
        if not math.isfinite(value):
            why = (
                "its test split did not have both normal and anomalous images"
                if method == "f1"
                else "it had no held-out normal images (data.holdout_ratio=0)"
            )
            raise PatchAEError(
                f"this checkpoint has no {method} threshold: {why}; use the other threshold_method or threshold=<raw score>"
            )
        return replace(self, method=method, value=value)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> Thresholds:
        known = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in (values or {}).items() if key in known})


def calibrate(
    test_scores: Tensor,
    test_labels: Tensor,
    normal_scores: Tensor,
    method: str = "f1",
    q: float = 0.99,
    value: float | None = None,
) -> Thresholds:
    """Both thresholds from one test run, the decision one picked by ``method`` (``value`` overrides).

    When the chosen method cannot be computed (no labelled normal+anomalous test images for ``f1``, no
    held-out normals for ``quantile``) the other one is used, with a warning.
    """
    check_method(method)
    normal_scores = normal_scores.detach().flatten().double().cpu()
    test_scores = test_scores.detach().flatten().double().cpu()
    seen = torch.cat([test_scores, normal_scores])
    seen = seen[torch.isfinite(seen)]
    thresholds = Thresholds(
        f1=f1_threshold(test_scores, test_labels),
        quantile=quantile_threshold(normal_scores, q),
        q=check_quantile(q),
        low=float(seen.min()) if seen.numel() else NAN,
        high=float(seen.max()) if seen.numel() else NAN,
        normal_scores=normal_scores.tolist(),
    )
    if value is not None:
        return thresholds.with_value(value)
    other = "quantile" if method == "f1" else "f1"
    for candidate in (method, other):
        if math.isfinite(getattr(thresholds, candidate)):
            if candidate != method:
                log.warning(
                    "threshold: no %s threshold could be computed; deciding with the %s one",
                    method,
                    candidate,
                )
            return replace(thresholds, method=candidate, value=getattr(thresholds, candidate))
    log.warning(
        "threshold: none could be computed (the test split lacks normal or anomalous images and there are no "
        "held-out normals); pass threshold=<raw score> when predicting"
    )
    return thresholds


def decision_accuracy(
    scores: Sequence[float] | Tensor, labels: Sequence[int] | Tensor, value: float
) -> float:
    """Fraction of images whose decision (score >= value) matches the label (1 = anomalous)."""
    scores_t, labels_t = (
        torch.as_tensor(scores, dtype=torch.float64),
        torch.as_tensor(labels, dtype=torch.long),
    )
    if scores_t.numel() == 0 or not math.isfinite(value):
        return NAN
    return float(((scores_t >= value).long() == labels_t).double().mean())
