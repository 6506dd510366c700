"""The public data sets (VisA, MVTec LOCO AD, MVTec 3D-AD, BTAD, MPDD, KolektorSDD2), each on a tiny fake copy
written in its exact official layout; their download sources; and image-level folder data."""

import hashlib
import io
import logging
import math
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO
from dataset_fakes import (
    FAKE_COPIES,
    SIZE,
    write_btad,
    write_image,
    write_ksdd2,
    write_mpdd,
    write_mvtec_3d,
    write_mvtec_loco,
    write_visa,
)
from patchae.data import DATASETS, FolderDataModule, PublicDataModule, download_dataset
from patchae.data.datasets import btad, ksdd2, mpdd, mvtec_3d, mvtec_loco, visa
from patchae.data.download import DatasetSource
from patchae.errors import PatchAEError
from patchae.train import fit_and_test


def _module(key: str, root: Path, category: str | int, **kwargs) -> PublicDataModule:
    return PublicDataModule(
        key, root, category, image_size=SIZE, crop_size=None, eval_batch_size=64, **kwargs
    )


def _test_batch(datamodule: PublicDataModule) -> dict:
    datamodule.setup()
    return next(iter(datamodule.test_dataloader()))


@pytest.fixture
def visa_root(tmp_path: Path) -> Path:
    return write_visa(tmp_path / "VisA")


@pytest.fixture
def loco_root(tmp_path: Path) -> Path:
    return write_mvtec_loco(tmp_path / "mvtec_loco")


@pytest.fixture
def mvtec_3d_root(tmp_path: Path) -> Path:
    return write_mvtec_3d(tmp_path / "mvtec_3d")


@pytest.fixture
def btad_root(tmp_path: Path) -> Path:
    return write_btad(tmp_path / "BTech_Dataset_transformed")


@pytest.fixture
def mpdd_root(tmp_path: Path) -> Path:
    return write_mpdd(tmp_path / "mpdd")


@pytest.fixture
def ksdd2_root(tmp_path: Path) -> Path:
    return write_ksdd2(tmp_path / "ksdd2")


# ---- sample lists --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(FAKE_COPIES))
def test_every_data_set_serves_normal_training_images_and_labelled_test_images(
    key: str, tmp_path: Path
) -> None:
    category, write = FAKE_COPIES[key]
    datamodule = _module(key, write(tmp_path / key), category)
    datamodule.setup()
    train_batch = next(iter(datamodule.bank_dataloader()))
    assert train_batch["label"].sum() == 0 and train_batch["image"].shape[1:] == (3, SIZE, SIZE)
    batch = _test_batch(datamodule)
    labels, defect_pixels = batch["label"], batch["mask"].sum((1, 2, 3))
    assert 0 < labels.sum() < len(labels) and batch["has_mask"].all()
    assert bool((defect_pixels[labels == 1] > 0).all()) and bool((defect_pixels[labels == 0] == 0).all())


def test_visa_reads_its_split_file_and_treats_every_defect_id_as_defect(visa_root: Path) -> None:
    train = visa.SPEC.samples(visa_root, "candle", "train")
    assert [s.path.name for s in train] == ["0000.JPG", "0001.JPG", "0002.JPG"]
    assert all(s.label == 0 and "capsules" not in s.path.parts for s in train)
    test = visa.SPEC.samples(visa_root, "candle", "test")
    assert [(s.path.name, s.label, s.defect_type) for s in test] == [
        ("0003.JPG", 0, "good"),
        ("000.JPG", 1, "anomaly"),
    ]
    assert test[1].mask_path == visa_root / "candle/Data/Masks/Anomaly/000.png"
    batch = _test_batch(_module("visa", visa_root, "candle"))
    assert batch["mask"][1].sum() == 16 + 24 and batch["has_mask"].all()  # ids 1 and 2, not only the larger


def test_visa_errors_name_the_split_file(visa_root: Path) -> None:
    split_file = visa_root / "split_csv" / "1cls.csv"
    with pytest.raises(PatchAEError, match="unknown VisA category 'bottle'; use one of candle, capsules"):
        visa.SPEC.samples(visa_root, "bottle", "train")
    (visa_root / "candle/Data/Images/Normal/0001.JPG").unlink()
    with pytest.raises(PatchAEError, match=r"0001\.JPG, listed in .*1cls\.csv, is missing; re-extract"):
        visa.SPEC.samples(visa_root, "candle", "train")
    split_file.write_text("object,split,image\n")
    with pytest.raises(
        PatchAEError, match="lacks the column\\(s\\) label, mask; expected object,split,label"
    ):
        visa.SPEC.samples(visa_root, "candle", "train")
    split_file.unlink()
    with pytest.raises(PatchAEError, match="VisA split file .*1cls.csv not found; data.root must be"):
        visa.SPEC.samples(visa_root, "candle", "train")


def test_mvtec_loco_unites_the_masks_of_one_image(loco_root: Path) -> None:
    train = mvtec_loco.SPEC.samples(loco_root, "juice_bottle", "train")
    assert len(train) == 4 and all("validation" not in s.path.parts for s in train)
    test = mvtec_loco.SPEC.samples(loco_root, "juice_bottle", "test")
    assert [(s.defect_type, s.label, len(s.mask_paths)) for s in test] == [
        ("good", 0, 0),
        ("logical_anomalies", 1, 2),
        ("structural_anomalies", 1, 1),
    ]
    batch = _test_batch(_module("mvtec_loco", loco_root, "juice_bottle"))
    assert batch["mask"].sum((1, 2, 3)).tolist() == [0, 32 + 16, 4]
    (loco_root / "juice_bottle/ground_truth/structural_anomalies/000/000.png").unlink()
    with pytest.raises(
        PatchAEError, match=r"MVTec LOCO AD defect image .*000\.png has no mask \(expected .*000/000.png"
    ):
        mvtec_loco.SPEC.samples(loco_root, "juice_bottle", "test")


def test_mvtec_3d_reads_rgb_only(mvtec_3d_root: Path) -> None:
    train = mvtec_3d.SPEC.samples(mvtec_3d_root, "bagel", "train")
    assert [s.path.relative_to(mvtec_3d_root).as_posix() for s in train] == [
        f"bagel/train/good/rgb/00{i}.png" for i in range(3)
    ]
    test = mvtec_3d.SPEC.samples(mvtec_3d_root, "bagel", "test")
    assert [(s.defect_type, s.label) for s in test] == [("good", 0)] * 2 + [("crack", 1)] * 2
    assert test[2].mask_path == mvtec_3d_root / "bagel/test/crack/gt/000.png"
    assert all(s.path.suffix == ".png" and "rgb" in s.path.parts for s in test)
    with pytest.raises(
        PatchAEError, match="MVTec 3D-AD category 'peach' not found in .*folders found: bagel"
    ):
        mvtec_3d.SPEC.samples(mvtec_3d_root, "peach", "train")


def test_btad_matches_masks_whatever_their_extension(btad_root: Path) -> None:
    for product, extension in (("01", ".png"), ("03", ".bmp")):
        test = btad.SPEC.samples(btad_root, product, "test")
        assert [(s.label, s.defect_type) for s in test] == [(0, "good"), (1, "ko"), (1, "ko")]
        assert [s.mask_path.suffix for s in test if s.label] == [extension, extension]
        assert len(btad.SPEC.samples(btad_root, product, "train")) == 3
    module = _module("btad", btad_root, 3)  # category=3 on the command line is product 03
    assert module.category == "03" and _test_batch(module)["mask"].sum((1, 2, 3)).tolist() == [0, 4, 4]
    with pytest.raises(PatchAEError, match="unknown BTAD category '04'; use one of 01, 02, 03"):
        _module("btad", btad_root, "04").setup()


def test_mpdd_uses_the_mvtec_layout(mpdd_root: Path) -> None:
    test = mpdd.SPEC.samples(mpdd_root, "metal_plate", "test")
    assert [(s.label, s.defect_type, s.mask_path and s.mask_path.name) for s in test] == [
        (0, "good", None),
        (1, "scratches", "000_mask.png"),
    ]
    with pytest.raises(PatchAEError, match="MPDD category 'tubes' not found in .*folders found: metal_plate"):
        mpdd.SPEC.samples(mpdd_root, "tubes", "test")


def test_ksdd2_labels_come_from_the_masks(ksdd2_root: Path) -> None:
    train = ksdd2.SPEC.samples(ksdd2_root, "ksdd2", "train")
    assert [s.path.name for s in train] == ["10000.png", "10002.png", "10003.png"]  # 10001 is defective
    test = ksdd2.SPEC.samples(ksdd2_root, "ksdd2", "test")
    assert [(s.path.name, s.label) for s in test] == [
        ("20000.png", 1),
        ("20001.png", 0),
        ("20002.png", 1),
        ("20003.png", 0),
    ]
    assert test[0].mask_path == ksdd2_root / "test" / "20000_GT.png" and test[1].mask_path is None
    (ksdd2_root / "test" / "20003_GT.png").unlink()
    with pytest.raises(PatchAEError, match=r"KolektorSDD2 image .*20003\.png has no mask .*20003_GT\.png"):
        ksdd2.SPEC.samples(ksdd2_root, "ksdd2", "test")


def test_missing_root_and_empty_folder_errors(tmp_path: Path, loco_root: Path) -> None:
    with pytest.raises(
        PatchAEError, match=r"VisA root .*absent not found; set data.root=.* or data.download=true"
    ):
        _module("visa", tmp_path / "absent", "candle").setup()
    for image in (loco_root / "juice_bottle" / "test" / "good").iterdir():
        image.unlink()
    with pytest.raises(PatchAEError, match=r"no images in .*test/good; the MVTec LOCO AD layout needs it"):
        mvtec_loco.SPEC.samples(loco_root, "juice_bottle", "test")
    with pytest.raises(PatchAEError, match="unknown data set 'imagenet'; use one of visa, mvtec_loco"):
        PublicDataModule("imagenet", tmp_path, "x")


# ---- configs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(DATASETS))
def test_each_config_names_the_known_source(key: str) -> None:
    config = OmegaConf.load(REPO / "conf" / "data" / f"{key}.yaml")
    source = DATASETS[key].source
    assert config.dataset == key and config.url == source.url and config.sha256 == source.sha256
    header = (REPO / "conf" / "data" / f"{key}.yaml").read_text()
    assert f"License: {source.license}" in header
    assert all(category in header for category in DATASETS[key].categories)


def test_hydra_builds_the_data_module(tmp_path: Path, btad_root: Path) -> None:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["data=btad", "category=01", f"data.root={btad_root}"])
    datamodule = instantiate(cfg.data, _convert_="all")
    assert isinstance(datamodule, PublicDataModule) and datamodule.category == "01"
    assert datamodule.num_train + len(datamodule.holdout_samples) == 3 and datamodule.num_test == 3


# ---- downloads -----------------------------------------------------------------------------------------


def _zip(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> str:
    with zipfile.ZipFile(path, "w") as zipped:
        for name, data in members.items():
            zipped.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zipped.writestr(info, target)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _png() -> bytes:
    data = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(data, format="PNG")
    return data.getvalue()


def test_a_zip_download_extracts_one_category(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    archive = tmp_path / "btad.zip"
    digest = _zip(
        archive,
        {
            "BTech_Dataset_transformed/01/train/ok/0000.bmp": _png(),
            "BTech_Dataset_transformed/02/train/ok/0000.png": _png(),
        },
    )
    root = tmp_path / "btad"
    module = PublicDataModule("btad", root, "01", download=True, url=archive.as_uri(), sha256=digest)
    with caplog.at_level(logging.INFO, logger="patchae.data.download"):
        module.prepare_data()
    assert "BTAD is licensed under CC BY-SA 4.0" in caplog.text
    assert sorted(p.name for p in root.iterdir()) == ["01", "btad.zip"]  # 02 stays in the kept archive
    assert (root / "01" / "train" / "ok" / "0000.bmp").read_bytes() == _png()


@pytest.mark.parametrize(
    ("members", "links", "reason"),
    [
        ({"01/ok.png": b"ok", "../evil.txt": b"evil"}, None, "contains '..'"),
        ({"/tmp/evil_absolute.txt": b"evil"}, None, "absolute path"),
        ({"01/ok.png": b"ok"}, {"01/passwd": "/etc/passwd"}, "is a symbolic link"),
    ],
)
def test_zip_extraction_refuses_escapes(
    tmp_path: Path, members: dict, links: dict | None, reason: str
) -> None:
    archive = tmp_path / "evil.zip"
    digest = _zip(archive, members, links)
    source = DatasetSource("Evil", archive.as_uri(), digest, "https://example.org", "none")
    root = tmp_path / "inside"
    with pytest.raises(PatchAEError, match=f"refusing to extract .*{reason}"):
        download_dataset(source, root)
    assert [p.name for p in root.iterdir()] == ["evil.zip"] and not (tmp_path / "evil.txt").exists()


def test_downloads_never_go_unchecked_and_fail_clearly_offline(tmp_path: Path) -> None:
    with pytest.raises(
        PatchAEError, match="no verified SHA-256 is known for the MVTec 3D-AD archive, .*data.sha256="
    ):
        PublicDataModule("mvtec_3d", tmp_path / "m3d", "bagel", download=True).prepare_data()
    with pytest.raises(
        PatchAEError, match="MPDD has no direct download link; download it by hand from https://github"
    ):
        PublicDataModule("mpdd", tmp_path / "mpdd", "tubes", download=True).prepare_data()
    with pytest.raises(
        PatchAEError, match="data.sha256='d8bb2800' is not a SHA-256: it must be 64 hex digits"
    ):
        PublicDataModule(
            "mvtec_3d", tmp_path / "m3d", "bagel", download=True, sha256="d8bb2800"
        ).prepare_data()
    with pytest.raises(PatchAEError, match="unknown VisA category 'bottle'"):  # before any download
        PublicDataModule("visa", tmp_path / "visa", "bottle", download=True).prepare_data()
    absent = (tmp_path / "VisA_20220922.tar").as_uri()
    with pytest.raises(
        PatchAEError, match=r"could not download VisA from file:.*VisA_20220922\.tar .*offline"
    ):
        PublicDataModule("visa", tmp_path / "visa", "candle", download=True, url=absent).prepare_data()
    archive = tmp_path / "wrong.zip"
    _zip(archive, {"01/a.png": b"a"})
    with pytest.raises(PatchAEError, match=f"checksum mismatch .*expected sha256 {visa.SOURCE.sha256}"):
        PublicDataModule(
            "visa", tmp_path / "visa", "candle", download=True, url=archive.as_uri()
        ).prepare_data()
    assert sorted(p.name for p in (tmp_path / "visa").iterdir()) == []  # nothing half-downloaded is left


# ---- end to end: image-level folder data, and a public layout ------------------------------------------


TINY_FIT = [
    "backbone=efficientnet_lite0",
    "model=patchcore",
    "data.image_size=64",
    "data.crop_size=null",
    "data.num_workers=0",
    "trainer.max_epochs=1",
    "bank.coreset_ratio=0.5",
    "logger=none",
    "callbacks.results.overlays_per_type=0",
    "+trainer.enable_model_summary=false",
]


def _fit(tmp_path: Path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY_FIT, *overrides, f"paths.output_dir={tmp_path / 'run'}"])
    return fit_and_test(cfg)


def test_folder_data_without_mask_dir_is_image_level(tmp_path: Path) -> None:
    for index in range(6):
        write_image(tmp_path / "good" / f"{index}.png", index, (64, 64))
    for index in range(3):
        write_image(tmp_path / "bad" / f"{index}.png", 50 + index, (64, 64))
    datamodule = FolderDataModule(tmp_path / "good", tmp_path / "bad", image_size=64, crop_size=None)
    datamodule.setup()
    batch = next(iter(datamodule.test_dataloader()))
    assert batch["label"].tolist() == [0, 1, 1, 1] and batch["has_mask"].tolist() == [
        True,
        False,
        False,
        False,
    ]
    results = _fit(
        tmp_path,
        "data=folder",
        f"data.normal_dir={tmp_path / 'good'}",
        f"data.abnormal_dir={tmp_path / 'bad'}",
    )
    assert 0.0 <= results["image_auroc"] <= 1.0
    assert math.isnan(results["pixel_auroc"]) and math.isnan(results["aupro"])


def test_a_public_layout_trains_and_tests_end_to_end(tmp_path: Path, loco_root: Path) -> None:
    for index in range(4, 8):
        write_image(loco_root / "juice_bottle" / "train" / "good" / f"{index:03d}.png", index)
    results = _fit(tmp_path, "data=mvtec_loco", "category=juice_bottle", f"data.root={loco_root}")
    assert 0.0 <= results["pixel_auroc"] <= 1.0 and 0.0 <= results["image_auroc"] <= 1.0
    assert torch.isfinite(torch.tensor(results["aupro"]))
