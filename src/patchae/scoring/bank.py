"""Scoring by a memory bank: each patch vector's distance to its nearest normal vectors, upsampled into a map."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from patchae.errors import PatchAEError
from patchae.memory import MemoryBank, torch_nearest
from patchae.scoring.maps import anomaly_maps, full_precision, image_scores, reweighted_image_scores
from patchae.settings import BankSettings, ScoringSettings
from patchae.tiling import Tiling

# Working memory of one exact torch search block (queries x bank distances), whatever the bank size.
SEARCH_BLOCK_MB = 256


def search_chunks(budget_mb: float, bank_size: int) -> tuple[int, int]:
    """(query chunk, bank chunk) sizes so that one distance block of :func:`torch_nearest` fits ``budget_mb``.

    A block peaks at about two float32 (queries x bank) matrices: the distances and top-k's workspace
    (measured with ``python -m patchae.benchmarks.inference mode=bank``).
    """
    budget = max(int(budget_mb * 2**20) // 8, 1 << 16)  # block elements
    bank_chunk = max(1, min(bank_size, 16384))
    query_chunk = max(64, budget // bank_chunk)
    if query_chunk * bank_chunk > budget:
        bank_chunk = max(1, budget // query_chunk)
    return query_chunk, bank_chunk


class BankScorer(nn.Module):
    """Maps and image scores of patch embeddings against a bank of normal patch vectors (Patch AE, PatchCore).

    ``fit(vectors)`` keeps the bank (the memory-bank callback hands it the coreset); ``forward(embedding,
    size)`` takes the (B [* tiles], D, h, w) embedding of a batch of (H, W) = ``size`` inputs and returns maps
    (B, H, W) and image scores (B,). The search is faiss (``bank.search=faiss``) or the exact blocked torch
    search, which is what a traced or exported model runs (:func:`patchae.memory.torch_nearest`).
    """

    def __init__(
        self,
        bank: BankSettings | None = None,
        scoring: ScoringSettings | None = None,
        tiling: Tiling | None = None,
    ) -> None:
        super().__init__()
        self.settings = bank or BankSettings()
        self.scoring = scoring or ScoringSettings()
        self.tiling = tiling
        self.register_buffer("bank", torch.empty(0, 0))
        # Squared norms of the bank rows, for the torch search; derived from the bank, so not saved.
        self.register_buffer("bank_sq", torch.empty(0), persistent=False)
        self._index: MemoryBank | None = None
        self.search_block_mb: float = SEARCH_BLOCK_MB
        self.block_rows: int | None = None  # bank rows per torch search block; None: from search_block_mb

    def twin(self) -> BankScorer:
        """An unfitted scorer with the same settings (validation's bank)."""
        return BankScorer(self.settings, self.scoring, self.tiling).to(self.bank.device)

    def set_search(self, search: str) -> None:
        """Search the bank with ``search`` (faiss | torch) from now on."""
        self.settings = dataclasses.replace(self.settings, search=search)
        self._index = None

    # -- the bank --------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, vectors: Tensor) -> None:
        """Keep ``vectors`` (M, D) as the bank."""
        self.bank = vectors.detach().to(self.bank.device, torch.float32).contiguous()
        self._bank_changed()

    def _bank_changed(self) -> None:
        self.bank_sq = (self.bank * self.bank).sum(dim=1) if self.bank.numel() else torch.empty(0)
        self._index = None

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # The bank's size is only known once trained: shape the buffer before the saved one is copied in.
        saved = state_dict.get(prefix + "bank")
        if saved is not None:
            self.bank = torch.empty_like(saved, device=self.bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._bank_changed()

    @property
    def is_fitted(self) -> bool:
        return self.bank.numel() > 0

    @property
    def bank_size(self) -> int:
        return int(self.bank.shape[0])

    def check_fitted(self) -> None:
        if not self.is_fitted:
            raise PatchAEError(
                "this model has no memory bank; train it first (the bank is built at the end of fit)"
            )

    # -- scoring ---------------------------------------------------------------------------------------
    def nearest(self, queries: Tensor) -> Tensor:
        """(Q, k) Euclidean distances of each query (Q, D) to its k nearest bank vectors."""
        k = int(self.settings.num_neighbors)
        if self.settings.search == "torch":
            if self.block_rows is not None:
                chunk, bank_chunk = None, self.block_rows
            else:
                chunk, bank_chunk = search_chunks(self.search_block_mb, self.bank_size)
            return torch_nearest(queries, self.bank, k, chunk, bank_chunk, self.bank_sq)[0]
        if self._index is None:
            self._index = MemoryBank(
                self.bank.cpu(), device=self.settings.faiss_device, index=self.settings.faiss_index
            )
        return self._index.search(queries, k=k)[0].to(queries.device)

    def patch_scores(self, embedding: Tensor) -> Tensor:
        """(B, h, w) anomaly score of every patch: distance to the nearest normal patch (mean over k)."""
        batch, dim, height, width = embedding.shape
        queries = embedding.permute(0, 2, 3, 1).reshape(-1, dim)
        return self.nearest(queries).mean(dim=1).reshape(batch, height, width)

    def maps(self, patch: Tensor, size: tuple[int, int]) -> Tensor:
        """(B [* tiles], h, w) patch scores -> (B, H, W) maps: upsampled (tile by tile, then stitched), blurred."""
        sigma = self.scoring.blur_sigma
        if self.tiling is None:
            return anomaly_maps(patch, size, sigma)
        tile_maps = anomaly_maps(patch, (self.tiling.tile, self.tiling.tile), 0.0)
        return anomaly_maps(self.tiling.stitch(tile_maps, *size), size, sigma)

    def forward(self, embedding: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Maps (B, H, W) and image scores (B,) of the embedding of a batch of ``size`` inputs, in float32."""
        with full_precision(embedding):
            return self.score(embedding.float(), size)

    def score(self, embedding: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """:meth:`forward` in the precision of ``embedding``."""
        patch = self.patch_scores(embedding)
        maps = self.maps(patch, (int(size[0]), int(size[1])))
        scoring = self.scoring
        if scoring.image_score != "reweight":
            return maps, image_scores(maps, scoring.image_score, scoring.top_k)
        batch, dim = maps.shape[0], embedding.shape[1]
        features = embedding.flatten(2).transpose(1, 2).reshape(batch, -1, dim)  # an image's tiles together
        scores = reweighted_image_scores(
            features, patch.reshape(batch, -1), self.bank, scoring.reweight_neighbors
        )
        return maps, scores.to(maps.device)
