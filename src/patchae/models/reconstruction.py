"""What the reconstruction models (SSL-AE, DAAD) share: a convolutional encoder-decoder with skip connections,
and the scoring by reconstruction error instead of a memory bank.

Their anomaly map is a weighted sum of error terms (SSL-AE: the reconstruction error; DAAD: that and its
discriminator-feature distance), each standardised with its mean and standard deviation over the normal
training images, fitted at the end of fit (and, with the current weights, before every validation). The map is
then blurred and the image score taken exactly as for the bank models (:mod:`patchae.scoring.maps`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from patchae.errors import PatchAEError
from patchae.models.backbone import create_feature_extractor

# How a skip meets the decoder's features: concatenated (ours), or their gated convex combination (ConvexMerge).
SKIP_MERGES = ("concat", "convex")


def conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """Two 3x3 convolutions with BatchNorm and LeakyReLU; the first one strided."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.2, inplace=True),
    )


def pretrained_encoder(
    backbone: str, layers: Sequence[int], pretrained: bool, weights: str | None
) -> nn.Module:
    """A timm backbone whose stages ``layers`` sit at strides 2, 4, 8, ...: the encoder's levels 1, 2, ..."""
    encoder = create_feature_extractor(backbone, layers, pretrained=pretrained, weights=weights)
    strides = list(encoder.feature_info.reduction())
    if strides != [2 ** (i + 1) for i in range(len(strides))]:
        raise PatchAEError(
            f"model.encoder_layers={list(layers)} of {backbone} are at strides {strides}; the encoder needs "
            "consecutive stages at strides 2, 4, 8, ..., e.g. model.encoder_layers=[0,1,2,3]"
        )
    return encoder


def level_channels(channels: Sequence[int], encoder: nn.Module | None) -> list[int]:
    """Widths of the levels: ``channels``, or with a pretrained encoder level 0's and then its stages'."""
    if encoder is None:
        return [int(c) for c in channels]
    return [int(channels[0]), *encoder.feature_info.channels()]


class EncoderDecoder(nn.Module):
    """A U-Net-shaped autoencoder: level i has ``channels[i]`` channels at stride 2**i (level 0: full
    resolution, the last level: the bottleneck; with ``fold`` > 1 at stride ``fold * 2**i``). Every skip
    connection and the bottleneck pass through the given module (identity by default; DAAD's block-wise
    memories), so what reaches the decoder is what those modules let through. The output is an image in the
    input's (normalised) units.

    With ``encoder`` (see :func:`pretrained_encoder`), its stages are levels 1, 2, ... and only level 0 (full
    resolution) is a convolution block of its own; ``channels`` then come from :func:`level_channels`.

    With ``per_image_intensity``, the models put every image in its own intensity frame before the network sees it
    (:meth:`standardize`), so that a global change of brightness or contrast changes neither the reconstruction
    nor the error.

    With ``fold`` = f > 1 the image is folded f x f into channels (pixel unshuffle: no pixel is dropped) before
    level 0 and the output unfolded back (pixel shuffle): the network works at 1/f of the image's side, its cost
    that of an image f times smaller, while it sees and rebuilds every pixel of the larger one."""

    # Run the convolutions in NHWC (channels_last) order: a subclass sets it where it was measured to pay.
    channels_last = False

    def __init__(
        self,
        channels: Sequence[int],
        skips: bool | Sequence[int] = True,
        level_modules: Sequence[nn.Module] | None = None,
        encoder: nn.Module | None = None,
        per_image_intensity: bool = False,
        skip_merge: str = "concat",
        bottleneck_dilations: Sequence[int] = (),
        fold: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(fold, bool) or not isinstance(fold, int) or fold < 1:
            raise PatchAEError(
                f"model.fold={fold!r} must be an integer >= 1 (1: the network at the image's resolution)"
            )
        if fold > 1 and encoder is not None:
            raise PatchAEError(
                f"model.fold={fold} needs the from-scratch encoder (backbone=scratch): a pretrained one expects the "
                "unfolded image"
            )
        self.fold = fold
        if skip_merge not in SKIP_MERGES:
            raise PatchAEError(f"model.skip_merge={skip_merge!r} must be one of {', '.join(SKIP_MERGES)}")
        self.per_image_intensity = bool(per_image_intensity)
        channels = level_channels(channels, encoder)
        if len(channels) < 2 or min(channels) < 1:
            raise PatchAEError(f"model.channels={channels} needs at least two positive widths (levels)")
        if level_modules is not None and len(level_modules) != len(channels):
            raise ValueError("one module per level (skips and bottleneck) is needed")
        self.channels = channels
        self.skip_levels = skip_levels(skips, len(channels))
        self.pretrained = encoder
        levels = 1 if encoder is not None else len(channels)
        self.encoder = nn.ModuleList(
            conv_block(3 * fold**2 if i == 0 else channels[i - 1], channels[i], stride=1 if i == 0 else 2)
            for i in range(levels)
        )
        self.level_modules = nn.ModuleList(level_modules or [nn.Identity() for _ in channels])
        self.bottleneck = dilated_stack(channels[-1], bottleneck_dilations)
        convex = skip_merge == "convex"
        # A convex merge hands the decoder block the skip's width; concatenation both widths.
        self.merges = nn.ModuleDict(
            {str(i): ConvexMerge(channels[i], channels[i + 1]) for i in self.skip_levels} if convex else {}
        )
        self.decoder = nn.ModuleList(
            conv_block(
                channels[i]
                if convex and i in self.skip_levels
                else channels[i + 1] + (channels[i] if i in self.skip_levels else 0),
                channels[i],
            )
            for i in range(len(channels) - 1)
        )
        self.head = nn.Conv2d(channels[0], 3 * fold**2, 1)

    @property
    def stride(self) -> int:
        return self.fold * 2 ** (len(self.channels) - 1)

    def check_input(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise PatchAEError(f"expected a batch of RGB images (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-1] % self.stride or images.shape[-2] % self.stride:
            raise PatchAEError(
                f"image size {tuple(images.shape[-2:])} must be a multiple of {self.stride} (the coarsest "
                "level of model.channels, or memory block); change data.image_size / data.crop_size"
            )

    def standardize(self, images: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """``images`` in the intensity frame of ``reference`` (default: themselves) when ``per_image_intensity``:
        each reference image's channel means removed, then divided by its standard deviation over channels and
        pixels (one for all channels, so colour contrasts keep their ratios). A gain and offset of the whole image
        (in raw or normalised pixels) cancel exactly. Unchanged otherwise."""
        if not self.per_image_intensity:
            return images
        reference = images if reference is None else reference
        mean = reference.mean(dim=(2, 3), keepdim=True)
        std = (reference - mean).pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-6)
        return (images - mean) / std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = []
        inputs = F.pixel_unshuffle(images, self.fold) if self.fold > 1 else images
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        x = inputs
        for block in self.encoder:
            x = block(x)
            features.append(x)
        if self.pretrained is not None:
            features += self.pretrained(inputs)  # the image itself: a pretrained encoder rules out fold > 1
        x = self.bottleneck(self.level_modules[-1](features[-1]))
        for i in reversed(range(len(self.decoder))):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            if i in self.skip_levels:
                skip = self.level_modules[i](features[i])
                x = self.merges[str(i)](skip, x) if self.merges else torch.cat([x, skip], dim=1)
            x = self.decoder[i](x)
        x = self.head(x)
        return F.pixel_shuffle(x, self.fold) if self.fold > 1 else x


class ConvexMerge(nn.Module):
    """A skip merged with the decoder's upsampled features as their convex combination, per pixel and channel:
    ``c * skip + (1 - c) * decoded``, the decoded features first projected to the skip's width and ``c`` a sigmoid
    of both. The network can then shut a skip where its input looks corrupted and draw that place from the coarser
    context instead (a third-party reading of SSL-AE's convex combination modules; the papers' text was not
    available here)."""

    def __init__(self, skip_channels: int, decoded_channels: int) -> None:
        super().__init__()
        self.project = nn.Conv2d(decoded_channels, skip_channels, 1)
        self.gate = nn.Conv2d(2 * skip_channels, skip_channels, 3, padding=1)

    def forward(self, skip: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        decoded = self.project(decoded)
        weight = torch.sigmoid(self.gate(torch.cat([skip, decoded], dim=1)))
        return decoded + weight * (skip - decoded)


class DilatedStack(nn.Sequential):
    """Residual 3x3 convolutions (BatchNorm, LeakyReLU) at growing dilations: a wide receptive field at the
    bottleneck for little compute (stacked dilated convolutions, as a third-party reading of SSL-AE has them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = x + layer(x)
        return x


def dilated_stack(channels: int, dilations: Sequence[int]) -> nn.Module:
    """A :class:`DilatedStack` of the given dilations, or the identity for none; a one-line error for bad ones."""
    rates = positive_integers(dilations)
    if rates is None:
        raise PatchAEError(
            f"model.bottleneck_dilations={dilations!r} must be a list of positive integers, e.g. [1,2,4] ([] for none)"
        )
    if not rates:
        return nn.Identity()
    return DilatedStack(
        *(
            nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=rate, dilation=rate, bias=False),
                nn.BatchNorm2d(channels),
                nn.LeakyReLU(0.2, inplace=True),
            )
            for rate in rates
        )
    )


def skip_levels(skips: bool | Sequence[int], levels: int) -> frozenset[int]:
    """The levels whose encoder features skip to the decoder: all but the bottleneck (``True``), none
    (``False``) or the listed ones (0 = full resolution)."""
    if isinstance(skips, bool):
        return frozenset(range(levels - 1) if skips else ())
    try:
        chosen = frozenset(int(level) for level in skips)
    except (TypeError, ValueError):
        chosen = None
    if chosen is None or not chosen <= set(range(levels - 1)):
        raise PatchAEError(
            f"model.skips={skips!r} must be true, false or a list of levels from 0 (full resolution) to "
            f"{levels - 2} (the bottleneck, level {levels - 1}, has none), e.g. "
            f"model.skips=[{max(levels - 3, 0)},{levels - 2}]"
        )
    return chosen


def squared_error_map(images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """(B, H, W) squared error, averaged over the channels."""
    return (images - reconstruction).pow(2).mean(dim=1)


def positive_integers(values: Sequence[int]) -> tuple[int, ...] | None:
    """``values`` as a tuple of ints when it is a sequence of whole numbers >= 1 (``[]`` included), else None."""
    try:
        numbers = tuple(int(value) for value in values)
        valid = all(number >= 1 and number == value for number, value in zip(numbers, values, strict=True))
    except (TypeError, ValueError):
        return None
    return numbers if valid else None


def check_inpainting(cells: Sequence[int], grid: int) -> tuple[tuple[int, ...], int]:
    """``(cells, grid)`` of :func:`inpainted` as plain ints, or a one-line error naming the settings."""
    sizes = positive_integers(cells)
    if sizes is None or isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise PatchAEError(
            f"model.inpaint_cells={cells!r} must be a list of cell sides in pixels (e.g. [8,16]; [] scores the plain "
            f"reconstruction) and model.inpaint_grid={grid!r} an integer >= 2 (cells hidden in a grid x grid pattern)"
        )
    return sizes, grid


def inpainted(network: nn.Module, images: torch.Tensor, cell: int, grid: int) -> torch.Tensor:
    """Every pixel as ``network`` rebuilds it while its own cell is hidden: the image is cut into ``cell`` x
    ``cell`` pixel cells, which take turns in ``grid * grid`` passes (each pass hides every ``grid``-th cell of
    every ``grid``-th row, filled with the image's mean colour, so each hidden cell keeps a ring of visible
    context); each pixel is taken from the pass that hid it. Meant to expose a defect that the plain
    reconstruction passes through, it needs a model that can draw a hidden normal cell from its context: SSL-AE's
    CPU setting cannot (docs/results.md)."""
    phase = cell_phases(images, cell, grid)
    rebuilt = torch.empty_like(images)
    for turn in range(grid * grid):
        hidden = phase == turn
        if hidden.any():
            rebuilt = torch.where(hidden, network(hide(images, hidden)), rebuilt)
    return rebuilt


def cell_phases(images: torch.Tensor, cell: int, grid: int) -> torch.Tensor:
    """(H, W) long: the pass (0 .. grid * grid - 1) of :func:`inpainted` that hides each pixel of ``images``."""
    height, width = images.shape[-2:]
    rows = torch.arange(height, device=images.device) // cell % grid
    columns = torch.arange(width, device=images.device) // cell % grid
    return rows[:, None] * grid + columns[None, :]


def hide(images: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``images`` (B, C, H, W) with the ``hidden`` pixels ((H, W) bool) set to each image's mean colour."""
    return torch.where(hidden, images.mean(dim=(2, 3), keepdim=True), images)
