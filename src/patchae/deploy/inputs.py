"""What predict.py screens: the images an ``input=`` names (a file, a folder, a glob, or paths on stdin), the
label an MVTec-style folder implies, and in-memory images read with the same rules as files."""

from __future__ import annotations

import glob
import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from patchae.data import IMAGE_EXTENSIONS, load_rgb
from patchae.data.images import is_image_file
from patchae.errors import PatchAEError

log = logging.getLogger(__name__)

GOOD = "good"
_GLOB_CHARS = set("*?[")


def find_images(spec: str | Path) -> list[Path]:
    """The images an ``input=`` names: one file, a folder (recursively), or a glob pattern.

    An MVTec-style category folder (one with a ``test/`` subfolder) means its ``test/`` images.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        if (path / "test").is_dir() and not any(is_image_file(p) for p in path.iterdir()):
            log.info("%s looks like an MVTec AD category: predicting on its test/ images", path)
            path = path / "test"
            if not (path / GOOD).is_dir():
                log.warning(
                    "%s has no good/ folder: every labelled image is anomalous, so accuracy only measures recall",
                    path,
                )
        images = sorted(p for p in path.rglob("*") if is_image_file(p) and not _hidden(p, path))
        if not images:
            raise PatchAEError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}; point input= at a folder with images"
            )
        return images
    if _GLOB_CHARS & set(text):
        images = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if is_image_file(p))
        if not images:
            raise PatchAEError(
                f"input pattern {text} matches no images ({', '.join(IMAGE_EXTENSIONS)}); check the pattern"
            )
        return images
    raise PatchAEError(
        f"input {path} not found; pass an image, a folder, a quoted glob ('dir/*.png') or - for paths on stdin"
    )


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def stdin_paths() -> Iterator[Path]:
    """Paths read from stdin one per line, as they arrive (blank lines skipped)."""
    for line in sys.stdin:
        if line.strip():
            yield Path(line.strip()).expanduser()


def folder_label(path: Path) -> int | None:
    """Label implied by the MVTec layout: ``.../good/x`` is normal (0); ``.../test/<defect>/x`` and a
    folder next to a ``good/`` one are anomalous (1); anything else is unlabelled (None)."""
    parent = path.resolve().parent  # so that a relative 'x.png' inside test/broken/ is labelled as well
    if parent.name == GOOD:
        return 0
    if parent.parent.name == "test" or (parent.parent / GOOD).is_dir():
        return 1
    return None


def as_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """An in-memory image as 8-bit RGB with exactly the rules :func:`patchae.data.load_rgb` applies to files."""
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
            return Image.fromarray(image)
        try:
            image = Image.fromarray(image)
        except (TypeError, ValueError):
            raise PatchAEError(
                f"cannot read an array of shape {image.shape} and dtype {image.dtype} as an image; pass uint8 "
                "(H, W), (H, W, 3) or (H, W, 4), uint16 or float32 (H, W), or a PIL image"
            ) from None
    if image.mode == "RGB":
        return image
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF")  # TIFF keeps every mode (16-bit, float, alpha) for load_rgb to convert
    buffer.seek(0)
    return load_rgb(buffer)
