"""Tests for patchae.metrics: AUPRO, F1-max and the AnomalyMetrics accumulator."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from patchae.errors import PatchAEError
from patchae.metrics import AnomalyMetrics, aupro, f1_max


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Slow, obviously-correct AUPRO: one python iteration per distinct threshold."""
    regions = []
    for image_index, mask in enumerate(masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(image_index, labels == r) for r in range(1, count + 1)]
    normal = ~masks.astype(bool)
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fprs.append((predicted & normal).sum() / normal.sum())
        pros.append(np.mean([(predicted[i] & region).sum() / region.sum() for i, region in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    end = np.searchsorted(fprs, fpr_limit, side="left")
    pro_at_limit = pros[end - 1] + (pros[end] - pros[end - 1]) * (fpr_limit - fprs[end - 1]) / (
        fprs[end] - fprs[end - 1]
    )
    x = np.append(fprs[:end], fpr_limit)
    y = np.append(pros[:end], pro_at_limit)
    return float(np.trapezoid(y, x) / fpr_limit)


def two_region_case() -> tuple[np.ndarray, np.ndarray]:
    """2x6 image: region A = two pixels top-left, region B = two pixels bottom-right, 8 normal pixels."""
    mask = np.zeros((1, 2, 6), dtype=bool)
    mask[0, 0, 0:2] = True  # A
    mask[0, 1, 4:6] = True  # B
    scores = np.zeros((1, 2, 6), dtype=np.float32)
    scores[0, 0, 0:2] = 10.0  # A fully found first: PRO 0.5 at FPR 0
    scores[0, 1, 4] = 9.0  # half of B: PRO 0.75 at FPR 0
    normal_positions = [(0, 2), (0, 3), (0, 4), (0, 5), (1, 0), (1, 1), (1, 2), (1, 3)]
    for value, (row, col) in zip([8, 6, 5, 4, 3, 2, 1, 0], normal_positions, strict=True):
        scores[0, row, col] = value  # first normal: FPR 1/8 with PRO 0.75
    scores[0, 1, 5] = 7.0  # rest of B: PRO 1.0 at FPR 1/8
    return scores, mask


class TestAupro:
    def test_hand_computed_curve(self) -> None:
        scores, mask = two_region_case()
        # Curve: (0,0) (0,.5) (0,.75) (.125,.75) (.125,1) (.25,1) ...
        assert aupro(scores, mask, fpr_limit=0.3) == pytest.approx((0.125 * 0.75 + 0.175 * 1.0) / 0.3)
        assert aupro(scores, mask, fpr_limit=0.1) == pytest.approx(0.75)
        assert aupro(torch.from_numpy(scores), torch.from_numpy(mask), fpr_limit=1.0) == pytest.approx(
            0.125 * 0.75 + 0.875
        )

    def test_ties_interpolate_linearly_at_the_limit(self) -> None:
        scores, mask = two_region_case()
        scores[0, 1, 5] = 8.0  # tied with the first normal pixel: one step (0,.75) -> (.125, 1)
        pro_at_limit = 0.75 + 0.25 * (0.1 / 0.125)
        assert aupro(scores, mask, fpr_limit=0.1) == pytest.approx((0.75 + pro_at_limit) / 2)

    def test_regions_count_equally_regardless_of_size(self) -> None:
        mask = np.zeros((1, 5, 5), dtype=bool)
        mask[0, :3, :3] = True  # 9-pixel region, found first
        mask[0, 4, 4] = True  # 1-pixel region, found last
        scores = np.where(mask, 100.0, 0.0).astype(np.float32)
        scores[0, 4, 4] = -1.0
        scores[~mask] = np.arange(15, dtype=np.float32)
        assert aupro(scores, mask) == pytest.approx(0.5)  # pixel-weighted would give 0.9

    def test_regions_are_8_connected_and_per_image(self) -> None:
        mask = np.zeros((1, 3, 4), dtype=bool)
        mask[0, 0, 0] = mask[0, 0, 1] = mask[0, 1, 2] = True  # one region with 8-connectivity
        scores = np.zeros((1, 3, 4), dtype=np.float32)
        scores[~mask] = np.arange(1, 10)
        scores[0, 0, 0:2] = 10.0
        assert aupro(scores, mask) == pytest.approx(2 / 3)  # 4-connectivity would give 0.5

        masks = np.zeros((2, 4, 4), dtype=bool)
        masks[0, 0, 0:2] = True
        masks[1, 0, 0:4] = True  # overlaps image 0's region in position but is another region
        scores = np.zeros((2, 4, 4), dtype=np.float32)
        scores[~masks] = np.arange(1, (~masks).sum() + 1)
        scores[0][masks[0]] = 100.0
        scores[1][masks[1]] = -1.0
        assert aupro(scores, masks) == pytest.approx(0.5)  # one merged 6-pixel region would give 1/3

    @pytest.mark.parametrize("seed", [0, 1, 2])
    @pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
    def test_matches_threshold_loop_reference_with_ties(self, seed: int, fpr_limit: float) -> None:
        rng = np.random.default_rng(seed)
        masks = np.zeros((3, 12, 12), dtype=bool)
        masks[0, 2:5, 2:5] = masks[0, 8:10, 7:11] = masks[1, 5, 5] = masks[1, 6, 6] = True
        maps = rng.integers(0, 20, size=masks.shape).astype(np.float32) + 5 * masks
        assert aupro(maps, masks, fpr_limit) == pytest.approx(
            reference_aupro(maps, masks, fpr_limit), abs=1e-12
        )

    def test_perfect_map_scores_one(self) -> None:
        generator = torch.Generator().manual_seed(0)
        masks = torch.rand(8, 32, 32, generator=generator) > 0.9
        maps = masks.float() + 0.5 * torch.rand(8, 32, 32, generator=generator)
        assert aupro(maps, masks) == pytest.approx(1.0)

    def test_random_map_scores_about_half_the_fpr_limit(self) -> None:
        generator = torch.Generator().manual_seed(0)
        masks = torch.zeros(100, 128, 128, dtype=torch.bool)
        for i in range(0, 100, 2):
            top, left = torch.randint(0, 100, (2,), generator=generator).tolist()
            masks[i, top : top + 20, left : left + 25] = True
        maps = torch.rand(100, 128, 128, generator=generator)
        assert aupro(maps, masks, fpr_limit=0.3) == pytest.approx(0.15, abs=0.01)

    def test_constant_map_is_the_diagonal(self) -> None:
        masks = torch.zeros(2, 8, 8)
        masks[0, 1:3, 1:3] = 1
        assert aupro(torch.ones(2, 8, 8), masks, fpr_limit=0.3) == pytest.approx(0.15)

    def test_undefined_cases_return_nan(self) -> None:
        assert math.isnan(aupro(torch.rand(2, 8, 8), torch.zeros(2, 8, 8)))
        assert math.isnan(aupro(torch.rand(2, 8, 8), torch.ones(2, 8, 8)))

    def test_invalid_fpr_limit_is_a_user_error(self) -> None:
        with pytest.raises(PatchAEError, match="fpr_limit"):
            aupro(torch.rand(1, 4, 4), torch.ones(1, 4, 4), fpr_limit=0.0)


class TestF1Max:
    def test_hand_case(self) -> None:
        # thresholds 0.8: F1 2/3; 0.4: 1/2; 0.35: P=2/3 R=1 -> F1 0.8; 0.1: 2/3
        best, threshold = f1_max(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        assert best == pytest.approx(0.8)
        assert threshold == pytest.approx(0.35)

    def test_unbounded_scores_keep_their_units(self) -> None:
        best, threshold = f1_max(np.array([60.0, 90.0, 85.0, 130.0]), np.array([0, 0, 1, 1]))
        assert best == pytest.approx(0.8)
        assert threshold == pytest.approx(85.0)

    def test_no_positive_is_nan(self) -> None:
        best, threshold = f1_max(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]))
        assert math.isnan(best) and math.isnan(threshold)


def mann_whitney_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    positives, negatives = scores[labels == 1], scores[labels == 0]
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


def separable_batch(
    num_images: int = 6, size: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Half normal, half anomalous images whose maps exactly separate defect pixels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 1] * (num_images // 2))
    masks = torch.zeros(num_images, size, size)
    for i in torch.nonzero(labels).flatten().tolist():
        masks[i, 3:7, 4:9] = 1
    maps = 0.5 * torch.rand(num_images, size, size, generator=generator) + masks
    return maps.amax(dim=(1, 2)), labels, maps, masks


class TestAnomalyMetrics:
    def test_perfect_separation_scores_one_everywhere(self) -> None:
        scores, labels, maps, masks = separable_batch()
        metrics = AnomalyMetrics()
        metrics.update(scores[:3], labels[:3], maps[:3], masks[:3])
        metrics.update(scores[3:], labels[3:], maps[3:].unsqueeze(1), masks[3:].unsqueeze(1))
        result = metrics.compute()
        assert set(result) == {"image_auroc", "image_f1_max", "image_f1_threshold", "pixel_auroc", "aupro"}
        assert result["image_auroc"] == pytest.approx(1.0)
        assert result["image_f1_max"] == pytest.approx(1.0)
        assert result["pixel_auroc"] == pytest.approx(1.0)
        assert result["aupro"] == pytest.approx(1.0)
        # The best threshold is the lowest anomalous score, in the scores' own units.
        assert result["image_f1_threshold"] == pytest.approx(float(scores[labels == 1].min()))

    def test_large_scores_are_not_squashed_by_a_sigmoid(self) -> None:
        metrics = AnomalyMetrics()
        metrics.update(torch.tensor([100.0, 101.0, 102.0, 103.0]), torch.tensor([0, 0, 1, 1]))
        result = metrics.compute()
        assert result["image_auroc"] == pytest.approx(1.0)
        assert result["image_f1_threshold"] == pytest.approx(102.0)

    def test_matches_rank_statistic_on_noisy_data(self) -> None:
        rng = np.random.default_rng(1)
        labels = rng.integers(0, 2, 200)
        scores = rng.normal(size=200) + labels
        maps = rng.normal(size=(20, 16, 16)).astype(np.float32)
        masks = np.zeros((20, 16, 16), dtype=bool)
        masks[::3, 4:9, 2:6] = True
        maps += masks
        metrics = AnomalyMetrics()
        metrics.update(torch.from_numpy(scores), torch.from_numpy(labels))
        metrics.update(torch.zeros(20), torch.zeros(20), torch.from_numpy(maps), torch.from_numpy(masks))
        result = metrics.compute()
        all_scores, all_labels = np.append(scores, np.zeros(20)), np.append(labels, np.zeros(20))
        assert result["image_auroc"] == pytest.approx(mann_whitney_auroc(all_scores, all_labels), abs=1e-6)
        assert result["pixel_auroc"] == pytest.approx(
            mann_whitney_auroc(maps.ravel(), masks.ravel()), abs=1e-6
        )
        assert result["aupro"] == pytest.approx(aupro(maps, masks))

    def test_binned_pixel_auroc_is_close_to_exact(self) -> None:
        generator = torch.Generator().manual_seed(2)
        masks = torch.zeros(10, 32, 32)
        masks[:, 10:20, 10:20] = 1
        maps = torch.randn(10, 32, 32, generator=generator) * 3 + 2 * masks
        exact, binned = AnomalyMetrics(), AnomalyMetrics(pixel_thresholds=500)
        for metric in (exact, binned):
            metric.update(maps.amax(dim=(1, 2)), torch.ones(10), maps, masks)
        assert binned.compute()["pixel_auroc"] == pytest.approx(exact.compute()["pixel_auroc"], abs=2e-3)

    def test_images_without_known_mask_are_excluded_from_pixel_metrics(self) -> None:
        scores, labels, maps, masks = separable_batch()
        maps[1] = 10.0  # anomalous image whose mask file is missing: everywhere "defect-like"
        masks[1] = 0.0
        has_mask = torch.ones(6, dtype=torch.bool)
        metrics = AnomalyMetrics()
        metrics.update(scores, labels, maps, masks, has_mask)
        assert metrics.compute()["pixel_auroc"] < 0.99  # the unknown mask poisons the pixel metric...
        metrics.reset()
        has_mask[1] = False
        metrics.update(scores, labels, maps, masks, has_mask)
        result = metrics.compute()
        assert result["pixel_auroc"] == pytest.approx(1.0)  # ...unless it is excluded
        assert result["aupro"] == pytest.approx(1.0)

    def test_batches_of_different_sizes(self) -> None:
        metrics = AnomalyMetrics()
        for size in (16, 24):
            scores, labels, maps, masks = separable_batch(size=size)
            metrics.update(scores, labels, maps, masks)
        assert metrics.compute()["aupro"] == pytest.approx(1.0)

    def test_single_class_gives_nan_and_warns_without_crashing(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        metrics = AnomalyMetrics()
        metrics.update(torch.rand(4), torch.zeros(4), torch.rand(4, 8, 8), torch.zeros(4, 8, 8))
        with caplog.at_level(logging.WARNING, logger="patchae.metrics"):
            result = metrics.compute()
        assert all(math.isnan(value) for value in result.values())
        assert "no anomalous image" in caplog.text
        assert "no defect pixel" in caplog.text

    def test_only_anomalous_images_still_gives_pixel_metrics(self) -> None:
        scores, labels, maps, masks = separable_batch()
        keep = labels == 1
        metrics = AnomalyMetrics()
        metrics.update(scores[keep], labels[keep], maps[keep], masks[keep])
        result = metrics.compute()
        assert math.isnan(result["image_auroc"]) and math.isnan(result["image_f1_max"])
        assert result["pixel_auroc"] == pytest.approx(1.0)

    def test_empty_and_reset(self) -> None:
        metrics = AnomalyMetrics()
        assert all(math.isnan(v) for v in metrics.compute().values())
        scores, labels, maps, masks = separable_batch()
        metrics.update(scores, labels, maps, masks)
        metrics.reset()
        assert all(math.isnan(v) for v in metrics.compute().values())

    def test_non_finite_scores_give_nan(self) -> None:
        metrics = AnomalyMetrics()
        metrics.update(torch.tensor([0.1, float("nan"), 0.3]), torch.tensor([0, 1, 1]))
        assert math.isnan(metrics.compute()["image_auroc"])


def test_f1_max_when_every_score_is_the_same():
    """A collapsed model scores every image alike: F1-max is that of calling all of them anomalous."""
    f1, threshold = f1_max(torch.full((4,), 2.5), torch.tensor([0, 1, 1, 0]))
    assert f1 == pytest.approx(2 / 3) and threshold == pytest.approx(2.5)
