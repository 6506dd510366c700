"""The user's own folders: normal images to train on, optional abnormal images (and masks) to test on."""

from __future__ import annotations

import logging
import random
from pathlib import Path

from patchae.data.images import IMAGE_EXTENSIONS
from patchae.data.samples import GOOD, Sample, check_split, list_images
from patchae.errors import PatchAEError, finite_number

logger = logging.getLogger(__name__)


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
