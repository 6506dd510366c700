"""The shared base of every model: memory-bank scoring, anomaly maps, metrics, thresholds and checkpoint contents."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from patchae.checkpoints import to_plain
from patchae.errors import PatchAEError, finite_number
from patchae.memory import MemoryBank, torch_nearest
from patchae.metrics import AnomalyMetrics
from patchae.scoring.maps import anomaly_maps, check_image_score, image_scores, reweighted_image_scores
from patchae.thresholds import Thresholds, calibrate, check_method, check_quantile, decision_accuracy
from patchae.tiling import Tiling

# Working memory of one exact torch search block (queries x bank distances), whatever the bank size.
SEARCH_BLOCK_MB = 256
CHECKPOINT_KEY = "patchae"


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


def update_metrics(
    metrics: AnomalyMetrics, scores: torch.Tensor, maps: torch.Tensor, batch: dict[str, Any]
) -> None:
    """Adds a batch to ``metrics``. Where inputs are padded (``data.resize_mode=keep_aspect``), the pixel
    metrics count only each image's ``content_box`` (top, left, bottom, right): padding is not a normal part."""
    scores, labels, maps = scores.cpu(), batch["label"].cpu(), maps.cpu()
    masks, has_mask = batch["mask"][:, 0].cpu(), batch["has_mask"].cpu()
    indices = batch.get("index")  # the dataset's, to gather the processes' shares under DDP
    boxes = batch.get("content_box")
    full = torch.tensor([0, 0, *maps.shape[-2:]])
    if boxes is None or bool((boxes.cpu() == full).all()):
        metrics.update(scores, labels, maps, masks, has_mask, indices)
        return
    for i, (top, left, bottom, right) in enumerate(boxes.tolist()):
        window = (slice(i, i + 1), slice(top, bottom), slice(left, right))
        one = slice(i, i + 1)
        index = None if indices is None else indices[one]
        metrics.update(scores[one], labels[one], maps[window], masks[window], has_mask[one], index)


def cpu_channels_last(images: torch.Tensor) -> torch.Tensor:
    """Channels-last images on CPU: oneDNN's convolutions (depthwise ones above all) then run about 1.4x faster
    with the same results (EfficientNet-Lite0, 224 px); other devices get the images as they are."""
    return images.contiguous(memory_format=torch.channels_last) if images.device.type == "cpu" else images


class AnomalyModule(L.LightningModule):
    """Scores images against a memory bank of normal patch embeddings.

    Subclasses provide ``embed(images) -> (B, D, h, w)``. The bank is filled by
    :class:`patchae.callbacks.MemoryBankCallback` and saved in the checkpoint, so a loaded model scores
    without its training data.

    Testing also calibrates the decision threshold (:mod:`patchae.thresholds`): the F1-optimal one on the
    test split and a label-free quantile of the scores of held-out normal images (the data module's
    ``holdout_dataloader``, when it has one). ``self.thresholds`` is saved in the checkpoint together with
    the model's class, so :func:`patchae.deploy.predict.load_model` restores the right model.

    Models that score by their own reconstruction error instead (``scores_by_bank = False``, see
    :mod:`patchae.models.reconstruction`) fit normal-image statistics at the end of fit instead of a bank.
    """

    scores_by_bank = True

    def __init__(
        self,
        num_neighbors: int = 1,
        blur_sigma: float = 4.0,
        search: str = "faiss",
        faiss_device: str = "auto",
        faiss_index: str = "flat",
        threshold_method: str = "f1",
        threshold_quantile: float = 0.99,
        threshold_value: float | None = None,
        image_score: str = "max",
        top_k: float = 0.01,
        reweight_neighbors: int = 9,
        val_bank_size: int = 20000,
        tiling: Any = None,
    ) -> None:
        super().__init__()
        self.tiling = Tiling.from_config(tiling)  # data.tiling: score tiles of the input, stitch their maps
        if search not in ("faiss", "torch"):
            raise PatchAEError(f"bank.search={search} is unknown; use faiss or torch")
        check_image_score(image_score, top_k)
        if reweight_neighbors < 1:
            raise PatchAEError(f"scoring.reweight_neighbors={reweight_neighbors} must be at least 1")
        self.image_score, self.top_k, self.reweight_neighbors = (
            image_score,
            float(top_k),
            int(reweight_neighbors),
        )
        self.val_bank_size = int(val_bank_size)
        self.register_buffer("memory_bank", torch.empty(0, 0))
        self._index: MemoryBank | None = None
        self.search_block_mb: float = SEARCH_BLOCK_MB
        self.test_metrics = AnomalyMetrics()
        self.test_results: dict[str, float] = {}
        self.threshold_method = check_method(threshold_method)
        self.threshold_quantile = check_quantile(threshold_quantile)
        # Checked now: a bad value found only after testing would cost the whole training run.
        self.threshold_value = (
            None if threshold_value is None else finite_number("threshold.value", threshold_value)
        )
        self.thresholds = Thresholds()
        self.normal_scores = torch.empty(0)
        self.val_metrics = AnomalyMetrics()
        self.val_results: dict[str, float] = {}  # of the weights the fit kept (see BestEpochCallback)
        self.selected_epoch: int | None = None
        self.latest_val_results: dict[str, float] = {}
        self._val_bank: torch.Tensor | None = None

    # -- the bank ---------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B*h*w, D) patch embeddings, the rows the bank is made of."""
        embedding = self.embed(self.tiles(images))
        return embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])

    def tiles(self, images: torch.Tensor) -> torch.Tensor:
        """What ``embed`` sees: the tiles of ``images`` with ``data.tiling``, else the images themselves."""
        return images if self.tiling is None else self.tiling.cut(images)

    def calibrate_embedding(self, vectors: torch.Tensor) -> torch.Tensor:
        """Fits whatever scale ``embed`` applies to these training vectors (embedded with the current one) and
        returns them as ``embed`` will now give them. Nothing to fit here."""
        return vectors

    def set_memory_bank(self, vectors: torch.Tensor) -> None:
        self.memory_bank = vectors.detach().to(self.device, torch.float32).contiguous()
        self._index = None
        self.normal_scores = torch.empty(0)  # scores against the old bank are stale

    @property
    def has_memory_bank(self) -> bool:
        return self.memory_bank.numel() > 0

    @property
    def is_fitted(self) -> bool:
        """Whether the model can score: its bank (or, without one, its normal statistics) exists."""
        return self.has_memory_bank

    def check_fitted(self) -> None:
        self.check_memory_bank()

    def nearest_distances(self, queries: torch.Tensor, bank: torch.Tensor | None = None) -> torch.Tensor:
        """(Q, k) Euclidean distances of each query to its k nearest vectors of the memory bank (or of ``bank``)."""
        k = self.hparams.num_neighbors
        if bank is not None or self.hparams.search == "torch":
            bank = self.memory_bank if bank is None else bank
            chunk, bank_chunk = search_chunks(self.search_block_mb, bank.shape[0])
            return torch_nearest(queries, bank, k=k, chunk_size=chunk, bank_chunk_size=bank_chunk)[0]
        if self._index is None:
            self._index = MemoryBank(
                self.memory_bank.cpu(), device=self.hparams.faiss_device, index=self.hparams.faiss_index
            )
        return self._index.search(queries, k=k)[0].to(queries.device)

    # -- scoring ----------------------------------------------------------------------------------
    def patch_distances(self, embedding: torch.Tensor, bank: torch.Tensor | None = None) -> torch.Tensor:
        """(B, h, w) anomaly score of every patch: distance to the nearest normal patch (mean over k)."""
        batch, dim, height, width = embedding.shape
        queries = embedding.permute(0, 2, 3, 1).reshape(-1, dim)
        return self.nearest_distances(queries, bank).mean(dim=1).reshape(batch, height, width)

    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """(B, h, w) patch scores of ``images`` against the memory bank."""
        self.check_memory_bank()
        return self.patch_distances(self.embed(images))

    def check_memory_bank(self) -> None:
        if not self.has_memory_bank:
            raise PatchAEError(
                "this model has no memory bank; train it first (the bank is built at the end of fit)"
            )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps (B, H, W) at input resolution and image scores (B,)."""
        self.check_fitted()
        return self.score(images)

    def score(
        self, images: torch.Tensor, bank: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps and image scores against the memory bank, or against ``bank`` (validation's)."""
        embedding = self.embed(cpu_channels_last(self.tiles(images)))
        patch = self.patch_distances(embedding, bank)
        maps = self.maps_from_patches(patch, images.shape[-2:])
        if self.image_score != "reweight":
            return maps, image_scores(maps, self.image_score, self.top_k)
        batch, dim = images.shape[0], embedding.shape[1]
        features = embedding.flatten(2).transpose(1, 2).reshape(batch, -1, dim)  # an image's tiles together
        scores = reweighted_image_scores(
            features,
            patch.reshape(batch, -1),
            self.memory_bank if bank is None else bank,
            self.reweight_neighbors,
        )
        return maps, scores.to(maps.device)

    def maps_from_patches(self, patch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B [* tiles], h, w) patch scores -> (B, H, W) maps: upsampled (tile by tile, then stitched), blurred."""
        if self.tiling is None:
            return anomaly_maps(patch, size, self.hparams.blur_sigma)
        tile_maps = anomaly_maps(patch, (self.tiling.tile, self.tiling.tile), 0.0)
        return anomaly_maps(self.tiling.stitch(tile_maps, *size), size, self.hparams.blur_sigma)

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        """Raw scores or maps -> [0, 1] with the decision threshold at 0.5 (nan before calibration)."""
        return self.thresholds.normalize(scores)

    def predict_step(
        self, batch: dict[str, Any] | torch.Tensor, batch_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        """Raw and normalised maps and scores, and the decision (score >= threshold) of a batch."""
        images = batch["image"] if isinstance(batch, dict) else batch
        maps, scores = self(images)
        return {
            "anomaly_maps": maps,
            "image_scores": scores,
            "normalized_maps": self.normalize(maps),
            "normalized_scores": self.normalize(scores),
            "is_anomalous": self.thresholds.is_anomalous(scores),
        }

    # -- label-free validation --------------------------------------------------------------------
    # The data module's validation set: held-out normal images, clean and with synthetic defects (exact masks).
    # They are scored against a bank of up to ``val_bank_size`` random patch vectors of the training images:
    # a cheap stand-in for the coreset, rebuilt with the current weights at every validation.
    def on_validation_epoch_start(self) -> None:
        self.val_metrics.reset()
        loader = self.trainer.datamodule.val_bank_dataloader()
        vectors = torch.cat([self.embed_patches(batch["image"].to(self.device)) for batch in loader])
        vectors = self.calibrate_embedding(vectors.float())
        if len(vectors) > self.val_bank_size:
            keep = torch.randperm(len(vectors), generator=torch.Generator().manual_seed(0))[
                : self.val_bank_size
            ]
            vectors = vectors[keep.to(vectors.device)]
        self._val_bank = vectors.contiguous()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        maps, scores = self.score(batch["image"], bank=self._val_bank)
        update_metrics(self.val_metrics, scores, maps, batch)

    def on_validation_epoch_end(self) -> None:
        self.val_metrics.gather()  # under DDP: every process's share, so all processes keep the same epoch
        results = self.val_metrics.compute()
        self._val_bank = None
        self.latest_val_results = results
        # Equal on every process; sync_dist (a mean of equal values) keeps Lightning from warning under DDP.
        val = {f"val/{name}": results[name] for name in ("image_auroc", "pixel_auroc", "aupro")}
        self.log_dict(val, sync_dist=True)

    def validation_summary(self) -> dict[str, Any]:
        """``val_*`` metrics of the kept weights and the epoch they are from, for results files."""
        if self.selected_epoch is None:
            return {}
        return {
            "selected_epoch": self.selected_epoch,
            **{f"val_{name}": value for name, value in self.val_results.items()},
        }

    # -- testing ----------------------------------------------------------------------------------
    def on_fit_end(self) -> None:
        # Lightning runs the callbacks' on_fit_end first, so the memory bank exists by now. Scoring the
        # held-out normals here keeps that time out of the test throughput.
        if self.is_fitted:
            was_training = self.training
            self.eval()
            with torch.no_grad():
                self.normal_scores = self.score_holdout()
            self.train(was_training)

    def on_test_epoch_start(self) -> None:
        self.test_metrics.reset()
        if self.normal_scores.numel() == 0:  # tested without fit in this process (or fit had no bank)
            self.normal_scores = self.score_holdout()

    def score_holdout(self) -> torch.Tensor:
        """Image scores of the data module's held-out normal images (never in the bank); empty if none."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        loader = datamodule.holdout_dataloader() if hasattr(datamodule, "holdout_dataloader") else None
        if loader is None:
            return torch.empty(0)
        scores = [self(batch["image"].to(self.device))[1].float().cpu() for batch in loader]
        return torch.cat(scores) if scores else torch.empty(0)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        maps, scores = self(batch["image"])
        update_metrics(self.test_metrics, scores, maps, batch)
        return {"anomaly_maps": maps.cpu(), "image_scores": scores.cpu()}

    def on_test_epoch_end(self) -> None:
        self.test_metrics.gather()  # under DDP: the whole split on every process, each image once
        self.test_results = self.test_metrics.compute()
        scores, labels = self.test_metrics.scores_and_labels()
        self.thresholds = calibrate(
            scores,
            labels,
            self.normal_scores,
            self.threshold_method,
            self.threshold_quantile,
            self.threshold_value,
        )
        self.test_results["image_threshold"] = self.thresholds.value
        self.test_results["image_accuracy"] = decision_accuracy(scores, labels, self.thresholds.value)
        self.log_dict({f"test/{name}": value for name, value in self.test_results.items()}, sync_dist=True)

    # -- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain values only, so that the file loads weights-only (patchae.checkpoints).
        checkpoint[CHECKPOINT_KEY] = to_plain(
            {
                "model_class": f"{type(self).__module__}.{type(self).__qualname__}",
                "thresholds": self.thresholds.as_dict(),
            }
        )
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = to_plain(dict(checkpoint["hyper_parameters"]))
            checkpoint.pop("hparams_type", None)  # a class, saved when hparams are an OmegaConf container

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The bank's size is only known once trained: shape the buffer before the state dict is copied in.
        bank = checkpoint["state_dict"].get("memory_bank")
        if bank is not None:
            self.memory_bank = torch.empty_like(bank)
            self._index = None
        self.thresholds = Thresholds.from_dict(checkpoint.get(CHECKPOINT_KEY, {}).get("thresholds"))
        self.normal_scores = torch.tensor(self.thresholds.normal_scores, dtype=torch.float32)
