"""SSL-AE: shapes, the corrupted training input, an end-to-end run on synthetic data, checkpoint reload, export."""

import csv

import pytest
import torch

from checkpoint_fixture import train_tiny
from patchae.errors import PatchAEError
from patchae.export import export_model
from patchae.models import SSLAEModule
from patchae.predict import load_model
from reconstruction_checks import TINY_RECONSTRUCTION, rescore_test_split

CHANNELS = (4, 8, 16)


def test_shapes():
    model = SSLAEModule(channels=CHANNELS, image_size=32)
    images = torch.randn(2, 3, 32, 48)
    assert model.model(images).shape == (2, 3, 32, 48)
    assert model.error_terms(images).shape == (2, 1, 32, 48)
    model.fit_normal_statistics([{"image": torch.randn(3, 3, 32, 32)}])
    maps, scores = model(images)
    assert maps.shape == (2, 32, 48) and scores.shape == (2,)
    assert torch.allclose(scores, maps.flatten(1).amax(dim=1))


def test_untrained_model_and_bad_sizes_say_what_to_do():
    model = SSLAEModule(channels=CHANNELS)
    with pytest.raises(PatchAEError, match="no normal-image statistics; train it first"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(PatchAEError) as error:
        model.error_terms(torch.randn(1, 3, 30, 32))
    assert str(error.value) == (
        "image size (30, 32) must be a multiple of 4 (the coarsest level of model.channels, or memory block); "
        "change data.image_size / data.crop_size"
    )
    with pytest.raises(PatchAEError, match="reweight needs a memory bank"):
        SSLAEModule(image_score="reweight")


def test_standardised_map_has_zero_mean_unit_std_on_the_fitting_images():
    model = SSLAEModule(channels=CHANNELS, blur_sigma=0.0).eval()
    batch = {"image": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    model.fit_normal_statistics([batch])
    with torch.no_grad():
        standard = model.patch_scores(batch["image"])
    assert abs(float(standard.mean())) < 1e-4 and abs(float(standard.std()) - 1) < 1e-3


def test_corrupted_input_is_deterministic_and_the_target_clean():
    model = SSLAEModule(channels=CHANNELS, seed=3)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    first, again, later = model.corrupt(images, 5), model.corrupt(images, 5), model.corrupt(images, 6)
    assert torch.equal(first, again) and not torch.equal(first, later)
    assert not torch.equal(first, images) and first.shape == images.shape


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("ssl_ae"), "model=ssl_ae", *TINY_RECONSTRUCTION)


def test_end_to_end_on_synthetic_data(trained):
    # 10 synthetic 64 px images, 8 epochs of 4 steps: the defects (3-15 % of the image) are found.
    assert trained.results["model"] == "SSLAEModule" and trained.results["backbone"] == "scratch"
    assert trained.results["image_auroc"] > 0.8
    assert trained.results["pixel_auroc"] > 0.75


def test_checkpoint_reload_scores_identically(trained):
    model = load_model(trained.ckpt)
    assert isinstance(model, SSLAEModule) and model.is_fitted
    with (trained.ckpt.parent / "predictions.csv").open() as handle:
        saved = {row["path"]: float(row["score"]) for row in csv.DictReader(handle)}
    rescored = rescore_test_split(model, trained.cfg)
    assert rescored.keys() == saved.keys()
    assert max(abs(rescored[path] - saved[path]) for path in saved) < 1e-5


def test_export_scores_like_the_checkpoint(trained, tmp_path):
    result = export_model(trained.ckpt, output=tmp_path, format="both", check=True)
    assert max(result["onnx_max_difference"].values()) < 1e-4
    assert max(result["torchscript_max_difference"].values()) < 1e-4


def test_pretrained_encoder_option():
    model = SSLAEModule(channels=(8,), backbone="tf_efficientnet_lite0", pretrained=False, encoder_lr=1e-5)
    assert model.model.channels == [8, 16, 24, 40, 112]  # level 0 ours, then the stages at strides 2 .. 16
    assert model.model(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    model.train()
    batchnorms = [m for m in model.model.pretrained.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms and not any(m.training for m in batchnorms)
    groups = model.configure_optimizers().param_groups
    assert [group["lr"] for group in groups] == [1e-3, 1e-5]
    with pytest.raises(PatchAEError) as error:
        SSLAEModule(backbone="tf_efficientnet_lite0", encoder_layers=(2, 3), pretrained=False)
    assert str(error.value) == (
        "model.encoder_layers=[2, 3] of tf_efficientnet_lite0 are at strides [8, 16]; the encoder needs "
        "consecutive stages at strides 2, 4, 8, ..., e.g. model.encoder_layers=[0,1,2,3]"
    )
