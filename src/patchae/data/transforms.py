"""Deterministic geometry + normalisation shared by images and their masks."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from patchae.errors import PatchAEError
from patchae.settings import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

log = logging.getLogger(__name__)


RESIZE_MODES = ("squash", "keep_aspect")


def image_shape(value: Any, key: str) -> tuple[int, int]:
    """``int`` or ``[H, W]`` -> ``(H, W)`` (a one-line error names ``key`` otherwise)."""
    values = [value] * 2 if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(values, Sequence)
        or isinstance(values, str)
        or len(values) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values)
    ):
        raise PatchAEError(f"{key} must be a positive integer or [height, width], got {value!r}")
    return int(values[0]), int(values[1])


@dataclass(frozen=True)
class Placement:
    """Where an original image lies in the model input: its resized size and the offset of its top-left
    corner (negative where the centre crop cut it)."""

    top: int
    left: int
    height: int
    width: int


class ImageTransform:
    """Resize to ``image_size`` (bilinear, antialiased), then centre crop to ``crop_size``.

    ``image_size`` is an int (square) or ``[H, W]``. ``resize_mode``: ``squash`` stretches the image to
    ``H x W``; ``keep_aspect`` scales it to fit inside ``H x W`` and pads the rest with the mean colour (0 once
    normalised; masks with 0), centred. ``crop_size`` (int or ``[h, w]``) applies to square targets; an int
    crop with a non-square ``image_size`` is ignored (it would cut the long side to a square).

    The image path is split in two so augmentations that expect [0, 1] pixels (CutPaste) can run between
    :meth:`to_unit_tensor` and :meth:`normalize`; :meth:`image` does both. Masks get the same geometry with
    nearest-neighbour resampling so they stay binary. :meth:`restore_map` maps a model-input map back onto
    the original image.
    """

    def __init__(
        self,
        image_size: int | Sequence[int],
        crop_size: int | Sequence[int] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        resize_mode: str = "squash",
    ) -> None:
        self.resize_shape = image_shape(image_size, "image_size")
        if resize_mode not in RESIZE_MODES:
            raise PatchAEError(
                f"resize_mode={resize_mode!r} is unknown; use one of {', '.join(RESIZE_MODES)}"
            )
        square = self.resize_shape[0] == self.resize_shape[1]
        if crop_size is not None and not square and isinstance(crop_size, int):
            log.info("crop_size=%s is ignored for the non-square image_size %s", crop_size, self.resize_shape)
            crop_size = None
        self.crop_shape = None if crop_size is None else image_shape(crop_size, "crop_size")
        if self.crop_shape is not None and (
            self.crop_shape[0] > self.resize_shape[0] or self.crop_shape[1] > self.resize_shape[1]
        ):
            raise PatchAEError(
                f"crop_size ({crop_size}) is larger than image_size ({image_size}); "
                "set crop_size <= image_size, or null for no crop"
            )
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean) != 3 or len(std) != 3:
            raise PatchAEError(f"mean and std need 3 values (RGB), got mean={mean} std={std}")
        if min(std) <= 0:
            raise PatchAEError(f"std values must be positive, got {std}")
        self.image_size = image_size
        self.crop_size = crop_size
        self.resize_mode = resize_mode
        self.mean = mean
        self.std = std

    @classmethod
    def from_preprocessing(cls, preprocessing: Preprocessing) -> ImageTransform:
        """The preprocessing a model was trained with (``model.preprocessing``)."""
        p = preprocessing
        return cls(p.image_size, p.crop_size, p.mean, p.std, p.resize_mode or "squash")

    @property
    def output_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the tensors this transform returns."""
        return self.crop_shape if self.crop_shape is not None else self.resize_shape

    @property
    def output_size(self) -> int:
        """Side length of the square tensors this transform returns (square outputs only)."""
        height, width = self.output_shape
        if height != width:
            raise PatchAEError(f"this transform's output is {height}x{width}, not square; use output_shape")
        return height

    def placement(self, original: tuple[int, int]) -> Placement:
        """Where an ``original`` ``(H, W)`` image lands in the output (after resize, padding and crop)."""
        target_h, target_w = self.resize_shape
        if self.resize_mode == "squash":
            height, width, top, left = target_h, target_w, 0, 0
        else:
            scale = min(target_h / original[0], target_w / original[1])
            height = min(target_h, max(1, round(original[0] * scale)))
            width = min(target_w, max(1, round(original[1] * scale)))
            top, left = (target_h - height) // 2, (target_w - width) // 2
        if self.crop_shape is not None:  # as torchvision's center_crop
            top -= int(round((target_h - self.crop_shape[0]) / 2.0))
            left -= int(round((target_w - self.crop_shape[1]) / 2.0))
        return Placement(top, left, height, width)

    def to_unit_tensor(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> float tensor ``3 x H x W`` in [0, 1] (resize, pad, crop; no normalisation)."""
        return self.unit(self.placed_pixels(image))

    def placed_pixels(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> uint8 tensor ``3 x H x W``, resized, padded and cropped (what a cache may keep)."""
        pixels = F.to_image(image)  # uint8, 3 x H x W; resized in uint8 like PIL would
        placed = self._place(pixels, InterpolationMode.BILINEAR, self._pad_colour()).as_subclass(torch.Tensor)
        # Contiguous, as a cached copy is: augmentations then round alike whichever the source.
        return placed.contiguous()

    @staticmethod
    def unit(pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> float32 in [0, 1]."""
        return F.to_dtype(pixels, torch.float32, scale=True).as_subclass(torch.Tensor)

    def normalize(self, tensor: torch.Tensor) -> torch.Tensor:
        """Channel-wise ``(x - mean) / std``; works on ``3 x H x W`` and ``N x 3 x H x W``."""
        return F.normalize(tensor, list(self.mean), list(self.std))

    def denormalize(self, tensor: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize` (for visualisation)."""
        shape = (3, 1, 1)
        mean = torch.tensor(self.mean, dtype=tensor.dtype, device=tensor.device).view(shape)
        std = torch.tensor(self.std, dtype=tensor.dtype, device=tensor.device).view(shape)
        return tensor * std + mean

    def image(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> normalised float tensor ``3 x H x W``."""
        return self.normalize(self.to_unit_tensor(image))

    def mask(self, mask: Image.Image) -> torch.Tensor:
        """PIL mask -> float tensor ``1 x H x W`` with values in {0, 1}."""
        pixels = F.to_image(mask.convert("L") if mask.mode != "L" else mask)
        # NEAREST_EXACT samples pixel centres (as PIL does); plain NEAREST is shifted by half a pixel.
        pixels = self._place(pixels, InterpolationMode.NEAREST_EXACT, [0])
        return (pixels > 0).to(torch.float32).as_subclass(torch.Tensor)

    def restore_map(self, anomaly_map: torch.Tensor, original: tuple[int, int]) -> torch.Tensor:
        """A model-output map ``(H, W)`` on the ``original`` ``(H, W)`` image: the padding is dropped, the part
        the centre crop cut away (never scored) takes the map's minimum, then it is resized back."""
        place = self.placement(original)
        height, width = anomaly_map.shape[-2:]
        canvas = anomaly_map.new_full((place.height, place.width), float(anomaly_map.min()))
        top, left = max(place.top, 0), max(place.left, 0)
        bottom, right = min(place.top + place.height, height), min(place.left + place.width, width)
        canvas[top - place.top : bottom - place.top, left - place.left : right - place.left] = anomaly_map[
            top:bottom, left:right
        ]
        return torch.nn.functional.interpolate(
            canvas[None, None], size=tuple(original), mode="bilinear", align_corners=False
        )[0, 0]

    def content_box(self, original: tuple[int, int]) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` of the output pixels that show the image (not padding)."""
        place = self.placement(original)
        height, width = self.output_shape
        return (
            max(place.top, 0),
            max(place.left, 0),
            min(place.top + place.height, height),
            min(place.left + place.width, width),
        )

    def _place(self, pixels: torch.Tensor, interpolation: InterpolationMode, fill: list[int]) -> torch.Tensor:
        place = self.placement(tuple(pixels.shape[-2:]))
        pixels = F.resize(
            pixels,
            [place.height, place.width],
            interpolation=interpolation,
            antialias=interpolation == InterpolationMode.BILINEAR,
        )
        if self.resize_mode == "keep_aspect":
            target_h, target_w = self.resize_shape
            top, left = (target_h - place.height) // 2, (target_w - place.width) // 2
            padding = [left, top, target_w - place.width - left, target_h - place.height - top]
            pixels = F.pad(pixels, padding, fill=fill)
        if self.crop_shape is None or self.crop_shape == self.resize_shape:
            return pixels
        return F.center_crop(pixels, list(self.crop_shape))

    def _pad_colour(self) -> list[int]:
        return [round(255 * m) for m in self.mean]

    def __repr__(self) -> str:
        return (
            f"ImageTransform(image_size={self.image_size}, crop_size={self.crop_size}, "
            f"resize_mode={self.resize_mode}, mean={self.mean}, std={self.std})"
        )
