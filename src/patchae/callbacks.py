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
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

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
        vectors = self.embed_training_images(trainer, pl_module)
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
