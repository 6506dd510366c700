"""data.resize_mode=auto: square parts keep the paper's protocol, others their shape, chosen from the training
images and saved with the model."""

from __future__ import annotations

import logging

import pytest

from checkpoint_fixture import train_tiny
from patchae.checkpoints import load_checkpoint
from patchae.data import SyntheticDataModule
from patchae.data.geometry import choose_geometry
from patchae.errors import PatchAEError


def test_square_images_keep_the_papers_protocol():
    geometry = choose_geometry([(900, 900)] * 3, 256, 224)
    assert (geometry.image_size, geometry.crop_size, geometry.resize_mode) == (256, 224, "squash")


@pytest.mark.parametrize(
    "size, expected",
    [
        ((320, 768), (208, 512)),  # landscape 2.4:1: long side capped at 2 x 256, short side follows
        ((1270, 500), (512, 208)),  # the portrait parts: the shape it measured by hand
        ((1000, 1500), (224, 336)),  # VisA-like 1.5:1: short side at the crop's 224, long side follows
    ],
)
def test_other_shapes_keep_their_aspect_ratio_without_a_crop(size, expected):
    geometry = choose_geometry([size] * 4, 256, 224)
    assert geometry.resize_mode == "keep_aspect" and geometry.crop_size is None
    assert geometry.image_size == expected
    height, width = expected
    assert height % 16 == 0 and width % 16 == 0
    assert abs(width / height - size[1] / size[0]) / (size[1] / size[0]) < 0.1


def test_mixed_sizes_are_padded_and_said():
    geometry = choose_geometry([(500, 1000), (520, 1000), (800, 1000)], 256, 224)
    assert geometry.resize_mode == "keep_aspect"
    assert "3 sizes" in geometry.reason and "padded" in geometry.reason


def test_a_given_height_and_width_is_kept():
    geometry = choose_geometry([(100, 100)], [128, 64], None)
    assert (geometry.image_size, geometry.resize_mode) == ((128, 64), "keep_aspect")


def test_an_unknown_resize_mode_is_one_line(tmp_path):
    with pytest.raises(
        PatchAEError, match=r"^data.resize_mode='fit' is unknown; use auto \(the default\), squash or"
    ):
        SyntheticDataModule(tmp_path, resize_mode="fit")


def test_bad_size_multiple_is_one_line():
    with pytest.raises(PatchAEError, match=r"^data.size_multiple must be a positive integer, got 0$"):
        choose_geometry([(10, 10)], 64, None, size_multiple=0)


def test_the_data_module_chooses_from_its_training_images(tmp_path, caplog):
    datamodule = SyntheticDataModule(
        tmp_path, n_train=4, n_test_good=1, n_test_defect=1, synthetic_size=[48, 128],
        image_size=64, crop_size=48, resize_mode="auto",
    )  # fmt: skip
    datamodule.prepare_data()
    with caplog.at_level(logging.INFO, logger="patchae.data.datamodule"):
        batch = next(iter(datamodule.test_dataloader()))
    # short side 48 (the crop), long side 48 x 128/48 = 128, i.e. the generated 48 x 128 part unchanged
    assert datamodule.transform.resize_mode == "keep_aspect"
    assert batch["image"].shape[-2:] == (48, 128)
    assert "resize_mode=auto chose keep_aspect" in caplog.text


def test_training_saves_the_chosen_shape_for_predict_and_export(tmp_path):
    run = train_tiny(tmp_path, "data.synthetic_size=[96,40]", "data.image_size=64", "data.crop_size=null")
    assert run.cfg.data.resize_mode == "keep_aspect" and list(run.cfg.data.image_size) == [128, 48]
    preprocessing = load_checkpoint(run.ckpt)["hyper_parameters"]["preprocessing"]
    assert preprocessing["resize_mode"] == "keep_aspect" and list(preprocessing["image_size"]) == [128, 48]
    assert run.results["image_auroc"] >= 0.8


def test_square_training_keeps_todays_settings(tmp_path):
    run = train_tiny(tmp_path)
    assert run.cfg.data.resize_mode == "squash" and run.cfg.data.image_size == 64
    preprocessing = load_checkpoint(run.ckpt)["hyper_parameters"]["preprocessing"]
    assert preprocessing["resize_mode"] == "squash" and preprocessing["image_size"] == 64
