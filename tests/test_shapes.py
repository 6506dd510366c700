"""Any image shape: int or [H, W] sizes, squash or keep-aspect resizing, maps back at the original size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint_fixture import train_tiny
from patchae.data import SyntheticDataModule
from patchae.data.transforms import ImageTransform
from patchae.deploy.export import export_model, run_onnx
from patchae.deploy.predict import Predictor, predict_to_folder
from patchae.errors import PatchAEError
from patchae.metrics import AnomalyMetrics
from patchae.models.base import update_metrics

PORTRAIT = (96, 40)  # (H, W) of the generated images: a tall part
MODEL_INPUT = (64, 32)  # data.image_size: also portrait, but of another aspect ratio, so keep_aspect pads


def picture(height: int, width: int, value: int = 200) -> Image.Image:
    return Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8))


def test_int_and_height_width_sizes():
    assert ImageTransform(64).output_shape == (64, 64)
    assert ImageTransform([64, 32]).output_shape == (64, 32)
    assert ImageTransform(256, 224).output_shape == (224, 224)
    assert ImageTransform([256, 128], [192, 96]).output_shape == (192, 96)
    assert ImageTransform([64, 32]).to_unit_tensor(picture(90, 90)).shape == (3, 64, 32)


def test_an_int_crop_is_off_for_a_non_square_size():
    assert ImageTransform([320, 768], 224).output_shape == (320, 768)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"image_size": [64, 32], "resize_mode": "fit"},
            "resize_mode='fit' is unknown; use one of squash, keep_aspect",
        ),
        (
            {"image_size": [64, 32, 3]},
            "image_size must be a positive integer or [height, width], got [64, 32, 3]",
        ),
        ({"image_size": 64, "crop_size": 96}, "crop_size (96) is larger than image_size (64)"),
        ({"image_size": [64, 0]}, "image_size must be a positive integer or [height, width], got [64, 0]"),
    ],
)
def test_bad_geometry_is_one_line(kwargs, message):
    with pytest.raises(PatchAEError) as error:
        ImageTransform(**kwargs)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_keep_aspect_scales_the_long_side_and_pads_with_the_mean_colour():
    transform = ImageTransform(list(MODEL_INPUT), None, resize_mode="keep_aspect")
    # 96 x 40 -> scale min(64/96, 32/40) = 2/3 -> 64 x 27, centred: 2 columns of padding left, 3 right.
    assert transform.content_box(PORTRAIT) == (0, 2, 64, 29)
    image = transform.image(picture(*PORTRAIT, value=255))
    assert image.shape == (3, 64, 32)
    assert image[:, :, :2].abs().max() < 0.02 and image[:, :, 29:].abs().max() < 0.02  # mean colour -> ~0
    assert image[:, :, 2:29].min() > 1.0  # white, normalised
    mask = transform.mask(Image.fromarray(np.full(PORTRAIT, 255, dtype=np.uint8)))
    assert mask.shape == (1, 64, 32) and mask.sum() == 64 * 27
    assert mask[0, :, :2].sum() == 0 and mask[0, :, 29:].sum() == 0


def test_squash_covers_the_whole_input():
    transform = ImageTransform(list(MODEL_INPUT))
    assert transform.content_box(PORTRAIT) == (0, 0, 64, 32)
    assert transform.mask(Image.fromarray(np.full(PORTRAIT, 255, dtype=np.uint8))).sum() == 64 * 32


def test_restore_map_drops_the_padding_and_returns_the_original_size():
    transform = ImageTransform(list(MODEL_INPUT), None, resize_mode="keep_aspect")
    anomaly_map = torch.full(MODEL_INPUT, 100.0)
    anomaly_map[:, 2:29] = 3.0  # the image's part; the padding's 100 must not leak back
    restored = transform.restore_map(anomaly_map, PORTRAIT)
    assert restored.shape == PORTRAIT
    assert torch.allclose(restored, torch.full(PORTRAIT, 3.0))


def test_restore_map_fills_what_the_crop_cut_away_with_the_minimum():
    transform = ImageTransform(8, 4)
    anomaly_map = torch.arange(16.0).reshape(4, 4) + 1
    restored = transform.restore_map(anomaly_map, (8, 8))
    assert restored.shape == (8, 8)
    assert torch.equal(restored[2:6, 2:6], anomaly_map) and restored[0].eq(1.0).all()


def test_pixel_metrics_skip_the_padding():
    # Padding that scores high would count as false positives if it were scored as normal pixels.
    maps = torch.zeros(2, 4, 6)
    maps[:, :, 4:] = 9.0  # padding columns 4 and 5
    maps[1, 1, 1] = 5.0
    masks = torch.zeros(2, 1, 4, 6)
    masks[1, 0, 1, 1] = 1.0
    batch = {"label": torch.tensor([0, 1]), "mask": masks, "has_mask": torch.tensor([True, True])}
    scores = torch.tensor([0.0, 5.0])
    with_padding, without_padding = AnomalyMetrics(), AnomalyMetrics()
    update_metrics(with_padding, scores, maps, batch)
    update_metrics(without_padding, scores, maps, {**batch, "content_box": torch.tensor([[0, 0, 4, 4]] * 2)})
    assert with_padding.compute()["pixel_auroc"] < 0.7
    assert without_padding.compute()["pixel_auroc"] == pytest.approx(1.0)


def test_data_items_carry_their_original_size_and_content_box(tmp_path):
    datamodule = SyntheticDataModule(
        tmp_path, n_train=2, n_test_good=1, n_test_defect=3, synthetic_size=list(PORTRAIT),
        image_size=list(MODEL_INPUT), crop_size=224, resize_mode="keep_aspect",
    )  # fmt: skip
    batch = next(iter(datamodule.test_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 32) and batch["mask"].shape == (4, 1, 64, 32)
    assert batch["original_size"].tolist() == [list(PORTRAIT)] * 4
    assert batch["content_box"].tolist() == [[0, 2, 64, 29]] * 4
    assert batch["mask"][1:].sum() > 0 and batch["mask"][:, :, :, :2].sum() == 0


@pytest.fixture(scope="module")
def portrait_run(tmp_path_factory):
    """Patch AE trained, tested and saved on a portrait synthetic category with keep_aspect."""
    root = tmp_path_factory.mktemp("portrait")
    return train_tiny(
        root,
        f"data.synthetic_size=[{PORTRAIT[0]},{PORTRAIT[1]}]",
        f"data.image_size=[{MODEL_INPUT[0]},{MODEL_INPUT[1]}]",
        "data.resize_mode=keep_aspect",
        "callbacks.results.overlays_per_type=1",
    )


def test_portrait_category_trains_and_tests_end_to_end(portrait_run):
    results = portrait_run.results
    assert results["image_auroc"] >= 0.8 and results["pixel_auroc"] >= 0.8
    overlay = next((portrait_run.ckpt.parent / "overlays").glob("*.png"))
    assert Image.open(overlay).size == (2 * PORTRAIT[1], PORTRAIT[0])  # image | map, at the original size


def test_portrait_predict_returns_maps_at_the_original_size(portrait_run, tmp_path):
    summary = predict_to_folder(
        portrait_run.ckpt,
        portrait_run.data_dir / "test",
        tmp_path / "out",
        save_maps=True,
        show_progress=False,
    )
    assert summary["predicted"] == 12 and summary["accuracy"] >= 0.7
    maps = sorted((tmp_path / "out" / "maps").glob("*.npy"))
    assert len(maps) == 12 and all(np.load(path).shape == PORTRAIT for path in maps)
    landscape = Predictor.from_checkpoint(portrait_run.ckpt, device="cpu").predict([picture(30, 50)])[0]
    assert landscape.anomaly_map.shape == (30, 50)


def test_portrait_export_takes_the_trained_height_and_width(portrait_run, tmp_path):
    result = export_model(portrait_run.ckpt, tmp_path / "export", format="onnx", bank_block=64)
    assert max(result["onnx_max_difference"].values()) < 1e-4
    images = torch.randn(3, 3, *MODEL_INPUT)
    maps, scores, _ = run_onnx(tmp_path / "export" / "model.onnx", images)
    assert maps.shape == (3, *MODEL_INPUT) and scores.shape == (3,)
