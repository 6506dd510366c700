"""python -m patchae.benchmarks.rescore: a finished run scored again gives the run's own figures with its own
settings, one row per run and setting with others, and one-line errors for what is not a run."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from checkpoint_fixture import train_tiny
from patchae.benchmarks.rescore import METRICS, RescoreConfig, main, rescore
from patchae.checkpoints import load_checkpoint
from patchae.deploy.loading import load_model
from patchae.errors import PatchAEError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    # SSL-AE, 2 epochs on the tiny synthetic set (2 of 10 images held out), validated after the last epoch.
    root = tmp_path_factory.mktemp("rescore")
    run = train_tiny(root, "model=ssl_ae", "trainer.max_epochs=2", "data.batch_size=2")
    directory = run.ckpt.parent
    (directory / ".hydra").mkdir()
    OmegaConf.save(run.cfg, directory / ".hydra" / "config.yaml")  # what train.py's Hydra writes
    return directory, run.results


def test_own_settings_reproduce_the_runs_validation_and_test_figures(run_dir):
    directory, results = run_dir
    (row,) = rescore(RescoreConfig(runs=[str(directory)]))["rows"]
    assert row["blur_sigma"] == 4.0 and row["image_score"] == "max"
    for name in METRICS:
        assert row[f"test_{name}"] == pytest.approx(results[name], abs=1e-6)
        assert row[f"val_{name}"] == pytest.approx(results[f"val_{name}"], abs=1e-6)


def test_every_setting_gets_a_row_and_a_mean(run_dir, tmp_path, capsys):
    directory, _ = run_dir
    output = tmp_path / "rescore.json"
    got = main(
        [f"runs=[{directory},{directory}]", "blur_sigmas=[0,4]", "image_scores=[topk]", f"output={output}"]
    )
    assert [(row["blur_sigma"], row["image_score"]) for row in got["rows"]] == [
        (0.0, "topk 0.01"),
        (4.0, "topk 0.01"),
    ] * 2
    assert [mean["runs"] for mean in got["means"]] == [2, 2]
    assert got["means"][0]["test_image_auroc_std"] == 0.0  # the same run twice
    # Unblurred maps localise differently from blurred ones: the setting really changed the scoring.
    assert got["means"][0]["test_pixel_auroc"] != pytest.approx(got["means"][1]["test_pixel_auroc"], abs=1e-6)
    printed = capsys.readouterr().out
    assert "| 0 | topk 0.01 | 2 |" in printed and "| 4 | topk 0.01 | 2 |" in printed
    assert output.is_file()


def test_a_directory_that_is_no_run_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([f"runs=[{tmp_path}]"])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "is not a finished run" in error and len(error.strip().splitlines()) == 1


def test_model_settings_and_validation_placement_reach_every_row(run_dir):
    directory, results = run_dir
    config = RescoreConfig(runs=[str(directory)], model={"inpaint_cells": [4]}, val_placement="foreground")
    (row,) = rescore(config)["rows"]
    assert row["model"] == {"inpaint_cells": [4]} and row["val_placement"] == "foreground"
    # The inpainted reconstruction is another map than the run's own.
    assert row["test_pixel_auroc"] != pytest.approx(results["pixel_auroc"], abs=1e-6)


def test_validation_kinds_change_validation_and_leave_the_test_alone(run_dir):
    directory, results = run_dir
    (row,) = rescore(RescoreConfig(runs=[str(directory)], val_kinds=["warp"]))["rows"]
    assert row["val_kinds"] == ["warp"]
    assert row["val_pixel_auroc"] != pytest.approx(results["val_pixel_auroc"], abs=1e-6)
    for name in METRICS:
        assert row[f"test_{name}"] == pytest.approx(results[name], abs=1e-6)


def test_an_option_newer_than_the_checkpoint_can_still_be_set(run_dir, tmp_path):
    directory, _ = run_dir
    checkpoint = load_checkpoint(directory / "model.ckpt", mmap=False)
    for name in ("inpaint_cells", "inpaint_grid"):  # as a checkpoint written before the option existed
        checkpoint["hyper_parameters"].pop(name)
    older = tmp_path / "older.ckpt"
    torch.save(checkpoint, older)
    assert load_model(older, fold_batchnorm=False).model.inpaint_cells == ()
    assert load_model(older, fold_batchnorm=False, inpaint_cells=[4]).model.inpaint_cells == (4,)


def test_a_model_setting_without_a_space_after_its_colon_says_so(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["runs=[somewhere]", "model={inpaint_cells: [8],inpaint_training:0}"])
    assert (
        "model setting 'inpaint_training:0' has no value; write a space after each colon"
        in capsys.readouterr().err
    )


def test_per_pixel_statistics_are_fitted_for_a_run_saved_with_global_ones(run_dir):
    directory, results = run_dir
    (row,) = rescore(RescoreConfig(runs=[str(directory)], model={"error_statistics": "per_pixel"}))["rows"]
    # Another standardisation per pixel is another map (the global one only rescales SSL-AE's single term).
    assert row["test_pixel_auroc"] != pytest.approx(results["pixel_auroc"], abs=1e-6)
    # Loading it that way outside rescore says what to do, in one line.
    with pytest.raises(PatchAEError, match="holds global error statistics, not per-pixel ones: retrain with"):
        load_model(directory / "model.ckpt", fold_batchnorm=False, error_statistics="per_pixel")
