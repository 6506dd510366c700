"""A model as a plain torch module: its network plus its scorer, with one ``forward`` from images to maps and
image scores. Training (validation, testing), predict, the benchmarks and export all call this forward; the
Lightning wrappers (:mod:`patchae.models.base`) only train, log, validate and calibrate around it.

- :class:`BankModel` (Patch AE, PatchCore): ``embed(images)`` gives one vector per patch, scored by a
  :class:`~patchae.scoring.BankScorer` against the memory bank; with ``data.tiling`` the images are cut into
  tiles before ``embed`` and the tiles' maps stitched by the scorer.
- :class:`ReconstructionModel` (SSL-AE, DAAD): ``error_terms(images)`` gives per-pixel error terms, scored by a
  :class:`~patchae.scoring.StatisticsScorer` fitted on normal images.

``fit(batches)`` fits the scorer on normal images (a bank from their embeddings, or their error statistics);
``scorer=`` in ``fit`` and ``forward`` uses another scorer of the same kind (validation's, fitted with the
current weights) instead of the model's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from patchae.scoring import BankScorer, StatisticsScorer
from patchae.scoring.maps import full_precision

# Picks the rows of the training vectors to keep as the bank (a coreset), given all of them.
Subsample = Callable[[Tensor], Tensor]


# On a CPU, batches are scored this many images at a time. A whole batch of 32 at 224 px makes activations of
# ~50 MB, which glibc maps fresh from the kernel and unmaps again for every batch (above its 32 MB mmap limit,
# so mallopt cannot stop it): on the 2-core AMD EPYC the system time of those page faults exceeded the compute,
# and batch 32 ran at 0.6x the speed of batch 1. Four images at a time keep every activation small, reused and
# in cache: PatchCore (EfficientNet-Lite0, 224 px) 75 -> 160 images/s at batch 32, no page faults (2 and 8:
# 142 and 140; docs/results.md).
CPU_MICRO_BATCH = 4


def in_micro_batches(
    forward: Callable[[Tensor], tuple[Tensor, Tensor]], images: Tensor
) -> tuple[Tensor, Tensor] | None:
    """``forward`` over slices of :data:`CPU_MICRO_BATCH` images, concatenated; None where the batch should go
    through whole (not on a CPU, small enough, or being traced for export, whose graph must stay one batch)."""
    if images.device.type != "cpu" or images.shape[0] <= CPU_MICRO_BATCH or torch.jit.is_tracing():
        return None
    if torch.onnx.is_in_onnx_export():
        return None
    parts = [forward(part) for part in images.split(CPU_MICRO_BATCH)]
    return torch.cat([maps for maps, _ in parts]), torch.cat([scores for _, scores in parts])


def cpu_channels_last(images: Tensor) -> Tensor:
    """Channels-last images on CPU: oneDNN's convolutions (depthwise ones above all) then run about 1.4x faster
    with the same results (EfficientNet-Lite0, 224 px); other devices get the images as they are."""
    return images.contiguous(memory_format=torch.channels_last) if images.device.type == "cpu" else images


class BankModel(nn.Module):
    """A network whose patch embedding is scored against a memory bank. Subclasses implement ``embed``."""

    def __init__(self, scorer: BankScorer) -> None:
        super().__init__()
        self.scorer = scorer

    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images -> (B, D, h, w) patch embedding."""
        raise NotImplementedError

    def tiles(self, images: Tensor) -> Tensor:
        """What ``embed`` sees: the tiles of ``images`` with ``data.tiling``, else the images themselves."""
        tiling = self.scorer.tiling
        return images if tiling is None else tiling.cut(images)

    @torch.no_grad()
    def embed_patches(self, images: Tensor) -> Tensor:
        """(B*h*w, D) patch embeddings, the rows a bank is made of."""
        embedding = self.embed(self.tiles(images))
        return embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])

    def calibrate_embedding(self, vectors: Tensor) -> Tensor:
        """Fits whatever scale ``embed`` applies to these training vectors (embedded with the current one) and
        returns them as ``embed`` will now give them. Nothing to fit here."""
        return vectors

    @torch.no_grad()
    def fit(
        self, batches: Iterable[Tensor], subsample: Subsample | None = None, scorer: BankScorer | None = None
    ) -> None:
        """Bank of the patch vectors of the normal image batches (the rows ``subsample`` picks, else all)."""
        vectors = torch.cat([self.embed_patches(images).float().cpu() for images in batches])
        vectors = self.calibrate_embedding(vectors)
        if subsample is not None:
            vectors = vectors[subsample(vectors).cpu()]
        (scorer or self.scorer).fit(vectors)

    def forward(self, images: Tensor, scorer: BankScorer | None = None) -> tuple[Tensor, Tensor]:
        """Anomaly maps (B, H, W) at input resolution and image scores (B,)."""
        scorer = scorer or self.scorer
        scorer.check_fitted()
        if (parts := in_micro_batches(lambda part: self.forward(part, scorer), images)) is not None:
            return parts
        embedding = self.embed(cpu_channels_last(self.tiles(images)))
        return scorer(embedding, images.shape[-2:])


class ReconstructionModel(nn.Module):
    """A network scored by its own per-pixel error terms. Subclasses implement ``error_terms``."""

    def __init__(self, scorer: StatisticsScorer) -> None:
        super().__init__()
        self.scorer = scorer

    def error_terms(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images -> (B, T, H, W) error terms (``scorer.term_names``)."""
        raise NotImplementedError

    def full_precision_terms(self, images: Tensor) -> Tensor:
        """``error_terms`` with the network in float32 even where training runs mixed precision: the error is a
        small difference of two images, which a bf16 reconstruction (8 bits of mantissa) would round."""
        with full_precision(images):
            return self.error_terms(images.float())

    @torch.no_grad()
    def fit(
        self,
        batches: Iterable[Tensor],
        subsample: Subsample | None = None,
        scorer: StatisticsScorer | None = None,
    ) -> None:
        """Error statistics of the normal image batches (all their pixels; ``subsample`` is for banks)."""
        (scorer or self.scorer).fit(self.full_precision_terms(images) for images in batches)

    def forward(self, images: Tensor, scorer: StatisticsScorer | None = None) -> tuple[Tensor, Tensor]:
        """Anomaly maps (B, H, W) at input resolution and image scores (B,)."""
        scorer = scorer or self.scorer
        scorer.check_fitted()
        if (parts := in_micro_batches(lambda part: self.forward(part, scorer), images)) is not None:
            return parts
        return scorer(self.full_precision_terms(images))
