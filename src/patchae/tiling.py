"""Tiling for large images: cut a batch into overlapping tiles, stitch tile maps back (mean over overlaps).

``data.tiling: {tile: 256, stride: 192}`` makes every model score tiles of the (near native resolution) model
input instead of the whole input at once; the bank holds the patch vectors of all training tiles. Tiles start
every ``stride`` pixels, and a last tile flush with the far edge covers what the stride leaves over, so the
tiles cover the whole input. Test, predict and export all go through :meth:`Tiling.cut` and
:meth:`Tiling.stitch`, and both are plain slicing and padding, so they trace into the exported graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from patchae.errors import PatchAEError


@dataclass(frozen=True)
class Tiling:
    tile: int
    stride: int

    @classmethod
    def from_config(cls, config: Any) -> Tiling | None:
        """``{tile, stride}`` (stride null = tile: no overlap) -> a Tiling; None, ``{}`` or tile null: no tiling."""
        if config is None:
            return None
        if isinstance(config, Tiling):
            return config
        if not hasattr(config, "get"):
            raise PatchAEError(
                f"data.tiling must be a mapping like {{tile: 256, stride: 192}}, got {config!r}"
            )
        unknown = set(config) - {"tile", "stride"}
        if unknown:
            raise PatchAEError(
                f"data.tiling has unknown key(s) {', '.join(sorted(unknown))}; use tile and stride"
            )
        tile, stride = config.get("tile"), config.get("stride")
        if tile is None:
            if stride is not None:
                raise PatchAEError(
                    "data.tiling.stride is set but data.tiling.tile is not; set both, e.g. 256 and 192"
                )
            return None
        stride = tile if stride is None else stride
        for key, value in (("tile", tile), ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PatchAEError(f"data.tiling.{key} must be a positive integer, got {value!r}")
        if stride > tile:
            raise PatchAEError(
                f"data.tiling.stride={stride} is larger than data.tiling.tile={tile}, which would leave gaps; "
                "use stride <= tile"
            )
        return cls(tile, stride)

    def as_config(self) -> dict[str, int]:
        return {"tile": self.tile, "stride": self.stride}

    def check_fits(self, height: int, width: int) -> None:
        if self.tile > height or self.tile > width:
            raise PatchAEError(
                f"data.tiling.tile={self.tile} is larger than the model input {height}x{width}; use a tile of at "
                "most the input's shorter side, or a larger data.image_size"
            )

    def starts(self, length: int) -> list[int]:
        """Tile offsets along one axis of ``length`` pixels: every ``stride``, the last one flush with the end."""
        starts = list(range(0, length - self.tile + 1, self.stride))
        if starts[-1] + self.tile < length:
            starts.append(length - self.tile)
        return starts

    def origins(self, height: int, width: int) -> list[tuple[int, int]]:
        """Top-left corners of the tiles of a ``height x width`` input, row by row."""
        self.check_fits(height, width)
        return [(top, left) for top in self.starts(height) for left in self.starts(width)]

    def count(self, height: int, width: int) -> int:
        return len(self.origins(height, width))

    def cut(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B * T, C, tile, tile), the T tiles of each image together, in :meth:`origins` order."""
        tiles = [
            images[..., top : top + self.tile, left : left + self.tile]
            for top, left in self.origins(*images.shape[-2:])
        ]
        return torch.stack(tiles, dim=1).flatten(0, 1)

    def stitch(self, tile_maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B * T, tile, tile) maps of the tiles of :meth:`cut` -> (B, H, W), the mean where tiles overlap."""
        origins = self.origins(height, width)
        maps = tile_maps.reshape(-1, len(origins), self.tile, self.tile)
        ones = torch.ones_like(maps[:1, 0])
        total, coverage = 0, 0
        for index, (top, left) in enumerate(origins):
            # Zeros around each tile rather than in-place writes: plain ops that trace into a static graph.
            padding = (left, width - left - self.tile, top, height - top - self.tile)
            total = total + F.pad(maps[:, index], padding)
            coverage = coverage + F.pad(ones, padding)
        return total / coverage


def random_tile(
    image: torch.Tensor, mask: torch.Tensor, tile: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random ``tile x tile`` crop of an image (C, H, W) and its mask alike: Patch AE's training crops."""
    height, width = image.shape[-2:]
    top = int(torch.randint(0, height - tile + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - tile + 1, (1,), generator=generator))
    window = (slice(None), slice(top, top + tile), slice(left, left + tile))
    return image[window], mask[window]
