"""CutPaste synthetic defects (Li et al., CVPR 2021) on [0, 1] image tensors.

A patch is cut from a random place of the image, colour-jittered, optionally rotated, and pasted somewhere
else. Two shapes are supported: ``"normal"`` (a rectangle covering ``area_ratio`` of the image, not rotated,
as in the paper) and ``"scar"`` (a thin ``scar_width`` x ``scar_length`` pixel strip, rotated by an angle
from ``rotation``). The returned mask is exactly the set of pixels the paste changed: it lies inside the
written patch (for rotated scars the rotated strip itself, not its bounding box), leaves out the written pixels
that happen to equal what was there (a pasted piece of flat background is not a defect), and every pixel
outside it is bit-identical to the input. All randomness comes from a ``torch.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from patchae.errors import PatchAEError

DEFECT_TYPES = ("normal", "scar", "both")
_MAX_PLACEMENT_TRIES = 10


@dataclass(eq=False)
class CutPaste:
    """Paste a jittered copy of an image region elsewhere in the image with probability ``probability``.

    Args:
        probability: chance that a defect is pasted at all.
        area_ratio: ``normal`` patch area as a fraction of the image area (uniform in the range).
        aspect_ratio: ``normal`` patch width / height (log-uniform in the range).
        scar_width, scar_length: ``scar`` size in pixels at the working resolution (inclusive ranges).
        rotation: ``scar`` rotation in degrees (uniform); ``normal`` patches are not rotated.
        color_jitter: strength of the brightness/contrast/saturation/hue jitter of the pasted patch (0 = off).
        defect_type: ``"normal"``, ``"scar"`` or ``"both"`` (each call picks one of the two at random).
        seed: seed of the internal generator used when no generator is passed to ``__call__``
            (``None``: non-deterministic).
    """

    probability: float = 0.5
    area_ratio: tuple[float, float] = (0.02, 0.15)
    aspect_ratio: tuple[float, float] = (0.3, 3.3)
    scar_width: tuple[int, int] = (2, 16)
    scar_length: tuple[int, int] = (10, 25)
    rotation: tuple[float, float] = (-45.0, 45.0)
    color_jitter: float = 0.1
    defect_type: str = "both"
    seed: int | None = None
    _generator: torch.Generator | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.defect_type not in DEFECT_TYPES:
            raise PatchAEError(
                f"unknown CutPaste defect_type {self.defect_type!r}; use one of {DEFECT_TYPES}"
            )
        if not 0.0 <= float(self.probability) <= 1.0:
            raise PatchAEError(f"CutPaste probability must be in [0, 1], got {self.probability}")
        self.probability = float(self.probability)
        self.area_ratio = _range(
            "area_ratio", self.area_ratio, float, minimum=0.0, maximum=1.0, open_min=True
        )
        self.aspect_ratio = _range("aspect_ratio", self.aspect_ratio, float, minimum=0.0, open_min=True)
        self.scar_width = _range("scar_width", self.scar_width, int, minimum=1)
        self.scar_length = _range("scar_length", self.scar_length, int, minimum=1)
        self.rotation = _range("rotation", self.rotation, float)
        if float(self.color_jitter) < 0:
            raise PatchAEError(f"CutPaste color_jitter must be >= 0, got {self.color_jitter}")
        self.color_jitter = float(self.color_jitter)

    def __call__(
        self, image: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(image, mask)``: the (possibly) defective image and its ``1 x H x W`` {0, 1} mask."""
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(
                f"CutPaste expects a float 3 x H x W tensor, got {tuple(image.shape)} {image.dtype}"
            )
        height, width = image.shape[1:]
        if height < 2 or width < 2:
            raise ValueError(f"CutPaste needs an image of at least 2 x 2 pixels, got {height} x {width}")
        rng = generator if generator is not None else self._internal_generator()
        mask = torch.zeros((1, height, width), dtype=image.dtype, device=image.device)
        if _uniform(rng, 0.0, 1.0) >= self.probability:
            return image, mask

        use_scar = self.defect_type == "scar" or (
            self.defect_type == "both" and _uniform(rng, 0.0, 1.0) < 0.5
        )
        patch_h, patch_w = (
            self._scar_size(rng, height, width) if use_scar else self._normal_size(rng, height, width)
        )
        src_y = _randint(rng, 0, height - patch_h)
        src_x = _randint(rng, 0, width - patch_w)
        patch = self._jitter(image[:, src_y : src_y + patch_h, src_x : src_x + patch_w], rng)
        keep = torch.ones((patch_h, patch_w), dtype=torch.bool, device=image.device)
        if use_scar and self.rotation != (0.0, 0.0):
            patch, keep = _rotate(patch, _uniform(rng, *self.rotation))
            patch, keep = _fit(patch, keep, height - 1, width - 1)
        dst_y, dst_x = self._placement(rng, (height, width), keep.shape, (src_y, src_x, patch_h, patch_w))

        out = image.clone()
        rows, cols = slice(dst_y, dst_y + keep.shape[0]), slice(dst_x, dst_x + keep.shape[1])
        out[:, rows, cols] = torch.where(keep, patch.to(image.dtype), out[:, rows, cols])
        mask[0] = (out != image).any(dim=0).to(image.dtype)  # what changed, not all that was written
        return out, mask

    def _normal_size(self, rng: torch.Generator, height: int, width: int) -> tuple[int, int]:
        area = _uniform(rng, *self.area_ratio) * height * width
        log_low, log_high = (math.log(r) for r in self.aspect_ratio)
        aspect = math.exp(_uniform(rng, log_low, log_high))  # width / height
        patch_w = min(max(round(math.sqrt(area * aspect)), 1), width - 1)
        patch_h = min(max(round(math.sqrt(area / aspect)), 1), height - 1)
        return patch_h, patch_w

    def _scar_size(self, rng: torch.Generator, height: int, width: int) -> tuple[int, int]:
        scar_w = min(_randint(rng, *self.scar_width), width - 1)
        scar_l = min(_randint(rng, *self.scar_length), height - 1)
        return scar_l, scar_w  # an upright strip, rotated afterwards

    def _jitter(self, patch: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        strength = self.color_jitter
        if strength == 0:
            return patch.clone()
        low, high = max(0.0, 1.0 - strength), 1.0 + strength
        patch = F.adjust_brightness(patch, _uniform(rng, low, high))
        patch = F.adjust_contrast(patch, _uniform(rng, low, high))
        patch = F.adjust_saturation(patch, _uniform(rng, low, high))
        hue = min(strength, 0.5)
        return F.adjust_hue(patch, _uniform(rng, -hue, hue)).as_subclass(torch.Tensor)

    def _placement(
        self,
        rng: torch.Generator,
        image_hw: tuple[int, int],
        patch_hw: Sequence[int],
        source: tuple[int, int, int, int],
    ) -> tuple[int, int]:
        """Top-left corner for the paste, never the exact rectangle the patch was cut from."""
        max_y, max_x = image_hw[0] - patch_hw[0], image_hw[1] - patch_hw[1]
        for _ in range(_MAX_PLACEMENT_TRIES):
            y, x = _randint(rng, 0, max_y), _randint(rng, 0, max_x)
            if (y, x, patch_hw[0], patch_hw[1]) != source:
                return y, x
        # Only reachable on tiny images; patches are at most (H-1) x (W-1) so a shifted spot always exists.
        src_y, src_x = source[:2]
        if max_x > 0:
            return src_y, (0 if src_x > 0 else max_x)
        return (0 if src_y > 0 else max_y), src_x

    def _internal_generator(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator()
            if self.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(int(self.seed))
        return self._generator

    def __getstate__(self) -> dict[str, Any]:
        # torch.Generator is not picklable everywhere; DataLoader workers may need to pickle this object.
        state = self.__dict__.copy()
        generator = state.pop("_generator", None)
        state["_generator_state"] = None if generator is None else generator.get_state()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator_state = state.pop("_generator_state", None)
        self.__dict__.update(state)
        self._generator = None
        if generator_state is not None:
            self._generator = torch.Generator()
            self._generator.set_state(generator_state)


def _uniform(rng: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=rng))


def _randint(rng: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in the inclusive range [low, high]."""
    return int(torch.randint(low, high + 1, (), generator=rng))


def _rotate(patch: torch.Tensor, angle: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate a patch (expanding the canvas) and return it with the boolean footprint of the rotated patch.

    Colour and coverage are rotated together with bilinear sampling; dividing by the coverage undoes the
    blending with the empty (zero) canvas so edge pixels keep the patch colour instead of darkening.
    Pixels at least half covered form the footprint.
    """
    coverage = torch.ones_like(patch[:1])
    rotated = F.rotate(
        torch.cat([patch, coverage]), angle, interpolation=InterpolationMode.BILINEAR, expand=True, fill=0.0
    ).as_subclass(torch.Tensor)
    alpha = rotated[3:]
    colour = (rotated[:3] / alpha.clamp_min(1e-6)).clamp(0.0, 1.0)
    keep = alpha[0] > 0.5
    rows, cols = keep.any(dim=1).nonzero(), keep.any(dim=0).nonzero()
    if len(rows) == 0:  # degenerate 1-pixel scars: keep the centre pixel
        keep[keep.shape[0] // 2, keep.shape[1] // 2] = True
        rows, cols = keep.any(dim=1).nonzero(), keep.any(dim=0).nonzero()
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return colour[:, top:bottom, left:right], keep[top:bottom, left:right]


def _fit(
    patch: torch.Tensor, keep: torch.Tensor, max_h: int, max_w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre-crop a rotated patch that became larger than the image allows."""
    height, width = keep.shape
    top, left = max(0, (height - max_h) // 2), max(0, (width - max_w) // 2)
    rows, cols = slice(top, top + min(height, max_h)), slice(left, left + min(width, max_w))
    patch, keep = patch[:, rows, cols], keep[rows, cols]
    if not keep.any():
        keep = keep.clone()
        keep[keep.shape[0] // 2, keep.shape[1] // 2] = True
    return patch, keep


def _range(
    name: str,
    values: Sequence[Any],
    kind: type,
    minimum: float | None = None,
    maximum: float | None = None,
    open_min: bool = False,
) -> tuple[Any, Any]:
    try:
        low, high = (kind(v) for v in values)
    except (TypeError, ValueError) as error:
        raise PatchAEError(f"CutPaste {name} must be a pair [low, high], got {values!r}") from error
    too_small = minimum is not None and (low <= minimum if open_min else low < minimum)
    too_large = maximum is not None and high > maximum
    if low > high or too_small or too_large:
        lower = "-inf" if minimum is None else minimum
        upper = "inf" if maximum is None else maximum
        bounds = f"{'(' if open_min else '['}{lower}, {upper}]"
        raise PatchAEError(f"CutPaste {name} must satisfy low <= high within {bounds}, got {values!r}")
    return low, high
