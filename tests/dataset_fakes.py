"""Tiny fake copies of the public data sets, each in its exact official layout (file names, split files, mask
conventions), for tests/test_datasets.py and the config tests."""

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (SIZE, SIZE)) -> Path:
    """A ``size`` = (width, height) noise image; the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_mask(
    path: Path, boxes: list[tuple[int, int, int, int, int]], size: tuple[int, int] = (SIZE, SIZE)
) -> Path:
    """A single-channel mask with each ``(top, left, bottom, right, value)`` box set to ``value``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.zeros((size[1], size[0]), dtype=np.uint8)
    for top, left, bottom, right, value in boxes:
        values[top:bottom, left:right] = value
    Image.fromarray(values).save(path)
    return path


def write_visa(root: Path) -> Path:
    """candle and capsules: 3 train and 1 test normal each, one anomaly whose mask holds defect ids 1 and 2."""
    rows = []
    for category in ("candle", "capsules"):
        for index in range(4):
            image = f"{category}/Data/Images/Normal/{index:04d}.JPG"
            write_image(root / image, index)
            rows.append([category, "train" if index < 3 else "test", "normal", image, ""])
        image, mask = f"{category}/Data/Images/Anomaly/000.JPG", f"{category}/Data/Masks/Anomaly/000.png"
        write_image(root / image, 9)
        write_mask(root / mask, [(0, 0, 4, 4, 1), (10, 10, 14, 16, 2)])
        rows.append([category, "test", "anomaly", image, mask])
    (root / "split_csv").mkdir(parents=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["object", "split", "label", "image", "mask"], *rows])
    return root


def write_mvtec_loco(root: Path) -> Path:
    """juice_bottle: 4 train, 1 validation, 1 good test image, one logical anomaly with two defect files
    (pixel values 255 and 253: the image's mask is their union), one structural anomaly."""
    category = root / "juice_bottle"
    for index in range(4):
        write_image(category / "train" / "good" / f"{index:03d}.png", index)
    write_image(category / "validation" / "good" / "000.png", 5)
    write_image(category / "test" / "good" / "000.png", 6)
    write_image(category / "test" / "logical_anomalies" / "000.png", 7)
    write_image(category / "test" / "structural_anomalies" / "000.png", 8)
    logical = category / "ground_truth" / "logical_anomalies" / "000"
    write_mask(logical / "000.png", [(0, 0, 4, 8, 255)])
    write_mask(logical / "001.png", [(20, 20, 24, 24, 253)])
    write_mask(category / "ground_truth" / "structural_anomalies" / "000" / "000.png", [(8, 8, 10, 10, 255)])
    return root


def write_mvtec_3d(root: Path) -> Path:
    """bagel: rgb/*.png, xyz/*.tiff and (outside train) gt/*.png for train/good (3), validation/good (1),
    test/good (2) and test/crack (2)."""
    category = root / "bagel"
    parts = (("train", "good", 3), ("validation", "good", 1), ("test", "good", 2), ("test", "crack", 2))
    for split, kind, count in parts:
        folder = category / split / kind
        for index in range(count):
            write_image(folder / "rgb" / f"{index:03d}.png", index)
            (folder / "xyz").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((SIZE, SIZE), np.float32)).save(folder / "xyz" / f"{index:03d}.tiff")
            if split != "train":
                write_mask(folder / "gt" / f"{index:03d}.png", [(2, 2, 6, 6, 255)] if kind == "crack" else [])
    return root


def write_btad(root: Path) -> Path:
    """Products 01 (.bmp images, .png masks) and 03 (.bmp images, .bmp masks): 3 train/ok, 1 test/ok, 2 test/ko."""
    for product, mask_extension in (("01", "png"), ("03", "bmp")):
        for index in range(3):
            write_image(root / product / "train" / "ok" / f"{index:04d}.bmp", index)
        write_image(root / product / "test" / "ok" / "0000.bmp", 4)
        for index in range(2):
            write_image(root / product / "test" / "ko" / f"{index:04d}.bmp", 5 + index)
            mask = root / product / "ground_truth" / "ko" / f"{index:04d}.{mask_extension}"
            write_mask(mask, [(0, 0, 2, 2, 255)])
    return root


def write_mpdd(root: Path) -> Path:
    """metal_plate in the MVTec AD layout: 3 train, 1 good test image, one scratch with its _mask.png."""
    category = root / "metal_plate"
    for index in range(3):
        write_image(category / "train" / "good" / f"{index:03d}.png", index)
    write_image(category / "test" / "good" / "000.png", 4)
    write_image(category / "test" / "scratches" / "000.png", 5)
    write_mask(category / "ground_truth" / "scratches" / "000_mask.png", [(0, 0, 3, 5, 255)])
    return root


def write_ksdd2(root: Path) -> Path:
    """train/10000-10003 (10001 defective) and test/20000-20003 (20000 and 20002 defective), each NNNNN.png with
    NNNNN_GT.png; the images are tall and narrow like the real ones."""
    size = (SIZE // 2, SIZE)
    for split, start, defective in (("train", 10000, {10001}), ("test", 20000, {20000, 20002})):
        for number in range(start, start + 4):
            write_image(root / split / f"{number}.png", number, size)
            write_mask(
                root / split / f"{number}_GT.png", [(4, 4, 8, 8, 255)] if number in defective else [], size
            )
    return root


# data.dataset key -> (the category the fake copy holds, its writer)
FAKE_COPIES: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "visa": ("candle", write_visa),
    "mvtec_loco": ("juice_bottle", write_mvtec_loco),
    "mvtec_3d": ("bagel", write_mvtec_3d),
    "btad": ("01", write_btad),
    "mpdd": ("metal_plate", write_mpdd),
    "ksdd2": ("ksdd2", write_ksdd2),
}
