"""``data.resize_mode=auto``: the model input's shape chosen from the training images, so that a part keeps
its shape.

Square images keep the paper's protocol (resize to ``image_size``, centre crop to ``crop_size``). Others keep
their aspect ratio: the short side gets the square protocol's model-input side (``crop_size``, else
``image_size``), as fine a sampling of the part as a square image gets, and the long side follows the aspect
ratio up to ``2 x image_size``, past which both shrink together (a 2.5:1 part then costs about twice a square
input, not 2.5x, and a 6:1 part stays bounded: tile it instead, ``data.tiling``). Both sides are rounded to
``size_multiple`` (the deepest stride the models use) and the rest is padded, never cropped.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from patchae.data.transforms import image_shape
from patchae.errors import PatchAEError

log = logging.getLogger(__name__)

# Aspect ratios (long / short side) up to this count as square: today's protocol, as on MVTec AD.
SQUARE_TOLERANCE = 1.05
# How many training images' headers are read to choose the shape (evenly spread over the listing).
SIZE_SAMPLE = 512


@dataclass(frozen=True)
class Geometry:
    """What ``auto`` chose: the ImageTransform arguments, and a sentence that says why (logged)."""

    image_size: int | tuple[int, int]
    crop_size: int | tuple[int, int] | None
    resize_mode: str
    reason: str


def image_sizes(paths: Sequence[str | Path], limit: int = SIZE_SAMPLE) -> list[tuple[int, int]]:
    """``(height, width)`` of up to ``limit`` of the images, evenly spread; reads only their headers."""
    step = max(1, len(paths) // limit)
    sizes = []
    for path in list(paths)[::step][:limit]:
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, UnidentifiedImageError) as error:
            raise PatchAEError(f"cannot read the size of training image {path}: {error}") from None
        sizes.append((height, width))
    return sizes


def choose_geometry(
    sizes: Sequence[tuple[int, int]],
    image_size: int | Sequence[int],
    crop_size: int | Sequence[int] | None,
    size_multiple: int = 16,
) -> Geometry:
    """The input shape for training images of ``sizes`` (see the module's docstring)."""
    if not sizes:
        raise PatchAEError("data.resize_mode=auto needs training images to choose the input shape")
    if isinstance(size_multiple, bool) or not isinstance(size_multiple, int) or size_multiple < 1:
        raise PatchAEError(f"data.size_multiple must be a positive integer, got {size_multiple!r}")
    height, width = image_shape(image_size, "data.image_size")
    aspects = [w / h for h, w in sizes]  # width / height of each image
    aspect = statistics.median(aspects)
    mixed = max(aspects) / min(aspects) > SQUARE_TOLERANCE
    spread = (
        f"; the training images have {len(set(sizes))} sizes (width/height {min(aspects):.2f} to "
        f"{max(aspects):.2f}): sized for the median, the others fit inside and are padded"
        if mixed
        else ""
    )
    if height != width:  # the user gave the shape: keep it, and each part's proportions inside it
        return Geometry(
            (height, width),
            None,
            "keep_aspect",
            f"data.image_size={[height, width]} kept, parts padded{spread}",
        )
    if not mixed and max(aspect, 1 / aspect) <= SQUARE_TOLERANCE:
        return Geometry(
            image_size,
            crop_size,
            "squash",
            f"square images: {height} px, crop {crop_size} (the paper's protocol)",
        )
    crop = image_shape(crop_size, "data.crop_size")[0] if crop_size is not None else height
    ratio = max(aspect, 1 / aspect)
    long_side = min(crop * ratio, 2.0 * height)
    short_side = long_side / ratio

    def rounded(side: float) -> int:
        return max(size_multiple, size_multiple * round(side / size_multiple))

    long_px, short_px = rounded(long_side), rounded(short_side)
    shape = (long_px, short_px) if aspect < 1 else (short_px, long_px)
    if max(aspect, 1 / aspect) <= SQUARE_TOLERANCE:  # mixed sizes around square: a square input, padded
        shape = (rounded(crop), rounded(crop))
    reason = (
        f"images {sizes[0][0]}x{sizes[0][1]} (height x width, width/height {aspect:.2f}): input {shape[0]}x{shape[1]}, "
        f"aspect kept, no crop{spread}"
    )
    if ratio > 2.0 * height / crop * 1.25:
        reason += "; this elongated part is sampled coarsely across its short side: consider data.tiling"
    return Geometry(shape, None, "keep_aspect", reason)
