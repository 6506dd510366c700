"""Training images decoded once and kept in memory, instead of decoded and resized again every epoch.

On 2 CPU cores decoding is a large part of an epoch at small input sizes: a 900 x 900 bottle PNG takes about 17 ms to
decode and 1 ms to resize to 128 px, against about 11 ms of SSL-AE's training step per image, and the loader's
workers take those cores from the training step (docs/results.md). What is kept is the uint8 image after resize,
padding and crop, exactly what the loader would compute, so a run gives the same figures with or without it.

The cache is an ordinary tensor, not one in shared memory: the loader's workers are forked after it is filled and
read it copy-on-write (a container's /dev/shm is often 64 MB); where workers are spawned instead, torch hands the
tensor over itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from patchae.data.images import load_rgb
from patchae.data.samples import Sample
from patchae.data.transforms import ImageTransform

logger = logging.getLogger(__name__)


def cache_bytes(count: int, transform: ImageTransform) -> int:
    """Memory that ``count`` images take in the cache."""
    height, width = transform.output_shape
    return count * 3 * height * width


class DecodedImages:
    """The images of ``samples`` placed by ``transform`` (uint8), with each file's original ``(H, W)``."""

    def __init__(self, samples: Sequence[Sample], transform: ImageTransform) -> None:
        started = time.perf_counter()
        self.pixels = torch.empty((len(samples), 3, *transform.output_shape), dtype=torch.uint8)
        self.sizes: list[tuple[int, int]] = []
        for index, sample in enumerate(samples):
            picture = load_rgb(sample.path)
            self.pixels[index] = transform.placed_pixels(picture)
            self.sizes.append((picture.height, picture.width))
        logger.info(
            "decoded %d training images once into memory (%.0f MB, %.1f s); data.cache_mb=0 reads them every epoch",
            len(samples),
            self.pixels.numel() / 2**20,
            time.perf_counter() - started,
        )

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """(uint8 pixels 3 x H x W, original (H, W)) of image ``index``."""
        return self.pixels[index], self.sizes[index]
