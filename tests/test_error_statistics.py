"""Error statistics of the reconstruction models' scorer: global (one mean and std per term) against per pixel
(model.error_statistics=per_pixel), on error maps made by hand where the right answer is known."""

from __future__ import annotations

import pytest
import torch

from checkpoint_fixture import train_tiny
from patchae.deploy.loading import load_model
from patchae.errors import PatchAEError
from patchae.scoring import StatisticsScorer
from patchae.settings import ScoringSettings

SIZE = 32


def normal_errors(count: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 1, SIZE, SIZE) error maps of normal parts: low noise everywhere, and a bright edge that every
    normal part has in the same column (as a fixtured part's rim)."""
    errors = 0.1 * torch.rand(count, 1, SIZE, SIZE, generator=generator)
    errors[:, :, :, 8] += 2.0 + 0.2 * torch.rand(count, 1, SIZE, generator=generator)
    return errors


def scorer(statistics: str) -> StatisticsScorer:
    return StatisticsScorer(("reconstruction",), (1.0,), ScoringSettings(blur_sigma=1.0), statistics)


@pytest.fixture(scope="module")
def fitted() -> dict[str, StatisticsScorer]:
    generator = torch.Generator().manual_seed(0)
    scorers = {name: scorer(name) for name in ("global", "per_pixel")}
    batches = [normal_errors(8, generator) for _ in range(6)]
    for each in scorers.values():
        each.fit(batches)
    return scorers


def test_per_pixel_statistics_rank_a_small_defect_above_the_normal_edge(fitted):
    generator = torch.Generator().manual_seed(1)
    normal = normal_errors(4, generator)
    defective = normal_errors(4, generator)
    defective[:, :, 20:23, 20:23] += 1.0  # half the edge's error, where normal parts are quiet
    _, normal_global = fitted["global"](normal)
    _, defective_global = fitted["global"](defective)
    _, normal_pixel = fitted["per_pixel"](normal)
    _, defective_pixel = fitted["per_pixel"](defective)
    # Global statistics: the edge outscores the defect, so normal and defective parts score alike.
    assert (defective_global - normal_global).abs().max() < 0.1 * normal_global.abs().min()
    # Per pixel: every defective part scores above every normal one.
    assert defective_pixel.min() > normal_pixel.max()


def test_per_pixel_statistics_keep_the_global_ones_and_shrink_towards_them(fitted):
    global_, per_pixel = fitted["global"], fitted["per_pixel"]
    assert torch.allclose(per_pixel.term_mean, global_.term_mean) and torch.allclose(
        per_pixel.term_std, global_.term_std
    )
    assert per_pixel.pixel_mean.shape == per_pixel.pixel_std.shape == (1, SIZE, SIZE)
    # The quietest position's std is never below the global std (variance shrunk towards the global one).
    assert per_pixel.pixel_std.min() >= global_.term_std[0] * (1 - 1e-5)
    # The edge column's mean is the edge's (about 2.1), the rest's the noise's (about 0.05).
    assert per_pixel.pixel_mean[0, :, 8].mean() == pytest.approx(2.15, abs=0.05)
    assert per_pixel.pixel_mean[0, :, 20].mean() == pytest.approx(0.05, abs=0.01)


def test_per_pixel_statistics_survive_a_state_dict_round_trip(fitted):
    images = normal_errors(2, torch.Generator().manual_seed(2))
    loaded = scorer("per_pixel")
    assert not loaded.is_fitted
    loaded.load_state_dict(fitted["per_pixel"].state_dict())
    assert loaded.is_fitted
    assert torch.equal(loaded(images)[1], fitted["per_pixel"](images)[1])
    # A global scorer's saved state loads into a per-pixel one as unfitted (to be refitted), not as a crash.
    from_global = scorer("per_pixel")
    from_global.load_state_dict(fitted["global"].state_dict())
    assert not from_global.is_fitted


def test_images_of_another_size_and_unknown_statistics_are_one_line_errors(fitted):
    with pytest.raises(
        PatchAEError, match=r"per-pixel error statistics are \(32, 32\) pixels, the images \(16, 16\)"
    ):
        fitted["per_pixel"](torch.rand(1, 1, 16, 16))
    with pytest.raises(
        PatchAEError,
        match="model.error_statistics=local is unknown; use one of global, per_pixel, per_pixel_mean",
    ):
        scorer("local")
    unequal = [torch.rand(1, 1, SIZE, SIZE), torch.rand(1, 1, 16, 16)]
    with pytest.raises(PatchAEError, match="fitted on images of one size"):
        scorer("per_pixel").fit(unequal)


def test_a_run_trained_with_per_pixel_statistics_saves_and_reloads_them(tmp_path):
    run = train_tiny(tmp_path, "model=daad", "model.error_statistics=per_pixel_mean", "data.batch_size=2")
    model = load_model(run.ckpt, fold_batchnorm=False)
    scorer = model.model.scorer
    assert scorer.statistics == "per_pixel_mean" and scorer.pixel_mean.shape == (2, 64, 64)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    global_model = load_model(run.ckpt, fold_batchnorm=False, error_statistics="global")
    with torch.no_grad():  # scoring, as predict does (the map operators were cached by the run's test)
        maps, _ = model(images)
        # The same weights read with their global statistics (saved beside) give another map.
        global_maps, _ = global_model(images)
        assert maps.shape == global_maps.shape == (2, 64, 64)
        assert not torch.allclose(maps, global_maps, atol=1e-3)
        with pytest.raises(
            PatchAEError, match=r"per-pixel error statistics are \(64, 64\) pixels, the images \(96, 96\)"
        ):
            model(torch.randn(1, 3, 96, 96))
