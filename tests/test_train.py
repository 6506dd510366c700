"""End to end: train on synthetic data with known defects, reload, and the command line's errors."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import REPO, TINY_RUN
from patchae.models import PatchAEModule
from patchae.train import fit_and_test
from patchae.wandb_media import finish_wandb_run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    overrides = [
        *TINY_RUN,
        f"paths.output_dir={tmp / 'run'}",
        f"data.root={tmp / 'data'}",
        "data.n_train=24",
        "data.n_test_good=8",
        "data.n_test_defect=12",
        "data.synthetic_size=128",
        "data.image_size=128",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return cfg, fit_and_test(cfg)


def test_end_to_end_detects_synthetic_defects(trained_run):
    _, results = trained_run
    assert results["image_auroc"] >= 0.9
    assert results["pixel_auroc"] >= 0.9
    assert results["aupro"] >= 0.7
    assert results["image_f1_max"] >= 0.85


def test_run_directory_holds_results_predictions_overlays_and_checkpoint(trained_run):
    cfg, results = trained_run
    run_dir = Path(cfg.paths.output_dir)
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["image_auroc"] == pytest.approx(results["image_auroc"])
    assert saved["category"] == "synthetic" and saved["model"] == "PatchAEModule"
    assert saved["bank_size"] > 0 and saved["train_seconds"] > 0 and saved["test_images_per_second"] > 0
    rows = (run_dir / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + 8 + 12
    overlays = list((run_dir / "overlays").glob("*.png"))
    assert {p.name.split("_")[0] for p in overlays} == {"good", "scratch", "spot", "patch"}
    assert (run_dir / "model.ckpt").is_file()


def test_reloaded_checkpoint_scores_identically(trained_run):
    cfg, _ = trained_run
    run_dir = Path(cfg.paths.output_dir)
    trained = PatchAEModule.load_from_checkpoint(run_dir / "model.ckpt", pretrained=False, map_location="cpu")
    assert trained.bank_size == json.loads((run_dir / "results.json").read_text())["bank_size"]
    datamodule = instantiate(cfg.data, augment=None, _convert_="all")
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))
    trained.eval()
    with torch.no_grad():
        maps, scores = trained(batch["image"])
        again = PatchAEModule.load_from_checkpoint(run_dir / "model.ckpt", pretrained=False).eval()
        maps_again, scores_again = again(batch["image"])
    assert torch.allclose(scores, scores_again, atol=1e-5)
    assert torch.allclose(maps, maps_again, atol=1e-5)


def run_train(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.root=/nonexistent/mvtec"], "not found"),
        (["category=no_such_category"], "no_such_category"),
        (["data=folder"], "data.normal_dir is required"),
        (["optimized_metric=image_aucroc"], "optimized_metric=image_aucroc is unknown"),
        (["seed=-1"], "seed=-1 must be an integer"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, overrides, expected):
    (tmp_path / "mvtec" / "bottle").mkdir(parents=True)
    result = run_train(
        "backbone=efficientnet_lite0",
        f"data.root={tmp_path / 'mvtec'}",
        *overrides,
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0]
    assert "Traceback" not in result.stderr


def test_corrupt_training_image_names_the_file(tmp_path):
    from patchae.data import generate_synthetic_category

    root = tmp_path / "data"
    category = generate_synthetic_category(
        root, "synthetic", n_train=4, n_test_good=2, n_test_defect=2, image_size=64
    )
    broken = sorted((category / "train" / "good").glob("*.png"))[1]
    broken.write_bytes(broken.read_bytes()[:200])
    result = run_train(
        "data=mvtec",
        f"data.root={root}",
        "category=synthetic",
        "backbone=efficientnet_lite0",
        "data.image_size=64",
        "data.crop_size=null",
        "data.num_workers=2",
        "trainer.max_epochs=1",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 1
    assert f"error: cannot read image {broken}" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_config_key_is_reported_by_hydra():
    result = run_train("loss.alhpa=0.5")
    assert result.returncode != 0
    assert "alhpa" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_failed_job_closes_its_wandb_run(monkeypatch):
    """Lightning skips teardown when a job fails: the next job of a multirun must not log into its run."""
    finished = []
    fake_wandb = SimpleNamespace(run=object(), finish=lambda exit_code: finished.append(exit_code))
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    finish_wandb_run(failed=True)
    assert finished == [1]
    fake_wandb.run = None
    finish_wandb_run(failed=True)  # no open run: nothing to finish
    assert finished == [1]
