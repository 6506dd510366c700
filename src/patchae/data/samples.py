"""Listing (image, label, mask) samples from the MVTec AD layout or from plain folders of images."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from patchae.data.images import IMAGE_EXTENSIONS, is_image_file, load_mask
from patchae.errors import PatchAEError, finite_number

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
SPLITS: tuple[str, ...] = ("train", "test")
GOOD = "good"


@dataclass(frozen=True)
class Sample:
    """One image. ``label`` is 0 for good and 1 for defective; ``mask_path`` is None when the image has no
    pixel-level ground truth (always the case for good images, whose mask is all zeros)."""

    path: Path
    label: int
    mask_path: Path | None
    defect_type: str
    # Further masks of the same image, united with mask_path (MVTec LOCO AD: one file per defect).
    extra_mask_paths: tuple[Path, ...] = ()
    # True: every non-zero mask pixel is defect (masks of defect ids); False: load_mask's half-maximum rule.
    mask_nonzero: bool = False

    @property
    def has_pixel_labels(self) -> bool:
        """Whether the pixel-level ground truth of this image is known."""
        return self.label == 0 or self.mask_path is not None

    @property
    def mask_paths(self) -> tuple[Path, ...]:
        """Every mask file of this image (none for good images and image-level data)."""
        return () if self.mask_path is None else (self.mask_path, *self.extra_mask_paths)


def load_sample_mask(sample: Sample) -> Image.Image:
    """The binary (mode ``L``, 0/255) union of a defect sample's masks; all must have the same size."""
    masks = [load_mask(path, nonzero=sample.mask_nonzero) for path in sample.mask_paths]
    if not masks:
        raise ValueError(f"{sample.path} has no mask")  # callers check mask_path first
    union = np.asarray(masks[0])
    for path, mask in zip(sample.mask_paths[1:], masks[1:], strict=True):
        if mask.size != masks[0].size:
            raise PatchAEError(
                f"mask {path} is {mask.size[0]}x{mask.size[1]} pixels but {sample.mask_path} of the same image "
                f"is {masks[0].size[0]}x{masks[0].size[1]}; fix or remove the mask"
            )
        union = np.maximum(union, np.asarray(mask))
    return Image.fromarray(union) if len(masks) > 1 else masks[0]


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise PatchAEError(f"unknown split {split!r}; use one of {SPLITS}")
    return split


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


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


def folder_samples(
    normal_dir: str | Path,
    abnormal_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
    normal_test_dir: str | Path | None = None,
    split: str = "train",
    test_split_ratio: float = 0.2,
    seed: int = 0,
) -> list[Sample]:
    """Samples from the user's own folders of images.

    Train: the images in ``normal_dir``, minus a held-out ``test_split_ratio`` fraction when ``abnormal_dir``
    is given but ``normal_test_dir`` is not (the held-out normals then join the test set, chosen by ``seed``).
    Test: held-out or ``normal_test_dir`` normals, then the ``abnormal_dir`` images. An abnormal image's mask is
    ``mask_dir/<stem>.png`` or ``mask_dir/<stem>_mask.png`` (any image extension); without one the image has
    no pixel labels. With neither ``abnormal_dir`` nor ``normal_test_dir`` the test split is empty.
    """
    check_split(split)
    if not 0.0 <= finite_number("data.test_split_ratio", test_split_ratio) < 1.0:
        raise PatchAEError(f"data.test_split_ratio must be in [0, 1), got {test_split_ratio}")
    normals = _folder_images(normal_dir, "normal_dir")
    abnormals = _folder_images(abnormal_dir, "abnormal_dir") if abnormal_dir is not None else []
    normal_tests = _folder_images(normal_test_dir, "normal_test_dir") if normal_test_dir is not None else []
    if mask_dir is not None and abnormal_dir is None:
        raise PatchAEError(f"mask_dir ({mask_dir}) is set but abnormal_dir is not; set abnormal_dir too")

    train, held_out = normals, []
    if normal_test_dir is None and abnormal_dir is not None and test_split_ratio > 0:
        n_held_out = min(max(1, round(len(normals) * test_split_ratio)), len(normals) - 1)
        if n_held_out > 0:
            chosen = set(random.Random(seed).sample(range(len(normals)), n_held_out))
            held_out = [p for i, p in enumerate(normals) if i in chosen]
            train = [p for i, p in enumerate(normals) if i not in chosen]

    if split == "train":
        return [Sample(path, 0, None, GOOD) for path in train]
    masks = _mask_index(Path(mask_dir).expanduser(), "mask_dir") if mask_dir is not None else {}
    samples = [Sample(path, 0, None, GOOD) for path in (held_out + normal_tests)]
    samples += [Sample(path, 1, _match_mask(path, masks), "abnormal") for path in abnormals]
    if masks and abnormals and all(s.mask_path is None for s in samples if s.label == 1):
        logger.warning(
            "no mask in %s matches an image in %s (expected <stem>.png or <stem>_mask.png); "
            "pixel metrics will be skipped",
            mask_dir,
            abnormal_dir,
        )
    return samples


def _folder_images(folder: str | Path, name: str) -> list[Path]:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PatchAEError(
            f"{name} {folder} not found or not a folder; set data.{name} to a folder of images"
        )
    images = list_images(folder)
    if not images:
        subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        hint = (
            f" (it has subfolders {', '.join(subfolders)}: point data.{name} at one of them)"
            if subfolders
            else ""
        )
        raise PatchAEError(f"{name} {folder} contains no images ({', '.join(IMAGE_EXTENSIONS)}){hint}")
    return images


def _mask_index(folder: Path, name: str) -> dict[str, Path]:
    """Mask files by the stem of the image they belong to (``x.png`` and ``x_mask.png`` both map to ``x``)."""
    if not folder.is_dir():
        raise PatchAEError(f"{name} {folder} not found or not a folder; set data.{name} to a folder of masks")
    index: dict[str, Path] = {}
    for path in list_images(folder):
        stem = path.stem
        if stem.endswith("_mask"):
            index.setdefault(stem[: -len("_mask")], path)
        else:
            index[stem] = path  # an exact-stem mask wins over a <stem>_mask one
    return index


def _match_mask(image_path: Path, masks: dict[str, Path]) -> Path | None:
    return masks.get(image_path.stem)
