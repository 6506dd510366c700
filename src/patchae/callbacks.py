"""Lightning callbacks: build the memory bank after training, write results and overlays after testing."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import resource
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
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

from patchae.checkpoints import to_plain
from patchae.data.images import load_rgb
from patchae.data.transforms import ImageTransform
from patchae.distributed import all_gather_objects, broadcast_buffers, first_of_each
from patchae.errors import PatchAEError
from patchae.memory import greedy_coreset
from patchae.memory.coreset import DEFAULT_GREEDY_SECONDS, DEFAULT_PART_SIZE, check_coreset_method
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


# Training vectors above which exact greedy selection takes tens of minutes on a CPU.
LARGE_BANK = 500_000


class MemoryBankCallback(L.Callback):
    """Hands the model the normal images its scorer is fitted on. At the end of fit: the un-augmented training
    images; a bank model keeps the greedy k-center coreset of their patch vectors as its memory bank
    (:meth:`coreset`), a reconstruction model fits its error statistics on them. Before every validation:
    validation's training images, for a scorer fitted with the current weights."""

    def __init__(
        self,
        coreset_ratio: float = 0.1,
        projection_dim: int | None = 128,
        seed: int = 0,
        coreset_method: str = "auto",
        coreset_part_size: int = DEFAULT_PART_SIZE,
        coreset_greedy_seconds: float = DEFAULT_GREEDY_SECONDS,
    ) -> None:
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.seed = seed
        check_coreset_method(coreset_method, coreset_part_size)  # a bad key fails before training, not after
        self.coreset_method = coreset_method
        self.coreset_part_size = coreset_part_size
        if (
            isinstance(coreset_greedy_seconds, bool)
            or not isinstance(coreset_greedy_seconds, (int, float))
            or not (coreset_greedy_seconds >= 0)
        ):
            raise PatchAEError(
                f"bank.coreset_greedy_seconds must be a number of seconds >= 0, got {coreset_greedy_seconds!r}"
            )
        self.coreset_greedy_seconds = float(coreset_greedy_seconds)
        self.device = torch.device("cpu")  # the model's, while it is fitted
        self.progress: Progress | None = None

    def coreset(self, vectors: torch.Tensor) -> torch.Tensor:
        """Indices of the bank's rows among the training vectors: the greedy k-center coreset."""
        if self.coreset_method == "greedy" and len(vectors) > LARGE_BANK:
            log.warning(
                "exact greedy coreset of %d vectors takes minutes (about 9 CPU-minutes for a 10%% coreset of 1M); "
                "bank.coreset_method=partitioned takes under 2 min of 2 cores there",
                len(vectors),
            )
        progress = self.progress
        task = progress.add_task(f"memory bank: coreset of {len(vectors)} patches", total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        indices = greedy_coreset(
            vectors.to(self.device),
            ratio=self.coreset_ratio,
            projection_dim=self.projection_dim,
            seed=self.seed,
            progress=report,
            method=self.coreset_method,
            part_size=self.coreset_part_size,
            greedy_seconds=self.coreset_greedy_seconds,
        )
        log.info("memory bank: %d of %d patch vectors (dim %d)", len(indices), len(vectors), vectors.shape[1])
        return indices.cpu()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.datamodule.val_bank_dataloader()
        pl_module.fit_validation_scorer(pl_module.image_batches(loader))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        was_training = pl_module.training
        pl_module.eval()
        self.device = pl_module.device
        loader = trainer.datamodule.bank_dataloader()
        with progress_bar() as progress:  # one live display for both steps: rich allows no second one
            self.progress = progress
            task = progress.add_task("memory bank: embedding training images", total=len(loader))

            def images() -> Iterator[torch.Tensor]:
                for images in pl_module.image_batches(loader):
                    yield images
                    progress.advance(task)

            # A bank model keeps the coreset of the batches' patch vectors; a reconstruction model fits its
            # error statistics on all of them (it has no use for a coreset).
            pl_module.fit_scorer(images(), subsample=self.coreset)
        self.progress = None
        pl_module.train(was_training)
        # Under DDP every process built the bank (or statistics) from all training images (the bank loader is
        # not sharded); rank 0's copy then makes them equal to the last bit.
        broadcast_buffers(pl_module)


class HoldoutScoresCallback(L.Callback):
    """Scores the data module's held-out normal images (never trained on, never in the bank) once the scorer is
    fitted, for the label-free ``quantile`` threshold that testing calibrates. After the results writer in the
    callback list, so that this time counts neither as training nor as test throughput; a model tested without
    fit in this process is scored when testing starts."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.is_fitted:
            pl_module.normal_scores = self.holdout_scores(trainer, pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.normal_scores.numel() == 0:
            pl_module.normal_scores = self.holdout_scores(trainer, pl_module)

    @staticmethod
    def holdout_scores(trainer: L.Trainer, pl_module: L.LightningModule) -> torch.Tensor:
        loader = getattr(trainer.datamodule, "holdout_dataloader", lambda: None)()
        return torch.empty(0) if loader is None else pl_module.score_images(loader)


class BestEpochCallback(L.Callback):
    """Keeps the weights of the best label-free validation (``monitor``, higher is better) and restores them
    when fit ends, before the memory bank is built from them. Epoch 0 is the model before any training
    (``trainer.validate`` before fit, see :func:`patchae.train.fit_and_test`), so a category where training
    hurts keeps the untrained encoder. With ``patience``, training stops after that many validations
    without improvement. The copy lives in memory (CPU) and in the callback's state, so the fit's last
    checkpoint carries it and a resumed fit (``resume=true``) still keeps it; it is dropped once restored, so
    model.ckpt holds one set of weights. With ``select=False`` the last weights stay (a fixed training length)
    and their validation is what gets reported (``patience`` still stops the fit).

    A later epoch replaces the best only when it beats it by more than ``min_delta``: differences smaller than
    what a few flipped validation images make are noise, and on noise the less trained weights are the safer
    bet (synthetic-defect validation can favour training that real defects do not, see docs/results.md)."""

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
        # The best is tracked either way (patience needs it); its weights are copied only to be restored.
        if self.best_epoch is None or score > self.best_score + self.min_delta:
            self.best_score, self.best_epoch = score, epoch
            if self.select:
                self.best_state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
            self.best_results = self.last_results
            self.validations_since_best = 0
        else:
            self.validations_since_best += 1
        if fitting and self.out_of_patience:
            trainer.should_stop = True

    @property
    def out_of_patience(self) -> bool:
        return self.patience is not None and self.validations_since_best >= self.patience

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.out_of_patience:  # resumed from the checkpoint of a fit that had stopped early
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        names = ("last_epoch", "last_results", "best_score", "best_epoch", "best_state", "best_results")
        return to_plain({name: getattr(self, name) for name in (*names, "validations_since_best")})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, value in state_dict.items():
            setattr(self, name, value)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.select and self.last_epoch is not None:
            pl_module.selected_epoch, pl_module.val_results = self.last_epoch, self.last_results
            return
        if self.best_state is None:
            return
        pl_module.load_state_dict(self.best_state)
        self.best_state = None  # restored: model.ckpt need not hold a second copy
        pl_module.selected_epoch = self.best_epoch
        pl_module.val_results = self.best_results
        log.info(
            "kept the weights after %d epoch(s): %s = %.4f", self.best_epoch, self.monitor, self.best_score
        )


class LastCheckpoint(L.Callback):
    """Saves the fit's full state (weights, optimizer, epoch, the callbacks' states such as the best epoch's
    weights) to ``path`` after every ``every_n_epochs`` epochs: what ``resume=true`` continues from with
    ``Trainer.fit(ckpt_path=...)``. Written beside it and then renamed, so an interruption while saving
    leaves the previous one whole."""

    def __init__(self, path: str, every_n_epochs: int = 1) -> None:
        self.path = Path(path)
        self.every_n_epochs = every_n_epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        partial = self.path.with_name(f".{self.path.name}.partial")
        trainer.save_checkpoint(partial, weights_only=False)  # optimizer and callback states too, to resume
        if trainer.is_global_zero:
            os.replace(partial, self.path)


def peak_memory_mb() -> float:
    """Peak GPU memory when on a GPU, else the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class ResultsWriter(L.Callback):
    """Writes ``results.json``/``results.csv`` (metrics, timings, run metadata), ``predictions.csv``
    (one row per test image) and anomaly-map overlays of a few images per defect type.

    Under DDP the processes' shares of the test split are gathered (each image once, in dataset order) and
    only rank 0 writes."""

    def __init__(
        self, output_dir: str, metadata: dict[str, Any] | None = None, overlays_per_type: int = 2
    ) -> None:
        self.output_dir = Path(output_dir)
        self.metadata = dict(metadata or {})
        self.overlays_per_type = overlays_per_type
        self.timings: dict[str, float] = {}
        self._fit_start: float | None = None
        self.earlier_fit_seconds = 0.0  # of the interrupted fit a resumed one continues

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        if torch.cuda.is_available():  # this run's peak, not an earlier job's of the same multirun process
            torch.cuda.reset_peak_memory_stats()

    def fit_seconds(self) -> float:
        if "train_seconds" in self.timings:
            return self.timings["train_seconds"]
        running = 0.0 if self._fit_start is None else time.perf_counter() - self._fit_start
        return self.earlier_fit_seconds + running

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs after MemoryBankCallback (callbacks run in list order), so the bank is included.
        self.timings["train_seconds"] = self.fit_seconds()

    def state_dict(self) -> dict[str, Any]:
        return {"fit_seconds": self.fit_seconds()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.earlier_fit_seconds = float(state_dict.get("fit_seconds", 0.0))

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows: list[dict[str, Any]] = []
        self.row_indices: list[int] = []  # dataset index of each row
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
        indices = batch.get("index")
        for i, path in enumerate(batch["path"]):
            defect_type = batch["defect_type"][i]
            index = len(self.row_indices) if indices is None else int(indices[i])
            self.row_indices.append(index)
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
                        "index": index,
                        "image": batch["image"][i].cpu(),
                        "map": maps[i],
                        "mask": batch["mask"][i, 0].cpu() > 0.5,
                    }
                )

    def gather_shares(self) -> None:
        """Under DDP: the rows and overlays of the whole test split, each image once, in dataset order, as
        one process has them (a type's first overlays are among the first of the process that scored them)."""
        shares = all_gather_objects((self.row_indices, self.rows, self.selected, self.map_range))
        if len(shares) == 1:
            return
        rows = [row for share in shares for row in share[1]]
        indices = torch.tensor([index for share in shares for index in share[0]], dtype=torch.long)
        keep = first_of_each(indices)
        self.rows, self.row_indices = [rows[i] for i in keep.tolist()], indices[keep].tolist()
        candidates = {item["index"]: item for share in shares for item in share[2]}
        self.selected, self.per_type = [], {}
        for index in sorted(candidates):
            defect_type = candidates[index]["defect_type"]
            if self.per_type.get(defect_type, 0) < self.overlays_per_type:
                self.per_type[defect_type] = self.per_type.get(defect_type, 0) + 1
                self.selected.append(candidates[index])
        self.map_range = [min(share[3][0] for share in shares), max(share[3][1] for share in shares)]

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        elapsed = time.perf_counter() - self._test_start
        self.gather_shares()
        self.timings["test_images_per_second"] = len(self.rows) / max(elapsed, 1e-9)
        self.timings["peak_memory_mb"] = peak_memory_mb()
        results = {
            **self.metadata,
            **pl_module.test_results,
            **pl_module.validation_summary(),
            **self.timings,
            "bank_size": pl_module.bank_size,
            "test_images": len(self.rows),
        }
        self.results = results
        if not trainer.is_global_zero:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
        write_csv(self.output_dir / "results.csv", [results])
        write_csv(self.output_dir / "predictions.csv", self.rows)
        transform = ImageTransform.from_preprocessing(pl_module.preprocessing)
        for item in self.selected:
            name = f"{item['defect_type']}_{Path(item['path']).stem}.png"
            image, anomaly_map, mask = at_original_size(item, transform)
            save_overlay(self.output_dir / "overlays" / name, image, anomaly_map, *self.map_range, mask=mask)


def at_original_size(
    item: dict[str, Any], transform: ImageTransform
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An overlay's image (the file), anomaly map and mask at the image's original size; the model input
    instead when the file cannot be read again."""
    try:
        image = np.asarray(load_rgb(item["path"]))
    except Exception:  # moved or deleted since it was tested: the overlay is still worth writing
        image = denormalize(item["image"], transform.mean, transform.std)
        return image, item["map"].numpy(), item["mask"].numpy()
    size = image.shape[:2]
    anomaly_map = transform.restore_map(item["map"].float(), size).numpy()
    mask = transform.restore_map(item["mask"].float(), size).numpy() > 0.5
    return image, anomaly_map, mask


def write_csv(path: Path, rows: Sequence[dict[str, Any]], fields: Sequence[str] | None = None) -> None:
    """``rows`` as a CSV file with a header: ``fields``, else the first row's keys."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=list(fields if fields is not None else rows[0] if rows else [])
        )
        writer.writeheader()
        writer.writerows(rows)
