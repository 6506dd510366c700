"""SSL-AE's structured corruption (Bauer et al.) on [0, 1] image tensors: the input the autoencoder learns to clean.

Between ``regions`` regions of varied shape (rectangle, ellipse, Perlin-noise blob) and size are replaced by a
fill (a shifted region of another training image, a procedural texture, i.i.d. noise, a flat colour or, as an
option, the image itself smoothly warped) blended in at a random opacity; the task mixes segmentation (where is
the corruption) and inpainting (what was there).
Then i.i.d. Gaussian noise of ``noise_std`` is added to the whole image and clipped to [0, 1]. The mask is exactly
the pixels the regions changed; the noise touches every pixel and is not in it.

The training target (:meth:`Corruption.training_pair`) is, as in the SSL-AE follow-up (arXiv:2511.07233), the
clean image inside the corrupted regions and the input itself, its noise sample included, everywhere else: the
model learns to repair the corruption and to pass the rest through unchanged, a Tikhonov regulariser that anchors
its Jacobian at the identity (so it keeps what it is shown, a darker normal part included).
``noise_in_target=False`` gives the clean target everywhere (ordinary denoising, which pulls the Jacobian
towards zero), kept for the ablation. All randomness comes from a ``torch.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patchae.data.perlin import perlin_noise
from patchae.errors import PatchAEError

SHAPES = ("rectangle", "ellipse", "blob")
FILLS = ("image", "texture", "noise", "color", "warp")
PLACEMENTS = ("uniform", "foreground")
# ``foreground`` placement: a pixel is foreground where its grey level differs from the median of the image's
# border (4 px wide) by more than this, in [0, 1] units.
FOREGROUND_DIFFERENCE = 0.1
FOREGROUND_BORDER = 4


@dataclass(eq=False)
class Corruption:
    """Replace random regions of an image by foreign content and add Gaussian noise.

    Args:
        regions: inclusive range of the number of regions per image.
        area_ratio: area of one region as a fraction of the image (uniform in the range).
        aspect_ratio: region width / height (log-uniform in the range).
        shapes, fills: the kinds to draw from, each region uniformly.
        placement: where region centres fall: ``uniform`` over the image, or ``foreground``: on a pixel of the
            object (:func:`foreground_mask`: unlike the image's border), so that the model learns to repair the
            object rather than mostly the background it lies on (a screw covers about a fifth of its image);
            uniform where an image has no such pixel.
        opacity: weight of the fill against the original inside a region (uniform in the range; 1 = replaced).
        warp_amplitude: largest displacement of a ``warp`` fill as a fraction of the image's longer side
            (uniform in the range; reached to within 1 %).
        noise_std: standard deviation of the i.i.d. Gaussian noise over the whole image (0 = none).
        noise_in_target: the training target keeps the input's noise outside the corrupted regions (the
            follow-up's), else it is the clean image everywhere.
        seed: seed of the generator used when ``__call__`` gets none.
    """

    regions: tuple[int, int] = (1, 4)
    area_ratio: tuple[float, float] = (0.002, 0.05)
    aspect_ratio: tuple[float, float] = (0.3, 3.3)
    shapes: tuple[str, ...] = SHAPES
    fills: tuple[str, ...] = ("image", "texture", "noise", "color")
    placement: str = "uniform"
    opacity: tuple[float, float] = (0.5, 1.0)
    warp_amplitude: tuple[float, float] = (0.01, 0.04)
    noise_std: float = 0.02
    noise_in_target: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self.regions = _ordered("regions", self.regions, int, minimum=0)
        self.area_ratio = _ordered("area_ratio", self.area_ratio, float, minimum=1e-6, maximum=1.0)
        self.aspect_ratio = _ordered("aspect_ratio", self.aspect_ratio, float, minimum=1e-3)
        self.opacity = _ordered("opacity", self.opacity, float, minimum=1e-3, maximum=1.0)
        self.warp_amplitude = _ordered("warp_amplitude", self.warp_amplitude, float, minimum=0.0, maximum=0.5)
        self.shapes = checked_choices("corruption.shapes", self.shapes, SHAPES)
        self.fills = checked_choices("corruption.fills", self.fills, FILLS)
        if self.placement not in PLACEMENTS:
            raise PatchAEError(
                f"corruption.placement={self.placement!r} must be one of {', '.join(PLACEMENTS)}"
            )
        if not 0.0 <= float(self.noise_std) < 1.0:
            raise PatchAEError(f"corruption.noise_std={self.noise_std} must be in [0, 1)")
        self.noise_std = float(self.noise_std)

    def __call__(
        self,
        image: torch.Tensor,
        generator: torch.Generator | None = None,
        source: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(corrupted, mask)`` for a float ``3 x H x W`` image in [0, 1]; ``source`` (same shape) is the
        other training image that ``image`` fills copy from (the image itself, shifted, without one)."""
        corrupted, _, mask = self.training_pair(image, generator, source)
        return corrupted, mask

    def training_pair(
        self,
        image: torch.Tensor,
        generator: torch.Generator | None = None,
        source: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(corrupted, target, mask)``: the input, what the model is to give back, and the corrupted pixels."""
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(
                f"Corruption expects a float 3 x H x W tensor, got {tuple(image.shape)} {image.dtype}"
            )
        if source is not None and source.shape != image.shape:
            raise ValueError(f"source {tuple(source.shape)} must have the image's shape {tuple(image.shape)}")
        rng = generator if generator is not None else torch.Generator().manual_seed(self.seed)
        out = image.clone()
        centres = foreground_mask(image).flatten().nonzero()[:, 0] if self.placement == "foreground" else None
        for _ in range(_randint(rng, *self.regions)):
            region = self.region_mask(image.shape[1], image.shape[2], rng, centres).to(image.device)
            fill = self.fill(image if source is None else source, rng, image=image)
            opacity = _uniform(rng, *self.opacity)
            out = torch.where(region, opacity * fill + (1 - opacity) * out, out)
        changed = (out != image).any(dim=0, keepdim=True)
        target = image
        if self.noise_std > 0:
            noise = self.noise_std * torch.randn(image.shape, generator=rng).to(image)
            out = (out + noise).clamp(0.0, 1.0)
            if self.noise_in_target:  # outside the regions the target is the input itself
                target = torch.where(changed, image, out)
        return out, target, changed.to(image.dtype)

    def region_mask(
        self, height: int, width: int, rng: torch.Generator, centres: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A (height, width) bool mask of one region of a random shape, size and place; with ``centres`` (flat
        pixel indices, not empty) its centre lies in one of those pixels."""
        shape = self.shapes[_randint(rng, 0, len(self.shapes) - 1)]
        area = _uniform(rng, *self.area_ratio) * height * width
        log_low, log_high = (math.log(r) for r in self.aspect_ratio)
        aspect = math.exp(_uniform(rng, log_low, log_high))
        half_w = max(math.sqrt(area * aspect) / 2, 0.5)
        half_h = max(math.sqrt(area / aspect) / 2, 0.5)
        if centres is not None and len(centres) > 0:
            row, column = divmod(int(centres[_randint(rng, 0, len(centres) - 1)]), width)
            centre_y, centre_x = row + _uniform(rng, 0, 1), column + _uniform(rng, 0, 1)
        else:
            centre_y, centre_x = _uniform(rng, 0, height), _uniform(rng, 0, width)
        angle = _uniform(rng, 0, math.pi)
        ys = torch.arange(height, dtype=torch.float32)[:, None] + 0.5 - centre_y
        xs = torch.arange(width, dtype=torch.float32)[None, :] + 0.5 - centre_x
        # Coordinates along the region's own (rotated) axes.
        along = xs * math.cos(angle) + ys * math.sin(angle)
        across = -xs * math.sin(angle) + ys * math.cos(angle)
        if shape == "rectangle":
            region = (along.abs() <= half_w) & (across.abs() <= half_h)
        elif shape == "ellipse":
            region = (along / half_w) ** 2 + (across / half_h) ** 2 <= 1
        else:  # a Perlin blob inside the ellipse's box: ragged, irregular edges
            box = (along.abs() <= 1.5 * half_w) & (across.abs() <= 1.5 * half_h)
            cells = max(2, round(max(height, width) / max(half_w, half_h, 1.0) / 2))
            region = box & (perlin_noise(height, width, (cells, cells), rng) > 0.05)
        if not region.any():  # a tiny draw between pixel centres: keep the pixel under the centre
            region[min(int(centre_y), height - 1), min(int(centre_x), width - 1)] = True
        return region

    def fill(
        self, source: torch.Tensor, rng: torch.Generator, image: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A ``3 x H x W`` image of foreign content in [0, 1]; a ``warp`` is ``image`` (else ``source``) itself,
        geometrically distorted."""
        kind = self.fills[_randint(rng, 0, len(self.fills) - 1)]
        _, height, width = source.shape
        if kind == "warp":
            return self.warp(source if image is None else image, rng)
        if kind == "image":  # another place of the source image
            shift = (
                (_randint(rng, 1, height - 1), _randint(rng, 1, width - 1))
                if min(height, width) > 1
                else (0, 0)
            )
            return source.roll(shift, dims=(1, 2))
        if kind == "noise":
            return torch.rand(source.shape, generator=rng).to(source)
        colour = torch.rand(3, 1, 1, generator=rng).to(source)
        if kind == "color":
            return colour.expand_as(source)
        # texture: Perlin noise between two random colours, at a random lattice scale
        other = torch.rand(3, 1, 1, generator=rng).to(source)
        cells = 2 ** _randint(rng, 2, 5)
        weight = (perlin_noise(height, width, (cells, cells), rng) + 0.7).clamp(0, 1.4) / 1.4
        return torch.lerp(colour, other, weight.to(source)[None])

    def warp(self, image: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """``image`` resampled along a smooth random displacement field (Perlin noise per axis, largest shift
        ``warp_amplitude`` of the longer side): the same material in the wrong shape, as a bent tip, a dented
        thread or a squeezed edge are, where the other fills bring in foreign content."""
        _, height, width = image.shape
        amplitude = _uniform(rng, *self.warp_amplitude) * max(height, width)
        cells = 2 ** _randint(rng, 2, 4)
        # perlin_noise spans about [-0.7, 0.7] (at most +-0.707): its extremes shift by about ``amplitude`` pixels
        shift_y, shift_x = (
            amplitude / 0.7 * perlin_noise(height, width, (cells, cells), rng) for _ in range(2)
        )
        ys = torch.arange(height, dtype=torch.float32)[:, None] + shift_y
        xs = torch.arange(width, dtype=torch.float32)[None, :] + shift_x
        # grid_sample's coordinates: -1 and 1 are the centres of the outer pixels (align_corners=True)
        grid = torch.stack([2 * xs / max(width - 1, 1) - 1, 2 * ys / max(height - 1, 1) - 1], dim=-1)
        warped = F.grid_sample(
            image[None].float(),
            grid[None].to(image.device),
            mode="bilinear",
            padding_mode="border",
            align_corners=True,
        )
        return warped[0].to(image.dtype).clamp(0.0, 1.0)


def foreground_mask(image: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: the pixels of a ``3 x H x W`` [0, 1] image whose grey level differs from the median grey of
    its border by more than ``FOREGROUND_DIFFERENCE``: the object on a plain background (all False on an image
    that is border-coloured throughout)."""
    grey = image.float().mean(dim=0)
    border = min(FOREGROUND_BORDER, max(1, min(grey.shape) // 4))
    frame = torch.cat(
        [
            grey[:border].flatten(),
            grey[-border:].flatten(),
            grey[:, :border].flatten(),
            grey[:, -border:].flatten(),
        ]
    )
    return (grey - frame.median()).abs() > FOREGROUND_DIFFERENCE


def _uniform(rng: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=rng).item()


def _randint(rng: torch.Generator, low: int, high: int) -> int:
    return int(torch.randint(low, high + 1, (), generator=rng))


def _ordered(name: str, values, kind, minimum: float | None = None, maximum: float | None = None):
    try:
        low, high = (kind(value) for value in values)
    except (TypeError, ValueError):
        raise PatchAEError(f"corruption.{name}={values!r} must be two numbers [low, high]") from None
    if low > high or (minimum is not None and low < minimum) or (maximum is not None and high > maximum):
        raise PatchAEError(
            f"corruption.{name}={values!r} must be [low, high] with low <= high within [{minimum}, {maximum}]"
        )
    return low, high


def checked_choices(key: str, values, known: tuple[str, ...]) -> tuple[str, ...]:
    """``values`` (a list, or one name) as a tuple; a one-line error naming ``key`` for an empty list or an
    unknown name."""
    chosen = (values,) if isinstance(values, str) else tuple(values)
    unknown = [value for value in chosen if value not in known]
    if not chosen or unknown:
        raise PatchAEError(f"{key}={list(chosen)} must be a non-empty list of {', '.join(known)}")
    return chosen
