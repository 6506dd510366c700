"""Lightning callbacks: build the memory bank after training, write results and overlays after testing."""

from __future__ import annotations

import csv
import json
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from patchae.errors import PatchAEError
from patchae.memory import greedy_coreset
from patchae.visualize import denormalize, save_overlay

log = logging.getLogger(__name__)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        transient=False,
    )


class MemoryBankCallback(L.Callback):
    """At the end of fit: embed the un-augmented training images, keep a greedy k-center coreset of the
    patch vectors, and hand it to the module as its memory bank."""

    def __init__(self, coreset_ratio: float = 0.1, projection_dim: int | None = 128, seed: int = 0) -> None:
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.seed = seed

    @torch.no_grad()
    def embed_training_images(self, trainer: L.Trainer, pl_module: L.LightningModule) -> torch.Tensor:
        loader = trainer.datamodule.bank_dataloader()
        chunks = []
        with progress_bar() as progress:
            task = progress.add_task("memory bank: embedding training images", total=len(loader))
            for batch in loader:
                chunks.append(pl_module.embed_patches(batch["image"].to(pl_module.device)).float().cpu())
                progress.advance(task)
        return torch.cat(chunks)

    def build(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        was_training = pl_module.training
        pl_module.eval()
        vectors = pl_module.calibrate_embedding(self.embed_training_images(trainer, pl_module))
        with progress_bar() as progress:
            task = progress.add_task(f"memory bank: coreset of {len(vectors)} patches", total=None)

            def report(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            indices = greedy_coreset(
                vectors.to(pl_module.device),
                ratio=self.coreset_ratio,
                projection_dim=self.projection_dim,
                seed=self.seed,
                progress=report,
            )
        pl_module.set_memory_bank(vectors[indices.cpu()])
        log.info("memory bank: %d of %d patch vectors (dim %d)", len(indices), len(vectors), vectors.shape[1])
        pl_module.train(was_training)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.build(trainer, pl_module)


class BestEpochCallback(L.Callback):
    """Keeps the weights of the best label-free validation (``monitor``, higher is better) and restores them
    when fit ends, before the memory bank is built from them. Epoch 0 is the model before any training
    (``trainer.validate`` before fit, see :func:`patchae.train.fit_and_test`), so a category where training
    hurts keeps the untrained encoder. With ``patience``, training stops after that many validations
    without improvement. The copy lives in memory (CPU): nothing is written to disk. With ``select=False``
    the last weights stay (a fixed training length) and their validation is what gets reported.

    A later epoch replaces the best only when it beats it by more than ``min_delta``: differences smaller than
    what a few flipped validation images make are noise, and on noise the less trained weights are the safer
    bet (synthetic-defect validation can favour training that real defects do not, see the README)."""

    def __init__(
        self,
        monitor: str = "val/image_auroc",
        patience: int | None = None,
        select: bool = True,
        min_delta: float = 0.0,
    ) -> None:
        self.monitor = monitor
        self.patience = patience
        self.select = select
        self.min_delta = float(min_delta)
        self.last_epoch: int | None = None
        self.last_results: dict[str, float] = {}
        self.best_score = -math.inf
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_results: dict[str, float] = {}
        self.validations_since_best = 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise PatchAEError(
                f"validation.monitor={self.monitor} is not a logged metric; use one of "
                f"{', '.join(sorted(k for k in trainer.callback_metrics if k.startswith('val/')))}"
            )
        score = float(value)
        fitting = trainer.state.fn == TrainerFn.FITTING
        epoch = trainer.current_epoch + 1 if fitting else 0  # during fit it runs after the epoch
        self.last_epoch, self.last_results = epoch, dict(getattr(pl_module, "latest_val_results", {}))
        log.info("validation after %d epoch(s): %s = %.4f", epoch, self.monitor, score)
        if not self.select:
            return
        if self.best_state is None or score > self.best_score + self.min_delta:
            self.best_score, self.best_epoch = score, epoch
            self.best_state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
            self.best_results = self.last_results
            self.validations_since_best = 0
        else:
            self.validations_since_best += 1
        if fitting and self.patience is not None and self.validations_since_best >= self.patience:
            trainer.should_stop = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.select and self.last_epoch is not None:
            pl_module.selected_epoch, pl_module.val_results = self.last_epoch, self.last_results
            return
        if self.best_state is None:
            return
        pl_module.load_state_dict(self.best_state)
        pl_module.selected_epoch = self.best_epoch
        pl_module.val_results = self.best_results
        log.info(
            "kept the weights after %d epoch(s): %s = %.4f", self.best_epoch, self.monitor, self.best_score
        )


def peak_memory_mb() -> float:
    """Peak GPU memory when on a GPU, else the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class ResultsWriter(L.Callback):
    """Writes ``results.json``/``results.csv`` (metrics, timings, run metadata), ``predictions.csv``
    (one row per test image) and anomaly-map overlays of a few images per defect type."""

    def __init__(
        self, output_dir: str, metadata: dict[str, Any] | None = None, overlays_per_type: int = 2
    ) -> None:
        self.output_dir = Path(output_dir)
        self.metadata = dict(metadata or {})
        self.overlays_per_type = overlays_per_type
        self.timings: dict[str, float] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        if torch.cuda.is_available():  # this run's peak, not an earlier job's of the same multirun process
            torch.cuda.reset_peak_memory_stats()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs after MemoryBankCallback (callbacks run in list order), so the bank is included.
        self.timings["train_seconds"] = time.perf_counter() - self._fit_start

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows: list[dict[str, Any]] = []
        self.selected: list[dict[str, Any]] = []
        self.per_type: dict[str, int] = {}
        self.map_range = [math.inf, -math.inf]
        self._test_start = time.perf_counter()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        maps, scores = outputs["anomaly_maps"], outputs["image_scores"]
        self.map_range = [
            min(self.map_range[0], maps.min().item()),
            max(self.map_range[1], maps.max().item()),
        ]
        for i, path in enumerate(batch["path"]):
            defect_type = batch["defect_type"][i]
            self.rows.append(
                {
                    "path": path,
                    "defect_type": defect_type,
                    "label": int(batch["label"][i]),
                    "score": float(scores[i]),
                }
            )
            if self.per_type.get(defect_type, 0) < self.overlays_per_type:
                self.per_type[defect_type] = self.per_type.get(defect_type, 0) + 1
                self.selected.append(
                    {
                        "path": path,
                        "defect_type": defect_type,
                        "image": batch["image"][i].cpu(),
                        "map": maps[i],
                        "mask": batch["mask"][i, 0].cpu() > 0.5,
                    }
                )

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        elapsed = time.perf_counter() - self._test_start
        self.timings["test_images_per_second"] = len(self.rows) / max(elapsed, 1e-9)
        self.timings["peak_memory_mb"] = peak_memory_mb()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        results = {
            **self.metadata,
            **pl_module.test_results,
            **pl_module.validation_summary(),
            **self.timings,
            "bank_size": int(pl_module.memory_bank.shape[0]),
            "test_images": len(self.rows),
        }
        (self.output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
        write_csv(self.output_dir / "results.csv", [results])
        write_csv(self.output_dir / "predictions.csv", self.rows)
        mean, std = pl_module.hparams.mean, pl_module.hparams.std
        for item in self.selected:
            name = f"{item['defect_type']}_{Path(item['path']).stem}.png"
            save_overlay(
                self.output_dir / "overlays" / name,
                denormalize(item["image"], mean, std),
                item["map"].numpy(),
                *self.map_range,
                mask=item["mask"].numpy(),
            )
        self.results = results


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
