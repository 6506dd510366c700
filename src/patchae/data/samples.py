"""A sample (image path, label, mask path) and what every data set's layout shares; the layouts themselves are in
:mod:`patchae.data.datasets`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from patchae.data.images import is_image_file, load_mask
from patchae.errors import PatchAEError

logger = logging.getLogger(__name__)

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
