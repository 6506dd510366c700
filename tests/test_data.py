"""Data layer: image reading, transforms, sample listing, synthetic data, data modules, download."""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_MVTEC
from patchae.data import (
    MVTEC_CATEGORIES,
    CutPaste,
    FolderDataModule,
    ImageTransform,
    MVTecDataModule,
    SyntheticDataModule,
    folder_samples,
    generate_synthetic_category,
    load_mask,
    load_rgb,
    mvtec_samples,
)
from patchae.data.download import download_mvtec, safe_extract
from patchae.data.synthetic import DEFECT_TYPES, MARKER_FILE, main
from patchae.errors import PatchAEError

SMALL = {"n_train": 8, "n_test_good": 3, "n_test_defect": 6, "image_size": 64}


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_category(root, "synthetic", seed=0, **SMALL)
    return root


def _save(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _noise(size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# ---- images --------------------------------------------------------------------------------------------


def test_load_rgb_converts_every_mode_to_8_bit_rgb(tmp_path: Path) -> None:
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgb = np.asarray(load_rgb(_save(gray, tmp_path / "gray.png")))
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == gray).all() and (rgb[..., 1] == gray).all()

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3], rgba[..., 3] = (10, 200, 30), 0  # fully transparent: colour is still kept
    assert np.asarray(load_rgb(_save(rgba, tmp_path / "rgba.png")))[0, 0].tolist() == [10, 200, 30]

    sixteen = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path16 = _save(sixteen, tmp_path / "sixteen.png")
    assert Image.open(path16).mode.startswith("I")
    assert np.asarray(load_rgb(path16))[0, :, 0].tolist() == [0, 1, 128, 255]  # scaled, not clipped
    big_endian = Image.frombytes("I;16B", (4, 4), sixteen.astype(">u2").tobytes())
    big_endian.save(tmp_path / "sixteen.tif")
    assert np.asarray(load_rgb(tmp_path / "sixteen.tif"))[0, :, 2].tolist() == [0, 1, 128, 255]

    floats = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(floats).save(tmp_path / "float.tif")
    assert np.asarray(load_rgb(tmp_path / "float.tif"))[0, :, 1].tolist() == [0, 128, 255]

    palette = Image.new("RGB", (4, 4), (255, 0, 0)).convert("P")
    palette.save(tmp_path / "palette.png")
    assert np.asarray(load_rgb(tmp_path / "palette.png"))[0, 0].tolist() == [255, 0, 0]


def test_corrupt_truncated_and_missing_images_name_the_file(tmp_path: Path) -> None:
    data = io.BytesIO()
    Image.fromarray(_noise(64)).save(data, format="PNG")
    truncated = tmp_path / "truncated_img.png"
    truncated.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    with pytest.raises(PatchAEError, match=r"cannot read image .*truncated_img\.png: .*replace or remove"):
        load_rgb(truncated)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(PatchAEError, match="garbage.jpg"):
        load_rgb(garbage)
    with pytest.raises(PatchAEError, match="missing_mask.png"):
        load_mask(tmp_path / "missing_mask.png")


def test_load_mask_is_binary_for_any_nonzero_value(tmp_path: Path) -> None:
    mask = np.zeros((10, 10, 3), dtype=np.uint8)
    mask[2:5, 3:7, 2] = 1  # a faint blue annotation still counts
    loaded = load_mask(_save(mask, tmp_path / "mask.png"))
    values = np.asarray(loaded)
    assert loaded.mode == "L" and set(np.unique(values).tolist()) == {0, 255}
    assert (values > 0).sum() == 12


# ---- transforms ----------------------------------------------------------------------------------------


def test_transform_shapes_range_and_normalisation() -> None:
    pil = Image.fromarray(_noise(50))
    transform = ImageTransform(image_size=40, crop_size=32)
    unit = transform.to_unit_tensor(pil)
    assert unit.shape == (3, 32, 32) and unit.dtype == torch.float32
    assert 0.0 <= float(unit.min()) and float(unit.max()) <= 1.0
    normalised = transform.image(pil)
    mean, std = torch.tensor(transform.mean).view(3, 1, 1), torch.tensor(transform.std).view(3, 1, 1)
    torch.testing.assert_close(normalised, (unit - mean) / std)
    torch.testing.assert_close(transform.denormalize(normalised), unit)
    assert ImageTransform(image_size=40, crop_size=None).image(pil).shape == (3, 40, 40)


def test_mask_transform_stays_binary_and_aligned_with_the_image() -> None:
    square = np.zeros((97, 97), dtype=np.uint8)
    square[20:60, 30:80] = 255
    transform = ImageTransform(image_size=61, crop_size=53)
    mask = transform.mask(Image.fromarray(square))
    assert mask.shape == (1, 53, 53) and set(mask.unique().tolist()) == {0.0, 1.0}
    bright = transform.to_unit_tensor(Image.fromarray(square).convert("RGB"))[0] > 0.5
    overlap = (bright & (mask[0] > 0)).sum() / (bright | (mask[0] > 0)).sum()
    assert overlap > 0.9


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 224, "crop_size": 256}, "crop_size .256. is larger than image_size .224."),
        ({"image_size": 0}, "image_size must be a positive integer"),
        ({"image_size": 64, "std": (0.2, 0.0, 0.2)}, "std values must be positive"),
        ({"image_size": 64, "mean": (0.5, 0.5)}, "mean and std need 3 values"),
    ],
)
def test_transform_rejects_nonsense_sizes(kwargs: dict, message: str) -> None:
    with pytest.raises(PatchAEError, match=message):
        ImageTransform(**kwargs)


# ---- synthetic -----------------------------------------------------------------------------------------


def test_synthetic_layout_and_masks(synthetic_root: Path) -> None:
    category = synthetic_root / "synthetic"
    assert len(list((category / "train" / "good").glob("*.png"))) == SMALL["n_train"]
    assert len(list((category / "test" / "good").glob("*.png"))) == SMALL["n_test_good"]
    for defect in DEFECT_TYPES:
        images = sorted((category / "test" / defect).glob("*.png"))
        assert len(images) == SMALL["n_test_defect"] // len(DEFECT_TYPES)
        for image_path in images:
            mask = np.asarray(Image.open(category / "ground_truth" / defect / f"{image_path.stem}_mask.png"))
            assert mask.shape == (64, 64) and set(np.unique(mask).tolist()) == {0, 255}
            assert 0.03 <= (mask > 0).mean() <= 0.15
            image = np.asarray(Image.open(image_path)).astype(np.float64)
            # The defect is visible: its mean colour is far from the fabric around it.
            inside, outside = image[mask > 0].mean(axis=0), image[mask == 0].mean(axis=0)
            assert np.abs(inside - outside).max() > 25, (defect, image_path.name)


def test_synthetic_is_deterministic_reused_and_protective(synthetic_root: Path, tmp_path: Path) -> None:
    again = generate_synthetic_category(tmp_path / "a", "synthetic", seed=0, **SMALL)
    reference = synthetic_root / "synthetic"
    files = sorted(p.relative_to(reference) for p in reference.rglob("*.png"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.png"))
    assert all((reference / f).read_bytes() == (again / f).read_bytes() for f in files)
    other_seed = generate_synthetic_category(tmp_path / "b", "synthetic", seed=1, **SMALL)
    assert (other_seed / files[0]).read_bytes() != (reference / files[0]).read_bytes()

    stamp = (again / files[0]).stat().st_mtime_ns
    assert generate_synthetic_category(tmp_path / "a", "synthetic", seed=0, **SMALL) == again
    assert (again / files[0]).stat().st_mtime_ns == stamp  # complete: skipped
    generate_synthetic_category(tmp_path / "a", "synthetic", seed=0, **{**SMALL, "n_train": 5})
    assert len(list((again / "train" / "good").glob("*.png"))) == 5  # other parameters: rebuilt

    foreign = tmp_path / "c" / "synthetic"
    foreign.mkdir(parents=True)
    (foreign / "precious.txt").write_text("user data")
    with pytest.raises(PatchAEError, match="not generated by patchae"):
        generate_synthetic_category(tmp_path / "c", "synthetic", **SMALL)
    generate_synthetic_category(tmp_path / "c", "synthetic", overwrite=True, **SMALL)
    assert not (foreign / "precious.txt").exists() and (foreign / MARKER_FILE).is_file()
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_synthetic_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--root", str(tmp_path), "--category", "cli", "--n-train", "2", "--n-test-good", "1"]
    assert main([*args, "--n-test-defect", "3", "--image-size", "48"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert len(mvtec_samples(tmp_path, "cli", "test")) == 4
    assert main([*args, "--image-size", "8"]) == 2
    assert "error: synthetic image_size" in capsys.readouterr().err


# ---- MVTec layout --------------------------------------------------------------------------------------


def test_mvtec_samples_on_a_synthetic_category(synthetic_root: Path) -> None:
    train = mvtec_samples(synthetic_root, "synthetic", "train")
    test = mvtec_samples(synthetic_root, "synthetic", "test")
    assert len(train) == SMALL["n_train"] and all(s.label == 0 and s.mask_path is None for s in train)
    assert [s.path.name for s in train] == sorted(s.path.name for s in train)
    assert len(test) == SMALL["n_test_good"] + SMALL["n_test_defect"]
    defects = [s for s in test if s.label == 1]
    assert len(defects) == SMALL["n_test_defect"] and all(s.mask_path.is_file() for s in defects)
    assert {s.defect_type for s in defects} == set(DEFECT_TYPES)
    assert all(
        s.mask_path.name == f"{s.path.stem}_mask.png" and s.defect_type in s.mask_path.parts for s in defects
    )
    assert test == mvtec_samples(synthetic_root, "synthetic", "test")  # deterministic order


def test_mvtec_errors_are_one_clear_line(tmp_path: Path, synthetic_root: Path) -> None:
    with pytest.raises(
        PatchAEError, match=r"MVTec AD root .*nowhere not found; set data.root=<path> or data.download=true"
    ):
        mvtec_samples(tmp_path / "nowhere", "bottle", "train")
    with pytest.raises(PatchAEError, match=r"unknown category 'bolt'.*folders found in .*: synthetic"):
        mvtec_samples(synthetic_root, "bolt", "train")
    with pytest.raises(PatchAEError, match=r"category 'cable' not found .*data.download=true"):
        mvtec_samples(synthetic_root, "cable", "test")
    with pytest.raises(PatchAEError, match="unknown split 'val'"):
        mvtec_samples(synthetic_root, "synthetic", "val")
    assert "cable" in MVTEC_CATEGORIES and len(MVTEC_CATEGORIES) == 15

    custom = tmp_path / "custom"
    (custom / "train" / "good").mkdir(parents=True)
    with pytest.raises(PatchAEError, match=r"no training images in .*train/good"):
        mvtec_samples(tmp_path, "custom", "train")
    _save(_noise(), custom / "test" / "crack" / "007.png")
    # Without ground_truth/ the data is image-level: no masks, pixel metrics n/a, not an error.
    (sample,) = mvtec_samples(tmp_path, "custom", "test")
    assert sample.label == 1 and sample.mask_path is None and not sample.has_pixel_labels
    (custom / "ground_truth" / "crack").mkdir(parents=True)  # with it, a missing mask is a mistake
    with pytest.raises(
        PatchAEError, match=r"defect image .*crack/007\.png has no mask: expected .*007_mask\.png"
    ):
        mvtec_samples(tmp_path, "custom", "test")


def test_category_without_good_test_images_works_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    category = tmp_path / "widget"
    _save(_noise(), category / "train" / "good" / "000.png")
    _save(_noise(seed=1), category / "test" / "dent" / "000.png")
    _save(np.full((32, 32), 255, np.uint8), category / "ground_truth" / "dent" / "000_mask.png")
    with caplog.at_level(logging.WARNING):
        samples = mvtec_samples(tmp_path, "widget", "test")
    assert [(s.label, s.defect_type) for s in samples] == [(1, "dent")]
    assert "no good test images" in caplog.text


@pytest.mark.skipif(not (SHARED_MVTEC / "bottle").is_dir(), reason="MVTec AD bottle not available")
def test_real_mvtec_bottle_counts() -> None:
    train = mvtec_samples(SHARED_MVTEC, "bottle", "train")
    test = mvtec_samples(SHARED_MVTEC, "bottle", "test")
    assert len(train) == 209 and len(test) == 83
    assert sum(s.mask_path is not None for s in test) == 63 == sum(s.label for s in test)


# ---- folders -------------------------------------------------------------------------------------------


@pytest.fixture()
def user_folders(tmp_path: Path) -> dict[str, Path]:
    for index in range(10):
        _save(_noise(seed=index), tmp_path / "ok" / f"ok_{index:02d}.jpg")
    for index, name in enumerate(["a", "b", "c"]):
        _save(_noise(seed=100 + index), tmp_path / "bad" / f"{name}.png")
    square = np.zeros((32, 32), np.uint8)
    square[8:16, 8:16] = 255
    _save(square, tmp_path / "masks" / "a.png")
    _save(square, tmp_path / "masks" / "b_mask.png")
    return {"normal_dir": tmp_path / "ok", "abnormal_dir": tmp_path / "bad", "mask_dir": tmp_path / "masks"}


def test_folder_samples_split_and_mask_matching(user_folders: dict[str, Path]) -> None:
    train = folder_samples(**user_folders, split="train", test_split_ratio=0.2, seed=0)
    test = folder_samples(**user_folders, split="test", test_split_ratio=0.2, seed=0)
    assert len(train) == 8 and all(s.label == 0 for s in train)
    held_out = [s for s in test if s.label == 0]
    assert len(held_out) == 2 and not {s.path for s in held_out} & {s.path for s in train}
    masks = {s.path.stem: s.mask_path for s in test if s.label == 1}
    assert masks["a"].name == "a.png" and masks["b"].name == "b_mask.png" and masks["c"] is None
    assert folder_samples(**user_folders, split="train", seed=1) != train  # the hold-out depends on seed
    assert folder_samples(**user_folders, split="train", seed=0) == train

    only_normals = folder_samples(user_folders["normal_dir"], split="train")
    assert len(only_normals) == 10 and folder_samples(user_folders["normal_dir"], split="test") == []
    separate = folder_samples(
        user_folders["normal_dir"], normal_test_dir=user_folders["normal_dir"], split="train"
    )
    assert len(separate) == 10


def test_folder_samples_errors(user_folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(PatchAEError, match=r"normal_dir .*absent not found"):
        folder_samples(tmp_path / "absent")
    nested = tmp_path / "nested"
    _save(_noise(), nested / "inner" / "x.png")
    with pytest.raises(PatchAEError, match=r"contains no images .*subfolders inner"):
        folder_samples(nested)
    with pytest.raises(PatchAEError, match="mask_dir .* is set but abnormal_dir is not"):
        folder_samples(user_folders["normal_dir"], mask_dir=user_folders["mask_dir"])
    with pytest.raises(PatchAEError, match="test_split_ratio"):
        folder_samples(**user_folders, test_split_ratio=1.0)


# ---- data modules --------------------------------------------------------------------------------------


def test_synthetic_datamodule_batches(synthetic_root: Path) -> None:
    datamodule = SyntheticDataModule(
        root=synthetic_root,
        synthetic_size=64,
        n_train=8,
        n_test_good=3,
        n_test_defect=6,
        image_size=64,
        crop_size=56,
        batch_size=4,
        eval_batch_size=5,
        augment=CutPaste(probability=0.5, scar_length=(6, 12), scar_width=(2, 4)),
    )
    datamodule.setup()
    assert datamodule.image_shape == (56, 56) and datamodule.num_train == 8 and datamodule.num_test == 9

    train_batches = list(datamodule.train_dataloader())
    assert len(train_batches) == 2
    for batch in train_batches:
        assert batch["image"].shape == (4, 3, 56, 56) and batch["mask"].shape == (4, 1, 56, 56)
        assert batch["label"].dtype == torch.int64 and batch["has_mask"].all()
        assert torch.equal(batch["label"], batch["mask"].flatten(1).amax(1).long())  # label 1 <=> pasted
        pixels = datamodule.transform.denormalize(batch["image"])
        assert pixels.min() > -1e-4 and pixels.max() < 1 + 1e-4
    labels = torch.cat([b["label"] for b in train_batches])
    assert 0 < labels.sum() < 8  # p = 0.5 over 8 images, seeded

    bank = list(datamodule.bank_dataloader())
    assert [len(b["path"]) for b in bank] == [5, 3] and all(b["label"].sum() == 0 for b in bank)
    assert [p for b in bank for p in b["path"]] == [str(s.path) for s in datamodule.train_samples]
    assert all(b["mask"].sum() == 0 for b in bank)

    test = [item for batch in datamodule.test_dataloader() for item in _unbatch(batch)]
    assert len(test) == 9
    for item in test:
        if item["defect_type"] == "good":
            assert item["label"] == 0 and item["mask"].sum() == 0 and item["has_mask"]
        else:
            assert item["label"] == 1 and item["mask"].sum() > 0 and item["has_mask"]
            assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert [len(b["path"]) for b in datamodule.predict_dataloader()] == [5, 4]


def _unbatch(batch: dict) -> list[dict]:
    return [{key: value[i] for key, value in batch.items()} for i in range(len(batch["path"]))]


def augmented_datamodule(synthetic_root: Path, **settings: Any) -> SyntheticDataModule:
    """8 synthetic 48 px training images in batches of 4, each given a CutPaste defect (seed 7)."""
    return SyntheticDataModule(
        root=synthetic_root,
        synthetic_size=64,
        **{k: v for k, v in SMALL.items() if k != "image_size"},
        image_size=48,
        batch_size=4,
        augment=CutPaste(probability=1.0),
        seed=7,
        **settings,
    )


def two_epochs(loader: torch.utils.data.DataLoader) -> list[list[dict]]:
    """The batches of two training epochs, as Lightning would run them."""
    epochs = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)  # what Lightning does before each epoch
        epochs.append(list(loader))
    return epochs


def test_augmentation_is_reproducible_per_epoch_and_across_workers(synthetic_root: Path) -> None:
    def run(num_workers: int) -> list[torch.Tensor]:
        datamodule = augmented_datamodule(synthetic_root, crop_size=None, num_workers=num_workers)
        return [torch.cat([b["image"] for b in epoch]) for epoch in two_epochs(datamodule.train_dataloader())]

    in_process, with_workers = run(0), run(2)
    assert not torch.equal(in_process[0], in_process[1])  # new order and new defects every epoch
    for a, b in zip(in_process, with_workers, strict=True):
        assert torch.equal(a, b)


def test_decoded_training_images_give_the_same_batches_as_reading_the_files(
    synthetic_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """data.cache_mb: the training images are decoded once into memory; batches (augmented, over epochs, in the
    loader's workers too) and the bank's images are exactly those read from disk. Over the budget: read from disk."""

    def batches(cache_mb: float, num_workers: int) -> tuple[list[torch.Tensor], Any]:
        datamodule = augmented_datamodule(
            synthetic_root, crop_size=40, num_workers=num_workers, cache_mb=cache_mb
        )
        loader = datamodule.train_dataloader()
        seen = [torch.cat([b["image"], b["mask"]], dim=1) for epoch in two_epochs(loader) for b in epoch]
        seen += [b["image"] for b in datamodule.bank_dataloader()]
        return seen, loader.dataset.decoded

    from_disk, none = batches(0, 0)
    assert none is None
    for cache_mb, workers in ((1024, 0), (1024, 2)):
        cached, decoded = batches(cache_mb, workers)
        assert decoded is not None and decoded.pixels.dtype == torch.uint8
        assert all(torch.equal(a, b) for a, b in zip(from_disk, cached, strict=True))
    with caplog.at_level(logging.INFO):
        _, over_budget = batches(0.001, 0)  # 8 images of 3 x 40 x 40 bytes > 1 kB
    assert over_budget is None and "over data.cache_mb=0.001: read every epoch" in caplog.text
    with pytest.raises(PatchAEError, match="data.cache_mb must be a number of megabytes >= 0"):
        SyntheticDataModule(root=synthetic_root, cache_mb=-1)


def test_folder_datamodule(user_folders: dict[str, Path]) -> None:
    datamodule = FolderDataModule(
        **user_folders, image_size=32, crop_size=None, eval_batch_size=8, batch_size=4
    )
    datamodule.setup()
    assert datamodule.num_train == 8 and datamodule.category == "custom"
    batch = next(iter(datamodule.test_dataloader()))
    assert batch["label"].tolist() == [0, 0, 1, 1, 1]
    assert batch["has_mask"].tolist() == [True, True, True, True, False]
    assert batch["mask"][2].sum() == 64 and batch["mask"][4].sum() == 0  # 8x8 square at the same scale
    assert batch["defect_type"] == ["good", "good", "abnormal", "abnormal", "abnormal"]

    train_only = FolderDataModule(user_folders["normal_dir"], image_size=32, crop_size=None)
    with pytest.raises(PatchAEError, match="no test images for custom; set data.abnormal_dir"):
        train_only.test_dataloader()


def test_datamodule_setup_errors(tmp_path: Path, synthetic_root: Path) -> None:
    missing = MVTecDataModule(tmp_path / "mvtec", "bottle")
    missing.prepare_data()  # download=False: nothing happens
    with pytest.raises(PatchAEError, match="MVTec AD root .* not found"):
        missing.setup("fit")
    with pytest.raises(PatchAEError, match="crop_size"):
        MVTecDataModule(tmp_path, "bottle", image_size=128, crop_size=224)
    with pytest.raises(PatchAEError, match="data.batch_size must be an integer >= 1"):
        MVTecDataModule(tmp_path, "bottle", batch_size=0)
    with pytest.raises(PatchAEError, match="unknown split 'validation'"):
        MVTecDataModule(synthetic_root, "synthetic").samples("validation")
    with pytest.raises(PatchAEError, match="normal_dir is required"):
        FolderDataModule(None)


# ---- download ------------------------------------------------------------------------------------------


def _tar_xz(path: Path, members: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None) -> str:
    with tarfile.open(path, "w:xz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _png_bytes() -> bytes:
    data = io.BytesIO()
    Image.fromarray(_noise(8)).save(data, format="PNG")
    return data.getvalue()


def test_download_extracts_a_verified_archive(tmp_path: Path) -> None:
    archive = tmp_path / "source" / "mvtec_anomaly_detection.tar.xz"
    archive.parent.mkdir()
    members = {
        "license.txt": b"CC BY-NC-SA 4.0",
        "bottle/train/good/000.png": _png_bytes(),
        "cable/train/good/000.png": _png_bytes(),
    }
    digest = _tar_xz(archive, members)
    root = tmp_path / "mvtec"
    download_mvtec(root, url=archive.as_uri(), sha256=digest)
    assert (root / "bottle" / "train" / "good" / "000.png").read_bytes() == members[
        "bottle/train/good/000.png"
    ]
    assert (root / "cable").is_dir() and (root / "license.txt").is_file()
    assert sorted(p.name for p in root.iterdir()) == [
        "bottle",
        "cable",
        "license.txt",
        "mvtec_anomaly_detection.tar.xz",  # kept: the next category extracts without downloading again
    ]
    shutil.rmtree(root / "cable")
    archive.unlink()  # the source is gone: only the kept archive can serve
    download_mvtec(root, "cable", url=archive.as_uri(), sha256=digest)
    assert (root / "cable" / "train" / "good" / "000.png").is_file()
    digest = _tar_xz(archive, members)  # the source again, for the next download

    only_cable = tmp_path / "only_cable"
    download_mvtec(only_cable, "cable", url=archive.as_uri(), sha256=digest.upper())
    assert sorted(p.name for p in only_cable.iterdir()) == ["cable", "license.txt", archive.name]
    assert len(mvtec_samples(only_cable, "cable", "train")) == 1


def test_download_rejects_a_wrong_checksum_and_unreachable_urls(tmp_path: Path) -> None:
    archive = tmp_path / "archive.tar.xz"
    digest = _tar_xz(archive, {"bottle/x.txt": b"x"})
    root = tmp_path / "mvtec"
    wrong = "0" * 64
    with pytest.raises(PatchAEError, match=f"checksum mismatch .*expected sha256 {wrong}, got {digest}"):
        download_mvtec(root, url=archive.as_uri(), sha256=wrong)
    assert list(root.iterdir()) == []  # neither the .part file nor anything extracted is left
    with pytest.raises(
        PatchAEError, match=r"could not download MVTec AD from file:.*absent\.tar\.xz .*set data.root"
    ):
        download_mvtec(root, url=(tmp_path / "absent.tar.xz").as_uri())


@pytest.mark.parametrize(
    ("members", "links", "reason"),
    [
        ({"bottle/ok.txt": b"ok", "../evil.txt": b"evil"}, None, "contains '..'"),
        ({"bottle/../../evil.txt": b"evil"}, None, "contains '..'"),
        ({"/tmp/evil_absolute.txt": b"evil"}, None, "absolute path"),
        ({}, {"bottle/passwd": (tarfile.SYMTYPE, "/etc/passwd")}, "links to the absolute path"),
        ({}, {"bottle/up": (tarfile.SYMTYPE, "../../evil_dir")}, "links outside"),
        (
            {"bottle/a.txt": b"a"},
            {"bottle/hard": (tarfile.LNKTYPE, "../outside.txt")},
            "contains '..'|links outside",
        ),
    ],
)
def test_extraction_refuses_path_traversal(
    tmp_path: Path, members: dict, links: dict | None, reason: str
) -> None:
    archive = tmp_path / "evil.tar.xz"
    digest = _tar_xz(archive, members, links)
    root = tmp_path / "inside" / "mvtec"
    with pytest.raises(PatchAEError, match=f"refusing to extract .*({reason})"):
        download_mvtec(root, url=archive.as_uri(), sha256=digest)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "inside" / "evil.txt").exists()
    assert [p.name for p in root.iterdir()] == [
        "evil.tar.xz"
    ]  # nothing extracted, archive kept for inspection


def test_safe_extract_unwraps_a_top_level_folder(tmp_path: Path) -> None:
    archive = tmp_path / "wrapped.tar.xz"
    _tar_xz(archive, {"mvtec_anomaly_detection/bottle/train/good/000.png": _png_bytes()})
    destination = tmp_path / "out"
    destination.mkdir()
    safe_extract(archive, destination, only="bottle")
    assert (destination / "bottle" / "train" / "good" / "000.png").is_file()


def test_lightning_advances_the_augmentation_epoch(synthetic_root: Path) -> None:
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.masks: dict[int, list[torch.Tensor]] = {}

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            self.masks.setdefault(self.current_epoch, []).append(batch["mask"].sum((1, 2, 3)))
            return self.weight * batch["image"].mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    datamodule = SyntheticDataModule(
        root=synthetic_root,
        synthetic_size=64,
        **{k: v for k, v in SMALL.items() if k != "image_size"},
        image_size=32,
        crop_size=None,
        batch_size=4,
        augment=CutPaste(probability=1.0),
    )
    model = Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=datamodule)
    assert trainer.train_dataloader.dataset.epoch == 1
    first, second = torch.cat(model.masks[0]), torch.cat(model.masks[1])
    assert first.shape == second.shape == (8,) and (first > 0).all() and not torch.equal(first, second)


def test_download_of_an_unknown_category_fails_before_downloading(tmp_path: Path) -> None:
    datamodule = MVTecDataModule(tmp_path, "botle", download=True)
    with pytest.raises(PatchAEError, match="category=botle is not an MVTec AD category"):
        datamodule.prepare_data()
