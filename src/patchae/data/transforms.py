"""Deterministic geometry + normalisation shared by images and their masks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from patchae.errors import PatchAEError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class ImageTransform:
    """Square resize to ``image_size`` (bilinear, antialiased), then centre crop to ``crop_size``.

    The image path is split in two so augmentations that expect [0, 1] pixels (CutPaste) can run between
    :meth:`to_unit_tensor` and :meth:`normalize`; :meth:`image` does both. Masks get the same geometry with
    nearest-neighbour resampling so they stay binary.
    """

    def __init__(
        self,
        image_size: int,
        crop_size: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise PatchAEError(f"image_size must be a positive integer, got {image_size!r}")
        if crop_size is not None:
            if isinstance(crop_size, bool) or not isinstance(crop_size, int) or crop_size < 1:
                raise PatchAEError(f"crop_size must be a positive integer or null, got {crop_size!r}")
            if crop_size > image_size:
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
        self.mean = mean
        self.std = std

    @property
    def output_size(self) -> int:
        """Side length of the square tensors this transform returns."""
        return self.crop_size if self.crop_size is not None else self.image_size

    def to_unit_tensor(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> float tensor ``3 x S x S`` in [0, 1] (resize + crop, no normalisation)."""
        pixels = F.to_image(image)  # uint8, 3 x H x W; resized in uint8 like PIL would
        pixels = F.resize(
            pixels,
            [self.image_size, self.image_size],
            interpolation=InterpolationMode.BILINEAR,
            antialias=True,
        )
        pixels = self._crop(pixels)
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
        """PIL RGB image -> normalised float tensor ``3 x S x S``."""
        return self.normalize(self.to_unit_tensor(image))

    def mask(self, mask: Image.Image) -> torch.Tensor:
        """PIL mask -> float tensor ``1 x S x S`` with values in {0, 1}."""
        pixels = F.to_image(mask.convert("L") if mask.mode != "L" else mask)
        # NEAREST_EXACT samples pixel centres (as PIL does); plain NEAREST is shifted by half a pixel.
        pixels = F.resize(
            pixels, [self.image_size, self.image_size], interpolation=InterpolationMode.NEAREST_EXACT
        )
        return (self._crop(pixels) > 0).to(torch.float32).as_subclass(torch.Tensor)

    def _crop(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.crop_size is None or self.crop_size == self.image_size:
            return pixels
        return F.center_crop(pixels, [self.crop_size, self.crop_size])

    def __repr__(self) -> str:
        return (
            f"ImageTransform(image_size={self.image_size}, crop_size={self.crop_size}, "
            f"mean={self.mean}, std={self.std})"
        )
