"""MVTec AD's layout: ``root/category/train/good``, ``root/category/test/<defect>``, ``root/category/ground_truth``."""

from __future__ import annotations

import logging
from pathlib import Path

from patchae.data.images import IMAGE_EXTENSIONS
from patchae.data.samples import GOOD, Sample, check_split, list_images
from patchae.errors import PatchAEError

logger = logging.getLogger(__name__)

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
GRAYSCALE_CATEGORIES: tuple[str, ...] = ("grid", "screw", "zipper")


def mvtec_samples(root: str | Path, category: str, split: str) -> list[Sample]:
    """Samples of one category in the official MVTec AD layout.

    ``root/category/train/good/*`` are the training images; ``root/category/test/<defect>/*`` the test images
    (``good`` = normal), with masks at ``root/category/ground_truth/<defect>/<stem>_mask.png``. Any category
    name works when its folder exists, so custom data in this layout is supported.
    """
    check_split(split)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise PatchAEError(f"MVTec AD root {root} not found; set data.root=<path> or data.download=true")
    category_dir = root / category
    if not category_dir.is_dir():
        raise PatchAEError(_missing_category_message(root, category))
    if split == "train":
        return _mvtec_train(category_dir)
    return _mvtec_test(category_dir)


def _missing_category_message(root: Path, category: str) -> str:
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found_text = ", ".join(found) if found else "none"
    if category in MVTEC_CATEGORIES:
        return (
            f"MVTec AD category {category!r} not found in {root} (folders found: {found_text}); "
            "set data.download=true or point data.root at a folder that contains it"
        )
    return (
        f"unknown category {category!r}: no folder {root / category}, and it is not one of the MVTec AD "
        f"categories ({', '.join(MVTEC_CATEGORIES)}); folders found in {root}: {found_text}"
    )


def _mvtec_train(category_dir: Path) -> list[Sample]:
    good_dir = category_dir / "train" / GOOD
    images = list_images(good_dir) if good_dir.is_dir() else []
    if not images:
        raise PatchAEError(
            f"no training images in {good_dir}; the MVTec AD layout needs <category>/train/good/ with images "
            f"({', '.join(IMAGE_EXTENSIONS)})"
        )
    return [Sample(path, 0, None, GOOD) for path in images]


def _mvtec_test(category_dir: Path) -> list[Sample]:
    test_dir = category_dir / "test"
    if not test_dir.is_dir():
        raise PatchAEError(f"no test folder {test_dir}; the MVTec AD layout needs <category>/test/<defect>/")
    samples: list[Sample] = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        defect = defect_dir.name
        for path in list_images(defect_dir):
            if defect == GOOD:
                samples.append(Sample(path, 0, None, GOOD))
            else:
                samples.append(Sample(path, 1, _mvtec_mask(category_dir, defect, path), defect))
    if not samples:
        raise PatchAEError(f"no test images in {test_dir}/<defect>/; add test images or check the path")
    if not (category_dir / "ground_truth").is_dir():
        logger.warning(
            "%s has no ground_truth/ folder: image-level data, so pixel AUROC and AUPRO are n/a", category_dir
        )
    n_good = sum(s.label == 0 for s in samples)
    if n_good in (0, len(samples)):
        kind = "no good" if n_good == 0 else "only good"
        logger.warning("%s has %s test images: image-level AUROC needs both classes", test_dir, kind)
    return samples


def _mvtec_mask(category_dir: Path, defect: str, image_path: Path) -> Path | None:
    """The mask of a defect image; None for image-level data (a category without ``ground_truth/``)."""
    if not (category_dir / "ground_truth").is_dir():
        return None
    mask_dir = category_dir / "ground_truth" / defect
    expected = mask_dir / f"{image_path.stem}_mask.png"
    if expected.is_file():
        return expected
    if mask_dir.is_dir():  # custom data: tolerate other image formats for the mask
        for extension in IMAGE_EXTENSIONS:
            for candidate in (
                mask_dir / f"{image_path.stem}_mask{extension}",
                mask_dir / f"{image_path.stem}{extension}",
            ):
                if candidate.is_file():
                    return candidate
    raise PatchAEError(
        f"defect image {image_path} has no mask: expected {expected}; add the mask or remove the image"
    )
