"""SSL-AE and DAAD end to end: a tiny run on synthetic data above a bar, checkpoint reload, export."""

from __future__ import annotations

import csv
import itertools
import math
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchmetrics.functional.classification import binary_auroc

from checkpoint_fixture import train_tiny
from patchae import train
from patchae.deploy.export import export_model
from patchae.deploy.loading import load_model
from patchae.errors import PatchAEError
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


@pytest.mark.parametrize("gain", [0.9, 1.1])
def test_normal_images_lit_10_percent_differently_score_below_defective_ones(trained, gain):
    """A global change of lighting is not a defect: the test split's normal images with their brightness and
    contrast changed by 10 % still score below its defective ones (3-15 % of the image), as the unchanged ones do."""
    _, run = trained
    model = load_model(run.ckpt)
    datamodule = instantiate(run.cfg.data, augment=None, _convert_="all")
    datamodule.setup("test")
    mean = torch.tensor(model.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.preprocessing.std).view(1, 3, 1, 1)
    normal, lit, defective = [], [], []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            images, labels = batch["image"], batch["label"].bool()
            raw = images * std + mean
            centre = raw.mean(dim=(1, 2, 3), keepdim=True)
            changed = (((raw - centre) * gain + centre) * gain).clamp(0, 1)  # contrast and brightness
            _, scores = model(images)
            _, lit_scores = model((changed - mean) / std)
            normal += scores[~labels].tolist()
            lit += lit_scores[~labels].tolist()
            defective += scores[labels].tolist()
    assert normal and defective
    lit_auroc = binary_auroc(
        torch.tensor(lit + defective), torch.tensor([0] * len(lit) + [1] * len(defective))
    )
    assert float(lit_auroc) > 0.8
    spread = torch.tensor(normal + defective).std()
    assert float((torch.tensor(lit) - torch.tensor(normal)).abs().max()) < 0.1 * float(spread)


@pytest.mark.parametrize("cls", [SSLAEModule, DAADModule], ids=["ssl_ae", "daad"])
def test_per_image_intensity_cancels_a_global_gain_and_offset_exactly(cls):
    """With ``per_image_intensity`` the error terms of an image lit with another gain and offset are the same;
    without it they differ (the option is what makes the difference)."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    relit = images * 0.8 - 0.3
    sizes = {"block_sizes": (2, 2, 1)} if cls is DAADModule else {}
    for invariant in (True, False):
        model = cls(channels=(4, 8, 16), per_image_intensity=invariant, **sizes)
        terms = model.model.eval().error_terms
        with torch.no_grad():
            same = torch.allclose(terms(images), terms(relit), atol=1e-4)
        assert same == invariant


@pytest.mark.parametrize("name", ["ssl_ae", "daad"])
def test_cosine_schedule_brings_the_rate_to_zero_at_the_end_of_the_fit(name, tmp_path, monkeypatch):
    """model.lr_schedule=cosine: the autoencoder's rate starts at model.lr, is halved half-way through the steps
    and is nearly 0 at the last one, never rising; the discriminator's (DAAD) stays where it is."""
    seen: list[list[float]] = []
    original = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        seen.append([group["lr"] for group in self.param_groups])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    run = train_tiny(tmp_path, f"model={name}", "model.lr_schedule=cosine", *TINY_RECONSTRUCTION)
    lr = run.cfg.model.lr
    autoencoder = seen
    if name == "daad":  # each step: the discriminator's optimiser first, then the autoencoder's
        autoencoder = seen[1::2]
        assert {rates[0] for rates in seen[::2]} == {run.cfg.model.discriminator_lr}
    assert len(autoencoder) == 32  # 8 epochs of 4 steps
    assert autoencoder[0][0] == pytest.approx(lr)
    assert autoencoder[16][0] == pytest.approx(lr / 2)
    assert autoencoder[-1][0] == pytest.approx(lr * (1 + math.cos(math.pi * 31 / 32)) / 2)
    assert all(a[0] >= b[0] for a, b in itertools.pairwise(autoencoder))
    assert run.results["image_auroc"] > 0.8  # still a detector


def test_bf16_mixed_precision_trains_validates_and_tests(tmp_path, monkeypatch):
    """trainer.precision=bf16-mixed runs through validation and test (their maps once came out in bf16, which
    NumPy cannot read) and still detects; taken as asked here whatever CPU runs the test."""
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: True)
    run = train_tiny(tmp_path, "model=ssl_ae", "trainer.precision=bf16-mixed", *TINY_RECONSTRUCTION[:2])
    assert run.results["precision"] == "bf16-mixed"
    assert run.results["image_auroc"] > 0.8
    assert run.results["val_image_auroc"] > 0.5


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_it_in_hardware_trains_in_float32_and_says_so(native, monkeypatch, caplog):
    """Emulated bf16 would be slower than float32: the run falls back, warns, and its config says what ran."""
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: native)
    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu", "precision": "bf16-mixed"}})
    train.record_precision(cfg)
    assert cfg.trainer.precision == ("bf16-mixed" if native else "32-true")
    assert ("no bf16 in hardware" in caplog.text) is not native
    gpu = OmegaConf.create({"trainer": {"accelerator": "gpu", "precision": "bf16-mixed"}})
    train.record_precision(gpu)
    assert gpu.trainer.precision == "bf16-mixed"  # a GPU's own business


def test_ssl_ae_trained_and_scored_by_inpainting_detects(tmp_path):
    """model.inpaint_training runs through training, validation and test, and the inpainted map still detects."""
    run = train_tiny(
        tmp_path,
        "model=ssl_ae",
        "model.inpaint_cells=[4]",
        "model.inpaint_grid=2",
        "model.inpaint_training=0.5",
        *TINY_RECONSTRUCTION[:2],
    )
    assert run.results["image_auroc"] > 0.8
    assert 0.0 <= run.results["val_image_auroc"] <= 1.0  # validated with the inpainted map (2 images: no bar)


def test_folded_ssl_ae_detects_reloads_and_exports(tmp_path):
    """model.fold=2 runs through training, testing, reloading and ONNX / TorchScript export with equal scores."""
    run = train_tiny(tmp_path / "run", "model=ssl_ae", "model.fold=2", *TINY_RECONSTRUCTION)
    assert run.results["image_auroc"] > 0.8
    assert load_model(run.ckpt).model.network.fold == 2
    result = export_model(run.ckpt, output=tmp_path / "export", format="both", check=True)
    assert max(result["onnx_max_difference"].values()) < 1e-4
    assert max(result["torchscript_max_difference"].values()) < 1e-4


def test_unknown_schedule_says_which_exist(tmp_path):
    with pytest.raises(PatchAEError, match="model.lr_schedule='step' is not one of constant, cosine"):
        train_tiny(tmp_path, "model=ssl_ae", "model.lr_schedule=step", *TINY_RECONSTRUCTION)
