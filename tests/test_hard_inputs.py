"""Hard inputs: each gives a correct result or a one-line error naming the file and the fix."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint_fixture import save_checkpoint, session_checkpoint_fixture, train_tiny
from conftest import REPO
from patchae.data import AnomalyImageDataset, ImageTransform, Sample
from patchae.deploy.loading import load_model
from patchae.deploy.predict import Predictor, predict_to_folder
from patchae.errors import PatchAEError
from patchae.models import PatchAEModule
from patchae.thresholds import Thresholds

trained = session_checkpoint_fixture()


@pytest.fixture(scope="module")
def predictor(trained):
    return Predictor.from_checkpoint(trained.ckpt, device="cpu", keep_images=True)


@pytest.fixture(scope="module")
def good_image(trained):
    with Image.open(sorted((trained.data_dir / "test" / "good").glob("*.png"))[0]) as image:
        return image.convert("RGB")


def truncated_png(image: Image.Image, path):
    image.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_one_corrupt_file_does_not_stop_the_others(trained, good_image, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    for i in range(3):
        good_image.save(folder / f"ok_{i}.png")
    truncated_png(good_image, folder / "truncated.png")
    (folder / "garbage.jpg").write_bytes(b"this is not a jpeg")
    (folder / "notes.txt").write_text("not an image: ignored")
    summary = predict_to_folder(trained.ckpt, folder, tmp_path / "out", show_progress=False)
    assert (summary["images"], summary["predicted"]) == (5, 3)
    failed = {e["path"].rsplit("/", 1)[-1]: e["error"] for e in summary["errors"]}
    assert set(failed) == {"truncated.png", "garbage.jpg"}
    for name, error in failed.items():
        assert name in error and "replace or remove the file" in error and "\n" not in error
    assert len(list((tmp_path / "out" / "overlays").glob("*.png"))) == 3
    rows = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert sum(",error," in row for row in rows) == 2 and len(rows) == 6


def test_a_folder_of_only_bad_files_is_an_error(trained, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(PatchAEError, match="none of the 1 input image"):
        predict_to_folder(trained.ckpt, folder, tmp_path / "out", show_progress=False)


def test_grayscale_rgba_and_16_bit_images_score_like_their_rgb_version(predictor, good_image, tmp_path):
    gray = good_image.convert("L")
    gray.save(tmp_path / "gray.png")
    gray.convert("RGB").save(tmp_path / "gray_as_rgb.png")
    rgba = good_image.copy()
    rgba.putalpha(Image.fromarray(np.full((64, 64), 90, dtype=np.uint8)))
    rgba.save(tmp_path / "rgba.png")
    good_image.save(tmp_path / "rgb.png")
    sixteen = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)  # the same picture, 16 bits deep
    sixteen.save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    names = ["gray", "gray_as_rgb", "rgba", "rgb", "sixteen"]
    scores = {
        name: p.score
        for name, p in zip(
            names, predictor.predict_paths([tmp_path / f"{n}.png" for n in names]), strict=True
        )
    }
    assert scores["gray"] == pytest.approx(scores["gray_as_rgb"], abs=1e-6)
    assert scores["sixteen"] == pytest.approx(scores["gray_as_rgb"], abs=1e-6)
    assert scores["rgba"] == pytest.approx(scores["rgb"], abs=1e-6)  # alpha is dropped, not composited
    in_memory = predictor.predict([np.asarray(sixteen), np.asarray(rgba)])
    assert [p.score for p in in_memory] == pytest.approx([scores["sixteen"], scores["rgba"]], abs=1e-6)


@pytest.mark.parametrize(("width", "height"), [(123, 37), (300, 200), (64, 64), (17, 900)])
def test_any_size_is_resized_and_the_map_returned_at_original_size(
    predictor, good_image, tmp_path, width, height
):
    path = tmp_path / f"{width}x{height}.png"
    good_image.resize((width, height)).save(path)
    (result,) = predictor.predict_paths([path])
    assert result.error is None and (result.height, result.width) == (height, width)
    assert result.anomaly_map.shape == (height, width)
    assert 0.0 <= result.anomaly_map.min() <= result.anomaly_map.max() <= 1.0


def test_empty_folder_is_a_one_line_error(trained, tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(PatchAEError, match=f"no images .* in folder {empty}; point input="):
        predict_to_folder(trained.ckpt, empty, tmp_path / "out", show_progress=False)
    done = subprocess.run(
        [
            sys.executable,
            "predict.py",
            f"ckpt={trained.ckpt}",
            f"input={empty}",
            f"output={tmp_path / 'cli'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().startswith("error: no images") and len(done.stderr.strip().splitlines()) == 1
    with pytest.raises(PatchAEError, match="not found"):
        predict_to_folder(trained.ckpt, tmp_path / "nowhere", tmp_path / "out", show_progress=False)
    with pytest.raises(PatchAEError, match="matches no images"):
        predict_to_folder(trained.ckpt, str(tmp_path / "*.png"), tmp_path / "out", show_progress=False)


def save_untrained_checkpoint(path, backbone="resnet18"):
    """A checkpoint in train.py's format, from another backbone, without training (bank = its own patches)."""
    torch.manual_seed(0)
    model = PatchAEModule(
        backbone,
        (2, 3),
        pretrained=False,
        c3=16,
        preprocessing={"image_size": 64, "crop_size": 48},
        scoring={"blur_sigma": 1.0},
    ).eval()
    model.model.scorer.fit(model.model.embed_patches(torch.randn(2, 3, 48, 48)))
    model.thresholds = Thresholds(method="manual", value=1.0, low=0.0, high=2.0)
    return save_checkpoint(model, path)


def test_checkpoint_from_another_backbone_predicts_with_its_own_settings(good_image, tmp_path):
    save_untrained_checkpoint(tmp_path / "resnet.ckpt")
    predictor = Predictor.from_checkpoint(tmp_path / "resnet.ckpt", device="cpu")
    assert predictor.model.hparams.backbone == "resnet18" and predictor.transform.output_size == 48
    (result,) = predictor.predict([good_image.resize((80, 60))])
    assert result.anomaly_map.shape == (60, 80) and result.error is None


def test_checkpoint_whose_weights_do_not_fit_its_backbone_is_a_clear_error(tmp_path):
    checkpoint = save_untrained_checkpoint(tmp_path / "resnet.ckpt")
    checkpoint["hyper_parameters"]["backbone"] = "tf_efficientnet_lite0"
    torch.save(checkpoint, tmp_path / "mixed.ckpt")
    with pytest.raises(
        PatchAEError, match="weights do not fit a PatchAEModule with backbone tf_efficientnet_lite0"
    ) as error:
        load_model(tmp_path / "mixed.ckpt")
    assert "mixed.ckpt" in str(error.value) and "\n" not in str(error.value)


def test_damaged_or_foreign_checkpoints_are_clear_errors(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(PatchAEError, match="cannot read checkpoint .*junk.ckpt"):
        load_model(tmp_path / "junk.ckpt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(PatchAEError, match="is not a patchae checkpoint"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(PatchAEError, match="not found"):
        load_model(tmp_path / "absent.ckpt")


def mask_dataset(tmp_path, image_size, mask_size):
    Image.new("RGB", image_size, (120, 60, 30)).save(tmp_path / "defect.png")
    mask = np.zeros(mask_size[::-1], dtype=np.uint8)
    mask[: mask_size[1] // 2] = 255  # top half
    Image.fromarray(mask).save(tmp_path / "defect_mask.png")
    sample = Sample(tmp_path / "defect.png", 1, tmp_path / "defect_mask.png", "crack")
    return AnomalyImageDataset([sample], ImageTransform(32))


def test_mask_of_the_wrong_size_is_a_clear_error(tmp_path):
    dataset = mask_dataset(tmp_path, (200, 100), (100, 100))
    with pytest.raises(
        PatchAEError, match=r"mask .*defect_mask.png is 100x100 pixels but its image .*defect.png is 200x100"
    ):
        dataset[0]


def test_mask_at_a_lower_resolution_is_resized_along(tmp_path):
    mask = mask_dataset(tmp_path, (200, 100), (100, 50))[0]["mask"]
    assert mask.shape == (1, 32, 32) and mask[0, :16].min() == 1 and mask[0, 16:].max() == 0


def test_category_without_test_good_trains_with_the_label_free_threshold(tmp_path):
    run = train_tiny(tmp_path, "data.n_test_good=0", "data.n_train=6", "data.n_test_defect=3")
    thresholds = load_model(run.ckpt).thresholds
    assert thresholds.method == "quantile" and thresholds.is_set and np.isnan(thresholds.f1)
    summary = predict_to_folder(run.ckpt, run.data_dir, tmp_path / "out", overlays=False, show_progress=False)
    assert summary["predicted"] == 3 and summary["labelled"] == 3  # the category folder means its test/
