"""Scoring by fitted error statistics (SSL-AE, DAAD): per-pixel error terms standardised on normal images."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from patchae.errors import PatchAEError
from patchae.scoring.maps import anomaly_maps, full_precision, image_scores
from patchae.settings import ScoringSettings


class StatisticsScorer(nn.Module):
    """Maps and image scores from a model's per-pixel error terms (B, T, H, W).

    ``fit(terms)`` takes the terms of normal training images and keeps each term's mean and standard deviation
    over all their pixels; ``forward(terms)`` standardises each term with them, sums them with ``term_weights``
    into the map, blurs it and takes the image score, exactly as the bank models do (:mod:`patchae.scoring.maps`).
    """

    def __init__(
        self, term_names: Sequence[str], term_weights: Sequence[float], scoring: ScoringSettings | None = None
    ) -> None:
        super().__init__()
        self.scoring = scoring or ScoringSettings()
        if self.scoring.image_score == "reweight":
            raise PatchAEError(
                "scoring.image_score=reweight needs a memory bank; reconstruction models take max or topk"
            )
        self.term_names = tuple(term_names)
        weights = [float(w) for w in term_weights]
        if len(weights) != len(self.term_names) or min(weights) < 0 or sum(weights) <= 0:
            raise PatchAEError(
                f"term weights {weights} must be {len(self.term_names)} non-negative numbers "
                f"({', '.join(self.term_names)}), not all 0"
            )
        self.register_buffer("term_weights", torch.tensor(weights))
        # Mean and standard deviation of each term over the normal training pixels; std 0 = not fitted yet.
        self.register_buffer("term_mean", torch.zeros(len(self.term_names)))
        self.register_buffer("term_std", torch.zeros(len(self.term_names)))

    def twin(self) -> StatisticsScorer:
        """An unfitted scorer with the same settings (what validation fits with the current weights)."""
        return StatisticsScorer(self.term_names, self.term_weights.tolist(), self.scoring).to(
            self.term_mean.device
        )

    @property
    def is_fitted(self) -> bool:
        return bool((self.term_std > 0).all())

    bank_size = 0  # no memory bank: results files say so

    def check_fitted(self) -> None:
        if not self.is_fitted:
            raise PatchAEError(
                "this model has no normal-image statistics; train it first (they are fitted at the end of fit)"
            )

    @torch.no_grad()
    def fit(self, terms: Iterable[Tensor]) -> None:
        """Mean and std of every error term over all pixels of the (B, T, H, W) batches ``terms`` (normal images)."""
        count, total, squares = 0, torch.zeros(len(self.term_names)), torch.zeros(len(self.term_names))
        for batch in terms:
            batch = batch.double().cpu()
            count += batch.numel() // batch.shape[1]
            total += batch.sum(dim=(0, 2, 3))
            squares += batch.pow(2).sum(dim=(0, 2, 3))
        if count == 0:
            raise PatchAEError("no normal training images to fit the anomaly-map statistics on")
        mean = total / count
        std = (squares / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-12)
        self.term_mean = mean.float().to(self.term_mean.device)
        self.term_std = std.float().to(self.term_std.device)

    def standardized(self, terms: Tensor) -> Tensor:
        """(B, H, W) anomaly map before the blur: the weighted sum of the standardised error terms."""
        standard = (terms - self.term_mean.view(1, -1, 1, 1)) / self.term_std.view(1, -1, 1, 1)
        return (standard * self.term_weights.view(1, -1, 1, 1)).sum(dim=1)

    def forward(self, terms: Tensor) -> tuple[Tensor, Tensor]:
        """Maps (B, H, W) at the terms' resolution and image scores (B,), in float32."""
        with full_precision(terms):
            maps = anomaly_maps(self.standardized(terms.float()), terms.shape[-2:], self.scoring.blur_sigma)
            return maps, image_scores(maps, self.scoring.image_score, self.scoring.top_k)
