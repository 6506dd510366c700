"""The acceptance bars on real MVTec AD bottle (run only where ../shared/data/mvtec_ad/bottle exists):
train with the offline backbone, then screen the test folder and export, as a user would."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import REPO, SHARED_MVTEC
from patchae.deploy.export import export_model, reference_outputs, run_onnx, run_torchscript
from patchae.deploy.predict import Predictor, predict_to_folder
from patchae.train import fit_and_test

BOTTLE = SHARED_MVTEC / "bottle"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not BOTTLE.is_dir(), reason="real MVTec AD bottle not at ../shared/data/mvtec_ad"),
]


@pytest.fixture(scope="module")
def bottle_run(tmp_path_factory):
    """One epoch of Patch AE on the real bottle training images (about a minute on 2 CPU cores)."""
    run_dir = tmp_path_factory.mktemp("bottle")
    overrides = [
        "data=mvtec",
        f"data.root={SHARED_MVTEC}",
        "category=bottle",
        "backbone=efficientnet_lite0",
        "trainer.max_epochs=1",
        "logger=none",
        "~callbacks.progress",
        "callbacks.results.overlays_per_type=0",
        f"paths.output_dir={run_dir}",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return fit_and_test(cfg)


def test_detects_and_localises_real_bottle_defects(bottle_run):
    assert bottle_run["image_auroc"] >= 0.98
    assert bottle_run["pixel_auroc"] >= 0.95
    assert bottle_run["aupro"] >= 0.80


@pytest.mark.parametrize(("method", "bar"), [("f1", 0.95), ("quantile", 0.90)])
def test_predict_on_the_test_folder_matches_its_labels(bottle_run, tmp_path, method, bar):
    output = tmp_path / "screening"
    summary = predict_to_folder(
        f"{bottle_run['run_dir']}/model.ckpt",
        BOTTLE / "test",
        output,
        device="cpu",
        threshold_method=method,
        overlays=method == "f1",
        show_progress=False,
    )
    assert summary["predicted"] == summary["labelled"] == 83
    assert summary["accuracy"] >= bar, f"{method} threshold: accuracy {summary['accuracy']:.3f}"
    assert json.loads((output / "summary.json").read_text())["accuracy"] == summary["accuracy"]
    if method == "f1":
        assert len(list((output / "overlays").glob("*.png"))) == 83


def test_exports_score_real_images_like_the_checkpoint(bottle_run, tmp_path):
    ckpt = f"{bottle_run['run_dir']}/model.ckpt"
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    paths = [BOTTLE / "test" / kind / "000.png" for kind in ("good", "broken_large", "contamination")]
    images = torch.stack([predictor.load(path).tensor for path in paths])
    export_model(ckpt, tmp_path, format="both", example=images)
    reference = reference_outputs(predictor.model, predictor.thresholds, images)
    for run_exported, name in ((run_torchscript, "model.torchscript.pt"), (run_onnx, "model.onnx")):
        for expected, actual in zip(reference, run_exported(tmp_path / name, images), strict=True):
            scale = max(1.0, expected.abs().max().item())  # distances of a few units: 1e-4 of their scale
            assert (actual - expected).abs().max().item() <= 1e-4 * scale, name
