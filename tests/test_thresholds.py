"""Decision thresholds: F1-optimal and label-free, their fallbacks, normalisation, and the checkpoint round trip."""

import json
import math

import numpy as np
import pytest
import torch

from checkpoint_fixture import session_checkpoint_fixture
from patchae.data import SyntheticDataModule
from patchae.deploy.loading import load_model
from patchae.errors import PatchAEError
from patchae.metrics import f1_max
from patchae.models import PatchAEModule
from patchae.thresholds import Thresholds, calibrate, f1_threshold, normalize_scores, quantile_threshold

trained = session_checkpoint_fixture()


def f1_at(scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> float:
    flagged = scores >= threshold
    tp = int((flagged & (labels == 1)).sum())
    fp, fn = int((flagged & (labels == 0)).sum()), int((~flagged & (labels == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn)


def test_f1_threshold_is_midway_in_the_gap_and_keeps_the_best_f1():
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 11.0])
    labels = torch.tensor([0, 0, 0, 1, 1])
    assert f1_threshold(scores, labels) == pytest.approx(6.5)


def test_f1_threshold_reaches_the_maximum_f1_on_overlapping_scores():
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 40 + [1] * 30)
    scores = torch.randn(70, generator=generator) + 1.2 * labels
    best, _ = f1_max(scores, labels)
    threshold = f1_threshold(scores, labels)
    assert f1_at(scores, labels, threshold) == pytest.approx(best)
    assert 0.6 < best < 1.0  # the classes overlap: the test means something


def test_f1_threshold_needs_both_classes():
    assert math.isnan(f1_threshold(torch.tensor([1.0, 2.0]), torch.tensor([1, 1])))
    assert math.isnan(f1_threshold(torch.tensor([1.0, 2.0]), torch.tensor([0, 0])))


def test_quantile_threshold_matches_numpy():
    scores = torch.linspace(0, 10, 101)
    assert quantile_threshold(scores, 0.9) == pytest.approx(np.quantile(scores.numpy(), 0.9))
    assert math.isnan(quantile_threshold(torch.empty(0), 0.9))
    with pytest.raises(PatchAEError, match="quantile"):
        quantile_threshold(scores, 1.5)


def test_calibrate_picks_the_method_and_falls_back():
    scores, labels, normals = (
        torch.tensor([1.0, 2.0, 8.0, 9.0]),
        torch.tensor([0, 0, 1, 1]),
        torch.tensor([0.5, 1.5, 2.5]),
    )
    f1 = calibrate(scores, labels, normals, "f1", 0.5)
    assert (f1.method, f1.value, f1.quantile) == ("f1", pytest.approx(5.0), pytest.approx(1.5))
    assert (f1.low, f1.high) == (0.5, 9.0)
    assert calibrate(scores, labels, normals, "quantile", 0.5).value == pytest.approx(1.5)
    no_normal_test = calibrate(scores, torch.ones(4, dtype=torch.long), normals, "f1", 0.5)
    assert no_normal_test.method == "quantile" and no_normal_test.value == pytest.approx(1.5)
    no_holdout = calibrate(scores, labels, torch.empty(0), "quantile", 0.5)
    assert no_holdout.method == "f1" and no_holdout.value == pytest.approx(5.0)
    nothing = calibrate(scores, torch.ones(4, dtype=torch.long), torch.empty(0), "f1")
    assert not nothing.is_set and nothing.method == "none"
    manual = calibrate(scores, labels, normals, "f1", value=3.0)
    assert (manual.method, manual.value, manual.f1) == ("manual", 3.0, pytest.approx(5.0))


def test_normalisation_puts_the_threshold_at_one_half():
    thresholds = Thresholds(method="f1", value=5.0, low=1.0, high=9.0)
    scores = torch.tensor([0.0, 1.0, 4.0, 5.0, 6.0, 9.0, 20.0])
    normalized = thresholds.normalize(scores)
    assert normalized.tolist() == pytest.approx([0.0, 0.0, 0.375, 0.5, 0.625, 1.0, 1.0])
    assert torch.equal(thresholds.is_anomalous(scores), normalized >= 0.5)
    assert torch.all(normalized.diff() >= 0)
    assert normalize_scores(torch.tensor([3.0]), 3.0, 1.0).item() == 0.5


def test_switching_and_re_picking_thresholds():
    thresholds = calibrate(torch.tensor([1.0, 9.0]), torch.tensor([0, 1]), torch.arange(11.0), "f1", 0.9)
    assert thresholds.with_method("quantile").value == pytest.approx(9.0)
    assert thresholds.with_quantile(0.5).value == pytest.approx(5.0)
    assert thresholds.with_value(7.0).method == "manual"
    with pytest.raises(PatchAEError, match="no f1 threshold"):
        Thresholds(quantile=1.0).with_method("f1")
    with pytest.raises(PatchAEError, match="no held-out normal scores"):
        Thresholds().with_quantile(0.9)
    assert Thresholds.from_dict(thresholds.as_dict()) == thresholds


def test_holdout_images_are_kept_out_of_training_and_the_bank(tmp_path):
    kwargs = {
        "root": tmp_path,
        "n_train": 10,
        "n_test_good": 1,
        "n_test_defect": 1,
        "synthetic_size": 64,
        "image_size": 64,
        "crop_size": None,
    }
    datamodule = SyntheticDataModule(**kwargs, holdout_ratio=0.3, seed=3)
    train = {str(s.path) for s in datamodule.train_samples}
    holdout = {str(s.path) for s in datamodule.holdout_samples}
    assert len(holdout) == 3 and len(train) == 7 and not train & holdout
    bank_paths = {p for batch in datamodule.bank_dataloader() for p in batch["path"]}
    assert bank_paths == train
    assert {p for batch in datamodule.holdout_dataloader() for p in batch["path"]} == holdout
    again = SyntheticDataModule(**kwargs, holdout_ratio=0.3, seed=3)
    assert {str(s.path) for s in again.holdout_samples} == holdout  # seeded
    assert SyntheticDataModule(**kwargs).holdout_dataloader() is None
    with pytest.raises(PatchAEError, match="holdout_ratio"):
        SyntheticDataModule(**kwargs, holdout_ratio=1.0)


def test_testing_stores_both_thresholds_in_the_checkpoint(trained):
    model = load_model(trained.ckpt)
    thresholds = model.thresholds
    assert thresholds.method == "f1" and thresholds.is_set
    assert len(thresholds.normal_scores) == 2  # 0.2 of 10 training images were held out
    assert thresholds.quantile == pytest.approx(
        quantile_threshold(torch.tensor(thresholds.normal_scores), 0.99)
    )
    assert thresholds.low <= min(thresholds.normal_scores) and thresholds.high > thresholds.value
    saved = json.loads((trained.ckpt.parent / "results.json").read_text())
    assert saved["image_threshold"] == pytest.approx(thresholds.value)
    assert 0.8 <= saved["image_accuracy"] <= 1.0


def test_a_bad_threshold_value_is_refused_before_training():
    with pytest.raises(PatchAEError, match="threshold.value=nan must be a finite number"):
        PatchAEModule("tf_efficientnet_lite0", (2, 3), pretrained=False, threshold={"value": float("nan")})
