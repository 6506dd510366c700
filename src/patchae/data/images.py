"""Reading images and masks from disk into well-defined PIL modes.

Every reader fully decodes the file (``Image.load``) so that truncated or corrupt files fail here, with a
message naming the file, instead of deep inside a DataLoader worker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from patchae.errors import PatchAEError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Modes whose alpha (last) channel is dropped; the colour channels are kept as they are (no compositing).
_ALPHA_MODES = {"RGBA": "RGB", "RGBa": "RGB", "LA": "L", "La": "L", "PA": "P"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def is_image_file(path: str | Path) -> bool:
    """True for a visible file whose extension (case-insensitive) is in :data:`IMAGE_EXTENSIONS`."""
    path = Path(path)
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def load_rgb(path: str | Path) -> Image.Image:
    """Read an image as 8-bit RGB, whatever its stored mode.

    Greyscale is replicated to three channels, alpha is dropped, 16-bit data is scaled (not clipped) to
    8 bits, float data in [0, 1] is scaled by 255 (other float ranges are min-max normalised). Pixels are
    kept in stored order (EXIF orientation is not applied), so masks drawn on the raw pixels stay aligned.
    """
    image = _open_decoded(path)
    image = _drop_alpha(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        image = Image.fromarray(_sixteen_to_eight_bit(np.asarray(image)))
    elif image.mode == "F":
        image = Image.fromarray(_float_to_eight_bit(np.asarray(image, dtype=np.float64)))
    return image if image.mode == "RGB" else image.convert("RGB")


def load_mask(path: str | Path, nonzero: bool = False) -> Image.Image:
    """Read a ground-truth mask as a binary mode ``L`` image: pixels above half the mask's largest value become
    255, so 0/255 and 0/1 masks read exactly and a JPEG mask's compression noise around a defect stays
    background. With ``nonzero`` every non-zero pixel is defect: for masks whose values are defect ids
    (VisA, MVTec LOCO AD), where id 1 beside id 3 is as much a defect."""
    image = _drop_alpha(_open_decoded(path))
    if image.mode not in ("1", "L", "RGB", "F") and image.mode not in _SIXTEEN_BIT_MODES:
        image = image.convert("RGB")  # palette, CMYK, YCbCr, ...: compare real colours, not indices
    values = np.asarray(image)
    if nonzero or not values.size or values.max() <= 0:
        foreground = values > 0
    else:
        foreground = values > values.max() / 2
    if foreground.ndim == 3:
        foreground = foreground.any(axis=2)
    return Image.fromarray(np.where(foreground, 255, 0).astype(np.uint8), mode="L")


def _open_decoded(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise PatchAEError(f"cannot read image {path}: {reason}; replace or remove the file") from error


def _drop_alpha(image: Image.Image) -> Image.Image:
    without_alpha = _ALPHA_MODES.get(image.mode)
    if without_alpha is None:
        return image
    if without_alpha == "P":
        image, without_alpha = image.convert("RGBA"), "RGB"
    return Image.merge(without_alpha, image.split()[:-1])


def _sixteen_to_eight_bit(values: np.ndarray) -> np.ndarray:
    # Mode "I" is 32-bit signed; PIL uses it for 16-bit PNG/TIFF data, so the 16-bit range is assumed.
    values = np.clip(values.astype(np.int64), 0, 65535)
    return ((values + 128) // 257).astype(np.uint8)  # 65535 -> 255 exactly, rounded


def _float_to_eight_bit(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif low >= 0.0 and high <= 255.0:
        scaled = values
    else:
        scaled = (values - low) / max(high - low, 1e-12) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
