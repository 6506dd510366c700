"""Weights & Biases: a logger that works without an account, and a callback for test media and summaries.

``logger=wandb`` goes online only when an API key is set up (``WANDB_API_KEY`` or ``wandb login``); otherwise
the run is written offline under ``<run dir>/wandb`` and ``wandb sync <that dir>`` uploads it later.
"""

from __future__ import annotations

import logging
import math
import netrc
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger
from omegaconf import OmegaConf

from patchae.callbacks import ResultsWriter
from patchae.errors import PatchAEError
from patchae.visualize import denormalize, overlay

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline", "disabled")
# Run metadata that dashboards group by; copied to the top level of the W&B config.
GROUP_KEYS = ("category", "model", "backbone", "layers", "alpha", "experiment", "seed")
# "model" and "backbone" are also config sections (their settings): in the config these keys go beside them.
CONFIG_NAMES = {"model": "model_name", "backbone": "backbone_name"}
SUMMARY_KEYS = (
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "image_f1_max",
    "train_seconds",
    "test_images_per_second",
    "peak_memory_mb",
    "bank_size",
)


def has_wandb_api_key() -> bool:
    """Whether an API key is configured (environment or ``~/.netrc`` from ``wandb login``); no network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str = "auto") -> str:
    """``auto`` -> ``WANDB_MODE`` when set, else online with an API key and offline without one."""
    if mode not in MODES:
        raise PatchAEError(f"logger.wandb.mode={mode} is unknown; use one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    if env_mode in ("dryrun", "run"):  # W&B's older spellings
        return "offline" if env_mode == "dryrun" else "online"
    return "online" if has_wandb_api_key() else "offline"


def finish_wandb_run(failed: bool) -> None:
    """Close a W&B run a failed job left open (Lightning skips teardown on errors), so that the next job of
    an in-process multirun starts its own run. Does nothing when W&B was never used."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def swept_keys() -> set[str]:
    """Keys a running multirun sweeps: the sweeper's ``params`` and the command line's sweeps (as saved in
    ``<sweep dir>/multirun.yaml``). Empty outside a Hydra multirun."""
    if not in_multirun():
        return set()
    hydra = HydraConfig.get()
    keys = set((hydra.sweeper.get("params") or {}).keys())
    saved = Path(hydra.sweep.dir) / "multirun.yaml"
    try:
        overrides = list(OmegaConf.load(saved).hydra.overrides.task) if saved.is_file() else []
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as error:  # a run's name is never worth stopping the run for
        log.debug("could not read the sweep's overrides from %s: %s", saved, error)
        return keys
    return keys | {override.key_or_group for override in parsed if override.is_sweep_override()}


def default_run_name(category: str) -> str:
    """``<category>`` for a single run; ``<category>: <swept key>=<value>, ...`` for a job of a multirun."""
    keys = swept_keys() - {"category"}
    if not keys:
        return category
    swept = [o for o in HydraConfig.get().overrides.task if o.partition("=")[0].lstrip("+~") in keys]
    return f"{category}: {', '.join(swept)}" if swept else category


def sweep_group(group: str) -> str:
    """Runs of one multirun share a group: ``<group>-<sweep dir name>``; a single run keeps ``group``."""
    return f"{group}-{Path(HydraConfig.get().sweep.dir).name}" if in_multirun() else group


def create_wandb_logger(
    project: str = "patchae",
    save_dir: str = ".",
    mode: str = "auto",
    group: str | None = None,
    name: str | None = None,
    category: str = "",
    tags: Sequence[str] = (),
    **kwargs: Any,
) -> WandbLogger:
    """A Lightning ``WandbLogger`` whose mode follows :func:`resolve_mode` (offline without an account).

    ``name`` defaults to the category plus, in a multirun, the values this job sweeps; ``group`` is
    suffixed with the sweep directory in a multirun, so every sweep is one W&B group.
    """
    resolved = resolve_mode(mode)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    log.info("W&B mode: %s (run files under %s/wandb)", resolved, save_dir)
    logger = WandbLogger(
        project=project,
        save_dir=save_dir,
        mode=resolved,
        group=sweep_group(group) if group else None,
        name=name or default_run_name(str(category or project)),
        tags=[str(tag) for tag in tags],
        **kwargs,
    )
    # Lightning always passes `anonymous`, which recent wandb versions only warn about.
    if getattr(logger, "_wandb_init", {}).get("anonymous", "") is None:
        logger._wandb_init.pop("anonymous")
    return logger


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact ROC curve (fpr, tpr), one point per distinct score, from (0, 0) to (1, 1). Raw distances are
    fine: nothing is squashed through a sigmoid, so large scores never tie."""
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order].astype(bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    ends = np.append(np.flatnonzero(np.diff(scores)), len(scores) - 1)  # last index of each tie group
    tpr = np.cumsum(labels)[ends] / positives
    fpr = np.cumsum(~labels)[ends] / negatives
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def find_wandb_logger(trainer: L.Trainer) -> WandbLogger | None:
    return next((logger for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)


class WandbMediaCallback(L.Callback):
    """With a ``WandbLogger``: the run's metadata as top-level config (group by category / alpha / experiment),
    and after testing anomaly-map overlays, images with ground-truth and predicted masks, the ROC curve, a
    one-row summary table and summary metrics. Does nothing with other loggers.

    Must come after :class:`patchae.callbacks.ResultsWriter` in the callback list (it reads its timings).
    """

    def __init__(self, images_per_type: int = 2, max_roc_points: int = 1000) -> None:
        self.images_per_type = images_per_type
        self.max_roc_points = max_roc_points

    # -- config -----------------------------------------------------------------------------------
    @staticmethod
    def metadata(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        for callback in trainer.callbacks:
            if isinstance(callback, ResultsWriter) and callback.metadata:
                return {key: callback.metadata.get(key) for key in GROUP_KEYS}
        return {
            "model": type(pl_module).__name__,
            "backbone": pl_module.hparams.get("backbone"),
            "alpha": pl_module.hparams.get("alpha"),
        }

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = find_wandb_logger(trainer)
        if logger is not None and trainer.is_global_zero:
            metadata = self.metadata(trainer, pl_module)
            config = {CONFIG_NAMES.get(key, key): value for key, value in metadata.items()}
            logger.experiment.config.update(config, allow_val_change=True)

    # -- collecting -------------------------------------------------------------------------------
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.active = find_wandb_logger(trainer) is not None and trainer.is_global_zero
        self.scores: list[float] = []
        self.labels: list[int] = []
        self.selected: list[dict[str, Any]] = []
        self.per_type: dict[str, int] = {}
        self.map_range = [math.inf, -math.inf]

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self.active:
            return
        maps, scores = outputs["anomaly_maps"], outputs["image_scores"]
        self.map_range = [
            min(self.map_range[0], maps.min().item()),
            max(self.map_range[1], maps.max().item()),
        ]
        self.scores.extend(float(score) for score in scores)
        self.labels.extend(int(label) for label in batch["label"])
        for i, defect_type in enumerate(batch["defect_type"]):
            if self.per_type.get(defect_type, 0) < self.images_per_type:
                self.per_type[defect_type] = self.per_type.get(defect_type, 0) + 1
                self.selected.append(
                    {
                        "name": f"{defect_type}/{Path(batch['path'][i]).stem}",
                        "image": batch["image"][i].cpu(),
                        "map": maps[i].cpu().numpy(),
                        "mask": batch["mask"][i, 0].cpu().numpy() > 0.5,
                        "score": float(scores[i]),
                    }
                )

    # -- logging ----------------------------------------------------------------------------------
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            return
        import wandb

        run = find_wandb_logger(trainer).experiment
        results = dict(getattr(pl_module, "test_results", {}) or {})
        for callback in trainer.callbacks:  # ResultsWriter's timings and bank size
            if isinstance(callback, ResultsWriter):
                results.update(getattr(callback, "results", None) or {})
        metadata = self.metadata(trainer, pl_module)
        # The deployable (label-free) threshold when the model has one, else the F1-optimal one of this test.
        threshold = results.get("image_threshold", results.get("image_f1_threshold", math.nan))
        payload: dict[str, Any] = {}
        if self.selected:
            payload["test/predictions"] = [
                self.masked_image(wandb, item, pl_module, threshold) for item in self.selected
            ]
            payload["test/anomaly_maps"] = [
                wandb.Image(
                    overlay(self.pixels(item, pl_module), item["map"], *self.map_range, mask=item["mask"]),
                    caption=f"{item['name']} score={item['score']:.3f}",
                )
                for item in self.selected
            ]
        if self.scores:
            payload["test/roc"] = self.roc_plot(wandb, results.get("image_auroc", math.nan))
        summary = {**metadata, **{key: results[key] for key in SUMMARY_KEYS if key in results}}
        payload["test/summary"] = wandb.Table(columns=list(summary), data=[[summary[key] for key in summary]])
        run.log(payload)
        run.summary.update(summary)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The run is complete after testing. Finishing it here lets the next job of an in-process multirun
        # start a fresh run instead of appending to this one.
        logger = find_wandb_logger(trainer)
        if (
            stage == "test"
            and logger is not None
            and trainer.is_global_zero
            and getattr(logger, "_experiment", None) is not None  # never start a run just to finish it
        ):
            logger.experiment.finish()

    @staticmethod
    def pixels(item: dict[str, Any], pl_module: L.LightningModule) -> np.ndarray:
        return denormalize(item["image"], pl_module.preprocessing.mean, pl_module.preprocessing.std)

    def masked_image(
        self, wandb: Any, item: dict[str, Any], pl_module: L.LightningModule, threshold: float | None
    ) -> Any:
        """The test image with two toggleable masks: the ground truth, and pixels at or above the image
        threshold (those that alone would make the image anomalous)."""
        labels = {0: "normal", 1: "defect"}
        masks = {"ground_truth": {"mask_data": item["mask"].astype(np.uint8), "class_labels": labels}}
        if threshold is not None and math.isfinite(threshold):
            masks["prediction"] = {
                "mask_data": (item["map"] >= threshold).astype(np.uint8),
                "class_labels": labels,
            }
        return wandb.Image(
            self.pixels(item, pl_module), masks=masks, caption=f"{item['name']} score={item['score']:.3f}"
        )

    def roc_plot(self, wandb: Any, auroc: float) -> Any:
        fpr, tpr = roc_points(np.asarray(self.scores, dtype=np.float64), np.asarray(self.labels))
        if len(fpr) > self.max_roc_points:  # keep the table small; the end points stay
            keep = np.unique(np.linspace(0, len(fpr) - 1, self.max_roc_points).round().astype(int))
            fpr, tpr = fpr[keep], tpr[keep]
        table = wandb.Table(
            columns=["fpr", "tpr"], data=[[float(f), float(t)] for f, t in zip(fpr, tpr, strict=True)]
        )
        return wandb.plot.line(table, "fpr", "tpr", title=f"image ROC (AUROC {auroc:.4f})")
