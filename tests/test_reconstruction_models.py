"""SSL-AE and DAAD end to end: a tiny run on synthetic data above a bar, checkpoint reload, export."""

from __future__ import annotations

import csv
from typing import Any

import pytest
import torch
from hydra.utils import instantiate

from checkpoint_fixture import train_tiny
from patchae.deploy.export import export_model
from patchae.deploy.loading import load_model
from patchae.models import DAADModule, SSLAEModule

# On top of checkpoint_fixture's tiny run (10 synthetic 64 px images, 2 held out): 8 epochs of batches of 2, so
# that a from-scratch network takes 32 steps; the last weights (no validation), the default statistics.
TINY_RECONSTRUCTION = ["trainer.max_epochs=8", "data.batch_size=2", "validation.enabled=false"]


@torch.no_grad()
def rescore_test_split(model: Any, cfg: Any) -> dict[str, float]:
    """Image score of every test image of the run's data, by ``model``: path -> score."""
    datamodule = instantiate(cfg.data, augment=None, _convert_="all")
    datamodule.setup("test")
    scores = {}
    for batch in datamodule.test_dataloader():
        _, batch_scores = model(batch["image"])
        scores.update(zip(batch["path"], batch_scores.tolist(), strict=True))
    return scores


@pytest.fixture(
    scope="module", params=[("ssl_ae", SSLAEModule), ("daad", DAADModule)], ids=["ssl_ae", "daad"]
)
def trained(request, tmp_path_factory):
    name, cls = request.param
    return cls, train_tiny(tmp_path_factory.mktemp(name), f"model={name}", *TINY_RECONSTRUCTION)


def test_end_to_end_on_synthetic_data(trained):
    # 10 synthetic 64 px images, 8 epochs of 4 steps: the defects (3-15 % of the image) are found.
    cls, run = trained
    assert run.results["model"] == cls.__name__ and run.results["backbone"] == "scratch"
    assert run.results["image_auroc"] > 0.8
    assert run.results["pixel_auroc"] > 0.75


def test_checkpoint_reload_scores_identically(trained):
    cls, run = trained
    model = load_model(run.ckpt)
    assert isinstance(model, cls) and model.is_fitted
    with (run.ckpt.parent / "predictions.csv").open() as handle:
        saved = {row["path"]: float(row["score"]) for row in csv.DictReader(handle)}
    rescored = rescore_test_split(model, run.cfg)
    assert rescored.keys() == saved.keys()
    assert max(abs(rescored[path] - saved[path]) for path in saved) < 1e-5


def test_export_scores_like_the_checkpoint(trained, tmp_path):
    _, run = trained
    result = export_model(run.ckpt, output=tmp_path, format="both", check=True)
    assert max(result["onnx_max_difference"].values()) < 1e-4
    assert max(result["torchscript_max_difference"].values()) < 1e-4
