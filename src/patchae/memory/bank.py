"""Memory bank of normal patch features and nearest-neighbour search (faiss, or pure torch for export)."""

from __future__ import annotations

import logging
from typing import Any

import faiss
import numpy as np
import torch
from torch import Tensor

from patchae.errors import PatchAEError

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "ivfpq")
# faiss searches small query sets without BLAS (below this threshold: 128,000 in faiss 1.15); one 224 px image
# (784 queries of 152-d) fell below it and searched 7x slower per query than a batch of 32 images.
if hasattr(faiss.cvar, "distance_compute_blas_threshold"):
    faiss.cvar.distance_compute_blas_threshold = 20

# faiss k-means asks for >= 39 training points per centroid; below that the clusters are poor.
_MIN_POINTS_PER_CENTROID = 39
_PQ_CENTROIDS = 256  # 8-bit product-quantizer codes
_GPU_TEMP_MEMORY = 512 * 1024 * 1024
# Floats gathered at once when recomputing exact distances for the returned neighbours.
_REFINE_BUDGET = 1 << 24

_gpu_resources: Any = None


def _shared_gpu_resources() -> Any:
    """One faiss GPU resource object per process, with a bounded scratch pool (faiss defaults to ~18% of VRAM)."""
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
        _gpu_resources.setTempMemory(_GPU_TEMP_MEMORY)
    return _gpu_resources


def _faiss_has_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _resolve_device(device: str) -> int | None:
    """faiss GPU id to use, or None for CPU."""
    if device == "cpu":
        return None
    if device == "auto":
        return 0 if _faiss_has_gpu() else None
    if device == "cuda" or device.startswith("cuda:"):
        gpu_id = int(device.partition(":")[2] or 0)
        if not _faiss_has_gpu() or gpu_id >= faiss.get_num_gpus():
            raise PatchAEError(
                f"bank.device={device} but faiss sees {faiss.get_num_gpus()} GPU(s); "
                "install faiss-gpu with a visible GPU or set bank.device=auto or cpu"
            )
        return gpu_id
    raise PatchAEError(f"bank.device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")


def torch_nearest(
    queries: Tensor,
    bank_vectors: Tensor,
    k: int = 1,
    chunk_size: int | None = 4096,
    bank_chunk_size: int | None = 16384,
    bank_sq: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact k-nearest neighbours by brute force in torch, in bounded memory: the one torch search (the
    scorer's ``bank.search=torch``, validation's bank, PatchCore's re-weighting, and the exported graphs).

    Candidates are ranked by ||b||^2 - 2 q.b (||q||^2 is the same for every bank row) on blocks of
    ``bank_chunk_size`` bank rows, keeping a running top-k; then the distances of the chosen neighbours are
    recomputed directly, so they do not suffer the identity's cancellation error. ``chunk_size`` queries are
    searched at a time (None: all); while tracing (TorchScript, ONNX) all are, so the batch axis stays dynamic,
    and the loop over the fixed bank's blocks unrolls into a static graph. ``bank_sq``: the bank's squared
    norms, when the caller keeps them.

    Returns:
        (distances (Q,k) float32 Euclidean, ascending; indices (Q,k) int64), on ``queries.device``.
    """
    if queries.dim() != 2 or bank_vectors.dim() != 2 or queries.shape[1] != bank_vectors.shape[1]:
        raise ValueError("torch_nearest expects queries (Q, D) and bank_vectors (M, D) with the same D")
    num_bank = bank_vectors.shape[0]
    if k < 1 or k > num_bank:
        raise ValueError("torch_nearest: k must be between 1 and the bank size")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError("torch_nearest: chunk_size must be positive")
    bank = bank_vectors.to(device=queries.device, dtype=torch.float32)
    queries = queries.to(torch.float32)
    bank_step = num_bank if bank_chunk_size is None or bank_chunk_size < 1 else int(bank_chunk_size)
    # While tracing (TorchScript or ONNX export) all queries at once: the batch axis stays dynamic.
    if torch.jit.is_tracing() or chunk_size is None or queries.shape[0] <= chunk_size:
        return _nearest(queries, bank, bank_sq, k, bank_step)
    parts = [_nearest(q, bank, bank_sq, k, bank_step) for q in queries.split(chunk_size)]
    return torch.cat([d for d, _ in parts]), torch.cat([i for _, i in parts])


def _nearest(
    queries: Tensor, bank: Tensor, bank_sq: Tensor | None, k: int, step: int
) -> tuple[Tensor, Tensor]:
    """:func:`torch_nearest` of one set of queries (working memory: queries x ``step`` floats)."""
    scaled = -2.0 * queries  # the -2 on the queries: one product and one addition per block
    num_bank = bank.shape[0]
    best_d, best_i = torch.empty(0), torch.empty(0)
    for start in range(0, num_bank, step):
        stop = min(start + step, num_bank)
        block = bank[start:stop]
        # |b|^2 per block unless given: (bank * bank) at once would be a bank-sized temporary.
        block_sq = bank_sq[start:stop] if bank_sq is not None else (block * block).sum(dim=1)
        partial = torch.matmul(scaled, block.t()) + block_sq
        block_d, block_i = torch.topk(partial, min(k, stop - start), dim=-1, largest=False)
        block_i = block_i + start
        if start == 0:
            best_d, best_i = block_d, block_i
        elif k == 1:  # ONNX Runtime runs a comparison faster than a concatenation and a top-k
            better = block_d < best_d
            best_d, best_i = torch.where(better, block_d, best_d), torch.where(better, block_i, best_i)
        else:
            merged = torch.cat([best_d, block_d], dim=-1)
            best_d, position = torch.topk(merged, min(k, merged.shape[-1]), dim=-1, largest=False)
            best_i = torch.gather(torch.cat([best_i, block_i], dim=-1), -1, position)
    difference = bank[best_i] - queries.unsqueeze(1)  # (Q, k, D): exact distances of the chosen ones
    exact = (difference * difference).sum(dim=-1)
    if k > 1:
        exact, order = torch.sort(exact, dim=1)
        best_i = torch.gather(best_i, 1, order)
    return exact.sqrt(), best_i


def default_pq_subvectors(dim: int) -> int:
    """The divisor of ``dim`` nearest ``dim / 4``: product-quantizer sub-vectors of about 4 dimensions."""
    return min((m for m in range(1, dim + 1) if dim % m == 0), key=lambda m: abs(m - dim / 4))


class MemoryBank:
    """Normal patch features (``vectors``, (M, D) float32 on CPU) plus a lazily built faiss index.

    Only ``vectors`` (and the index settings) need saving: the faiss index is rebuilt from them on load,
    see :meth:`state_dict` / :meth:`from_state_dict`.

    Args:
        vectors: (M, D) features; copied to CPU float32.
        device: "auto" (faiss GPU when available), "cpu", or "cuda[:N]".
        index: "flat" (exact), "ivf" (inverted lists, exact vectors) or "ivfpq" (inverted lists + product
            quantization; for very large banks). ivf/ivfpq fall back to flat when the bank is too small
            to train them.
        nlist: number of inverted lists (ivf, ivfpq).
        m: product-quantizer sub-vectors (ivfpq); must divide D. None: the divisor of D nearest D / 4, i.e.
            about 4 dimensions per one-byte code (16x smaller than float32), whatever the backbone's D.
        nprobe: lists visited per query (ivf, ivfpq); higher = more accurate, slower.
        rerank: ivfpq fetches ``k * rerank`` candidates by compressed distance and keeps the ``k`` nearest
            by exact distance (1 = no re-ranking).
    """

    def __init__(
        self,
        vectors: Tensor,
        device: str = "auto",
        index: str = "flat",
        nlist: int = 1024,
        m: int | None = None,
        nprobe: int = 8,
        rerank: int = 8,
    ) -> None:
        if vectors.dim() != 2 or vectors.shape[0] == 0:
            raise PatchAEError(
                f"memory bank needs a non-empty (M, D) feature matrix, got shape {tuple(vectors.shape)}; "
                "check that the training set has images"
            )
        if index not in INDEX_KINDS:
            raise PatchAEError(f"bank.index must be one of {', '.join(INDEX_KINDS)}, got {index!r}")
        self.vectors = vectors.detach().to("cpu", torch.float32).contiguous()
        m = default_pq_subvectors(self.dim) if m is None else m
        for name, value in (("nlist", nlist), ("m", m), ("nprobe", nprobe), ("rerank", rerank)):
            if int(value) < 1:
                raise PatchAEError(f"bank.{name} must be a positive integer, got {value}")
        self.device = device
        self.nlist, self.m, self.nprobe, self.rerank = int(nlist), int(m), int(nprobe), int(rerank)
        self.requested_index = index
        self.index_kind = self._trainable_kind(index)
        self._gpu_id = _resolve_device(device)
        self._index: Any = None

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def on_gpu(self) -> bool:
        """Whether searches run on a faiss GPU index (valid after the index is built)."""
        return (
            self._index is not None and hasattr(faiss, "GpuIndex") and isinstance(self._index, faiss.GpuIndex)
        )

    def _trainable_kind(self, index: str) -> str:
        if index == "flat":
            return index
        if index == "ivfpq" and self.dim % self.m != 0:
            raise PatchAEError(
                f"bank.m={self.m} must divide the feature dimension {self.dim} for index=ivfpq"
            )
        needed = _MIN_POINTS_PER_CENTROID * self.nlist
        if index == "ivfpq":
            needed = max(needed, _MIN_POINTS_PER_CENTROID * _PQ_CENTROIDS)
        if len(self) < needed:
            log.warning(
                "memory bank has %d vectors, fewer than the %d needed to train a %s index with nlist=%d; "
                "using an exact flat index instead (lower bank.nlist to keep %s)",
                len(self),
                needed,
                index,
                self.nlist,
                index,
            )
            return "flat"
        return index

    def build(self) -> MemoryBank:
        """Build (train + fill) the faiss index now instead of on the first search."""
        if self._index is not None:
            return self
        data = self.vectors.numpy()
        if self.index_kind == "flat":
            cpu_index = faiss.IndexFlatL2(self.dim)
        else:
            quantizer = faiss.IndexFlatL2(self.dim)
            if self.index_kind == "ivf":
                cpu_index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist)
            else:
                cpu_index = faiss.IndexIVFPQ(quantizer, self.dim, self.nlist, self.m, 8)
            cpu_index.train(data)
            cpu_index.nprobe = self.nprobe
        cpu_index.add(data)
        self._index = self._to_gpu(cpu_index) if self._gpu_id is not None else cpu_index
        return self

    def _to_gpu(self, cpu_index: Any) -> Any:
        try:
            options = faiss.GpuClonerOptions()
            options.useFloat16 = self.index_kind == "ivfpq"  # float16 lookup tables allow more PQ sizes
            gpu_index = faiss.index_cpu_to_gpu(_shared_gpu_resources(), self._gpu_id, cpu_index, options)
            if self.index_kind != "flat":
                faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe", self.nprobe)
            return gpu_index
        except (RuntimeError, AttributeError) as error:
            log.warning(
                "could not move the faiss %s index to GPU (%s); searching on CPU", self.index_kind, error
            )
            return cpu_index

    def search(self, queries: Tensor, k: int = 1, chunk_size: int = 65536) -> tuple[Tensor, Tensor]:
        """k nearest bank vectors of each query.

        Queries may live on any device. The returned distances are exact Euclidean distances to the
        returned neighbours (recomputed from ``vectors``, so ivfpq's quantization error does not leak into
        scores); the neighbours themselves are approximate for ivf/ivfpq (ivfpq re-ranks ``k * rerank``
        candidates exactly).

        Returns:
            (distances (Q,k) float32 ascending, indices (Q,k) int64), on CPU.
        """
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got shape {tuple(queries.shape)}")
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be between 1 and the bank size {len(self)}, got {k}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.build()
        candidates = k
        if self.index_kind == "ivfpq":  # faiss GPU search supports at most 2048 results per query
            candidates = min(len(self), max(k, min(k * self.rerank, 2048)))
        num_queries = queries.shape[0]
        distances = torch.empty((num_queries, k), dtype=torch.float32)
        indices = torch.empty((num_queries, k), dtype=torch.long)
        with torch.no_grad():
            for start in range(0, num_queries, chunk_size):
                chunk = queries[start : start + chunk_size].detach().to("cpu", torch.float32).contiguous()
                _, found = self._index.search(chunk.numpy(), candidates)
                found_t = torch.from_numpy(np.ascontiguousarray(found, dtype=np.int64))
                chunk_d, chunk_i = self._exact_distances(chunk, found_t, k)
                distances[start : start + chunk_size] = chunk_d
                indices[start : start + chunk_size] = chunk_i
        return distances, indices

    def _exact_distances(self, queries: Tensor, found: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Exact distances to the candidates faiss found, re-ranked, keeping the best ``k``.

        Missing candidates (-1, possible with ivf/ivfpq when the probed lists hold too few vectors) are
        ignored; rows left with fewer than ``k`` candidates are redone by brute force.
        """
        valid = found >= 0
        short = valid.sum(dim=1) < k
        if bool(short.any()):
            redo = torch.full((int(short.sum()), found.shape[1]), -1, dtype=torch.long)
            redo[:, :k] = torch_nearest(queries[short], self.vectors, k=k)[1]
            found[short] = redo
            valid[short] = redo >= 0
        width = found.shape[1]
        rows = max(1, _REFINE_BUDGET // (width * self.dim))
        distances = torch.empty(found.shape, dtype=torch.float32)
        for start in range(0, found.shape[0], rows):
            neighbours = self.vectors[found[start : start + rows].clamp(min=0)]
            difference = neighbours - queries[start : start + rows].unsqueeze(1)
            distances[start : start + rows] = (difference * difference).sum(dim=-1).sqrt_()
        distances[~valid] = float("inf")
        if width > 1:
            distances, order = torch.sort(distances, dim=1)
            found = torch.gather(found, 1, order)
        return distances[:, :k].contiguous(), found[:, :k].contiguous()

    def state_dict(self) -> dict[str, Any]:
        """What to save: the vectors and index settings (the faiss index itself is rebuilt on load)."""
        return {
            "vectors": self.vectors,
            "index": self.requested_index,
            "nlist": self.nlist,
            "m": self.m,
            "nprobe": self.nprobe,
            "rerank": self.rerank,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: str = "auto") -> MemoryBank:
        """Rebuild a bank from :meth:`state_dict` output (the index is built lazily on first search)."""
        return cls(
            state["vectors"],
            device=device,
            index=state.get("index", "flat"),
            nlist=state.get("nlist", 1024),
            m=state.get("m"),
            nprobe=state.get("nprobe", 8),
            rerank=state.get("rerank", 8),
        )
