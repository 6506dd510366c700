"""Scoring by fitted error statistics (SSL-AE, DAAD): per-pixel error terms standardised on normal images."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from patchae.errors import PatchAEError
from patchae.scoring.maps import anomaly_maps, full_precision, image_scores
from patchae.settings import ScoringSettings

# global: each error term's mean and std over all pixels | per_pixel: a mean and std per pixel position |
# per_pixel_mean: a mean per pixel position, the global std (both ours)
STATISTICS = ("global", "per_pixel", "per_pixel_mean")


class StatisticsScorer(nn.Module):
    """Maps and image scores from a model's per-pixel error terms (B, T, H, W).

    ``fit(terms)`` takes the terms of normal training images and keeps each term's mean and standard deviation
    over all their pixels; ``forward(terms)`` standardises each term with them, sums them with ``term_weights``
    into the map, blurs it and takes the image score, exactly as the bank models do (:mod:`patchae.scoring.maps`).

    ``statistics="per_pixel"`` (our option; ``global`` is the papers' map up to scale) keeps a mean and a variance
    for every pixel position as well, and standardises each pixel with its own: an error that every normal image
    has at that place (the edge of a fixtured part, a reflection) counts for less, one where normal images are
    quiet for more. The per-pixel variance is shrunk towards the global one (their sum), so that a position whose
    few normal errors happened to be alike cannot blow its standardised error up. Images must then have the size
    the statistics were fitted at. ``per_pixel_mean`` subtracts the per-pixel mean but divides by the global std,
    so a place where normal errors vary a lot (where real defects may lie too) is not damped.
    """

    def __init__(
        self,
        term_names: Sequence[str],
        term_weights: Sequence[float],
        scoring: ScoringSettings | None = None,
        statistics: str = "global",
    ) -> None:
        super().__init__()
        if statistics not in STATISTICS:
            raise PatchAEError(
                f"model.error_statistics={statistics} is unknown; use one of {', '.join(STATISTICS)}"
            )
        self.statistics = statistics
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
        # Per-pixel statistics, (T, H, W) once fitted; only per-pixel scorers have them (a global one saves as before).
        if self.per_pixel:
            self.register_buffer("pixel_mean", torch.empty(0))
            self.register_buffer("pixel_std", torch.empty(0))

    @property
    def per_pixel(self) -> bool:
        return self.statistics != "global"

    def twin(self) -> StatisticsScorer:
        """An unfitted scorer with the same settings (what validation fits with the current weights)."""
        return StatisticsScorer(
            self.term_names, self.term_weights.tolist(), self.scoring, self.statistics
        ).to(self.term_mean.device)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        # Per-pixel maps have the fitted size: shape the buffers before the saved ones are copied in. A state saved
        # with global statistics loads as an unfitted per-pixel scorer (to be refitted, e.g. by rescore), and one
        # saved with per-pixel statistics as a global scorer (their global mean and std are saved beside).
        names = (prefix + "pixel_mean", prefix + "pixel_std")
        if self.per_pixel:
            for name in names:
                saved = state_dict.get(name, torch.empty(0))
                setattr(self, name[len(prefix) :], torch.empty_like(saved, device=self.term_mean.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, *args, **kwargs
        )
        missing_keys[:] = [key for key in missing_keys if key not in names]
        unexpected_keys[:] = [key for key in unexpected_keys if key not in names]

    @property
    def is_fitted(self) -> bool:
        fitted = bool((self.term_std > 0).all())
        return fitted and (not self.per_pixel or self.pixel_std.numel() > 0)

    bank_size = 0  # no memory bank: results files say so

    def check_fitted(self) -> None:
        if not self.is_fitted:
            raise PatchAEError(
                "this model has no normal-image statistics; train it first (they are fitted at the end of fit)"
            )

    @torch.no_grad()
    def fit(self, terms: Iterable[Tensor]) -> None:
        """Mean and std of every error term over all pixels of the (B, T, H, W) batches ``terms`` (normal images);
        per pixel position too, with per-pixel statistics (the images then of one size)."""
        count, total = 0, torch.zeros(len(self.term_names), dtype=torch.float64)
        squares = torch.zeros_like(total)
        images, pixel_total, pixel_squares = 0, torch.zeros(()), torch.zeros(())
        for batch in terms:
            batch = batch.double().cpu()
            count += batch.numel() // batch.shape[1]
            total += batch.sum(dim=(0, 2, 3))
            squares += batch.pow(2).sum(dim=(0, 2, 3))
            if not self.per_pixel:
                continue
            if images and batch.shape[1:] != pixel_total.shape:
                raise PatchAEError(
                    f"normal images of different sizes ({tuple(pixel_total.shape[-2:])} and {tuple(batch.shape[-2:])}):"
                    " per-pixel error statistics are fitted on images of one size (data.image_size)"
                )
            images += batch.shape[0]
            pixel_total = pixel_total + batch.sum(dim=0)
            pixel_squares = pixel_squares + batch.pow(2).sum(dim=0)
        if count == 0:
            raise PatchAEError("no normal training images to fit the anomaly-map statistics on")
        mean = total / count
        variance = (squares / count - mean.pow(2)).clamp_min(0)
        self.term_mean = mean.float().to(self.term_mean.device)
        self.term_std = variance.sqrt().clamp_min(1e-12).float().to(self.term_std.device)
        if self.per_pixel:
            pixel_mean = pixel_total / images
            pixel_variance = (pixel_squares / images - pixel_mean.pow(2)).clamp_min(0)
            # Shrunk towards the global variance: a position whose normal errors happened to agree stays sane.
            pixel_std = (pixel_variance + variance.view(-1, 1, 1)).sqrt().clamp_min(1e-12)
            self.pixel_mean = pixel_mean.float().to(self.term_mean.device)
            self.pixel_std = pixel_std.float().to(self.term_mean.device)

    def standardized(self, terms: Tensor) -> Tensor:
        """(B, H, W) anomaly map before the blur: the weighted sum of the standardised error terms."""
        if self.per_pixel:
            if tuple(terms.shape[1:]) != tuple(self.pixel_mean.shape):
                raise PatchAEError(
                    f"this model's per-pixel error statistics are {tuple(self.pixel_mean.shape[-2:])} pixels, the "
                    f"images {tuple(terms.shape[-2:])}: score images of the size it was trained at, or retrain "
                    "with model.error_statistics=global"
                )
            std = self.pixel_std if self.statistics == "per_pixel" else self.term_std.view(-1, 1, 1)
            standard = (terms - self.pixel_mean) / std
        else:
            standard = (terms - self.term_mean.view(1, -1, 1, 1)) / self.term_std.view(1, -1, 1, 1)
        return (standard * self.term_weights.view(1, -1, 1, 1)).sum(dim=1)

    def forward(self, terms: Tensor) -> tuple[Tensor, Tensor]:
        """Maps (B, H, W) at the terms' resolution and image scores (B,), in float32."""
        with full_precision(terms):
            maps = anomaly_maps(self.standardized(terms.float()), terms.shape[-2:], self.scoring.blur_sigma)
            return maps, image_scores(maps, self.scoring.image_score, self.scoring.top_k)
