"""One run: data, model, fit (bank built at its end), save the checkpoint, test, report."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from rich.console import Console
from rich.table import Table

from patchae.callbacks import ResultsWriter
from patchae.checkpoints import load_checkpoint
from patchae.errors import PatchAEError
from patchae.resume import checkpoint_to_resume, complete_results, mark_complete, remove_last_checkpoint
from patchae.wandb_media import finish_wandb_run

log = logging.getLogger(__name__)

REPORTED_METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")
# What a sweep may optimise (`optimized_metric`): keys of every run's results.
OPTIMIZABLE = (
    *REPORTED_METRICS,
    "image_accuracy",
    "train_seconds",
    "test_images_per_second",
    "peak_memory_mb",
)


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The data module of a config (a run's ``.hydra/config.yaml`` too), its training split listed and checked."""
    # Passed as a config node: Hydra would turn an already-built (dataclass) CutPaste back into a dict.
    augment = cfg.augment if cfg.get("augment") else None
    datamodule = instantiate(cfg.data, augment=augment, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Instantiate the data module, the model and the trainer (with callbacks and loggers) from a config."""
    # Check the data before building the model: a wrong path should not wait for a weights download.
    datamodule = build_datamodule(cfg)
    record_geometry(cfg, datamodule)
    record_precision(cfg)
    model = instantiate(cfg.model, _convert_="all")
    callbacks = [instantiate(node, _convert_="all") for node in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(node, _convert_="all") for node in (cfg.get("logger") or {}).values()]
    # A model with nothing to train (PatchCore) skips the fit loop; on_fit_end still builds its memory bank.
    limits = {} if getattr(model, "requires_training", True) else {"limit_train_batches": 0}
    if not validates(cfg, model, datamodule):
        limits["limit_val_batches"] = 0
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, **limits, _convert_="all"
    )
    return datamodule, model, trainer


def record_geometry(cfg: DictConfig, datamodule: L.LightningDataModule) -> None:
    """With ``data.resize_mode=auto`` the data module chose the input shape from the training images: write
    it into ``cfg.data`` so that the model's ``preprocessing`` (saved in model.ckpt), the logged
    hyperparameters and predict / export all use the shape that was trained."""
    if cfg.data.get("resize_mode") != "auto":
        return
    transform = datamodule.transform
    cfg.data.resize_mode = transform.resize_mode
    if transform.resize_mode != "squash":  # squash keeps the configured sizes as they are
        cfg.data.image_size = list(transform.resize_shape)
        cfg.data.crop_size = None if transform.crop_shape is None else list(transform.crop_shape)


def cpu_has_native_bf16() -> bool:
    """Whether this x86 CPU computes bfloat16 in hardware (AVX512-BF16 or AMX). Elsewhere oneDNN emulates
    bf16 convolutions, which is usually slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def record_precision(cfg: DictConfig) -> None:
    """``trainer.precision=bf16-mixed`` trains on the CPU only where the CPU has bf16 in hardware (there an
    SSL-AE fit took 0.95x the time of float32 on an AMD EPYC with AVX512-BF16; docs/results.md); elsewhere the run
    trains in 32-true, says so and records it in its config. Scoring is float32 either way
    (:func:`patchae.scoring.maps.full_precision`)."""
    precision = str(cfg.trainer.get("precision"))
    on_cpu = cfg.trainer.get("accelerator") == "cpu" or (
        cfg.trainer.get("accelerator") == "auto"
        and not torch.cuda.is_available()
        and not torch.backends.mps.is_available()
    )
    if precision.startswith("bf16") and on_cpu and not cpu_has_native_bf16():
        log.warning(
            "trainer.precision=%s: this CPU has no bf16 in hardware (AVX512-BF16 or AMX) and would emulate it, "
            "usually slower than float32; training in 32-true",
            precision,
        )
        cfg.trainer.precision = "32-true"


def validates(cfg: DictConfig, model: L.LightningModule, datamodule: L.LightningDataModule) -> bool:
    """Whether the fit runs label-free validation: a model that trains, held-out images, and not switched off."""
    enabled = bool(cfg.get("validation", {}).get("enabled", False))
    return (
        enabled and getattr(model, "requires_training", True) and getattr(datamodule, "has_validation", False)
    )


def run_metadata(cfg: DictConfig, model: L.LightningModule) -> dict[str, Any]:
    """What identifies a run in results files and dashboards."""
    return {
        "category": cfg.category,
        "model": type(model).__name__,
        "variant": getattr(model, "variant", None),  # Patch AE: "paper" or the bank it holds instead
        "backbone": model.hparams.get("backbone", cfg.backbone.name),  # "scratch" for SSL-AE and DAAD
        "layers": "+".join(str(layer) for layer in cfg.backbone.layers),
        "alpha": model.hparams.get("alpha"),  # None for models without the Patch AE loss (PatchCore)
        "experiment": cfg.experiment_name,
        "seed": cfg.seed,
        "precision": str(cfg.trainer.get("precision")),  # what trained (after record_precision)
    }


def print_results(results: dict[str, Any]) -> None:
    table = Table(title=f"{results.get('category')}: {results.get('model')} ({results.get('backbone')})")
    for name in REPORTED_METRICS:
        table.add_column(name)
    table.add_row(*(f"{results.get(name, math.nan):.4f}" for name in REPORTED_METRICS))
    Console().print(table)


def fit_and_test(cfg: DictConfig) -> dict[str, Any]:
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**32:
        raise PatchAEError(f"seed={cfg.seed} must be an integer in [0, 2^32)")
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("resume") and (done := complete_results(output_dir)) is not None:
        log.info("resume=true: %s holds a complete run, skipped", output_dir)
        return done
    L.seed_everything(cfg.seed, workers=True)
    try:
        datamodule, model, trainer = build(cfg)
    except MissingMandatoryValue as error:  # a ??? in the config, e.g. data=folder without data.normal_dir
        raise PatchAEError(f"{error.full_key} is required: add {error.full_key}=<value>") from None
    except InstantiationException as error:
        # Hydra wraps our own errors; unwrap them so the user sees one clear line.
        cause = error.__cause__
        while cause is not None and not isinstance(cause, PatchAEError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        # Anything else is most often a config key the target does not take: say which and why.
        raise PatchAEError(f"{str(error).splitlines()[0]} {error.__cause__!r}") from None
    resume_from = checkpoint_to_resume(trainer, bool(cfg.get("resume")), cfg.get("ckpt_path"))
    metadata = run_metadata(cfg, model)
    for callback in trainer.callbacks:
        if isinstance(callback, ResultsWriter):
            callback.metadata.update(metadata)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    if validates(cfg, model, datamodule) and cfg.validation.before_training and resume_from is None:
        trainer.validate(model, datamodule=datamodule, verbose=False)  # epoch 0: the untrained encoder
    fit(trainer, model, datamodule, resume_from)
    trainer.test(model, datamodule=datamodule, verbose=False)
    # Saved after testing so that what the test learns (thresholds) travels with the model.
    trainer.save_checkpoint(output_dir / "model.ckpt", weights_only=False)  # as before: the full state
    results = {**metadata, **model.test_results}
    for callback in trainer.callbacks:  # timings, peak memory and bank size, as in results.json
        if isinstance(callback, ResultsWriter):
            results.update(getattr(callback, "results", {}))
    results["run_dir"] = str(output_dir)
    if trainer.is_global_zero:
        mark_complete(output_dir)  # the last step: what resume=true and --skip-finished look for
        remove_last_checkpoint(trainer)
        print_results(results)  # once, not by every DDP process (all hold the gathered results)
        log.info("results, checkpoint and overlays in %s", output_dir)
    return results


def fit(
    trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule, resume_from: Path | None
) -> None:
    """``trainer.fit``, continuing from ``resume_from`` (read weights-only) when given."""
    if resume_from is None:
        trainer.fit(model, datamodule=datamodule)
        return
    load_checkpoint(resume_from)  # refuses a file that could run code, or a damaged one, with one line
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    except (KeyError, RuntimeError) as error:  # a checkpoint of another model or configuration
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        reason = lines[min(1, len(lines) - 1)][:200]  # a state-dict mismatch names the first differing key
        raise PatchAEError(
            f"cannot resume from {resume_from} ({reason}); it was written by a run with other settings: "
            "resume with the same overrides as the interrupted run"
        ) from None


def user_message(error: PatchAEError) -> str:
    """The one line to show. A DataLoader worker re-raises our error with its traceback inside the message:
    keep only the original line."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and "DataLoader worker" in lines[0]:
        return lines[-1].split("PatchAEError: ", 1)[-1]
    return lines[0] if lines else type(error).__name__


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def is_optuna_sweep() -> bool:
    return is_multirun() and "optuna" in str(HydraConfig.get().sweeper.get("_target_", "")).lower()


def run(cfg: DictConfig) -> float:
    """Hydra task: returns ``cfg.optimized_metric`` for sweepers. A user error ends a single run with one
    line; in a multirun it is logged and the sweep goes on with the other jobs (an Optuna sweep marks the
    trial failed: it cannot take nan as a value)."""
    try:
        if cfg.optimized_metric not in OPTIMIZABLE:
            raise PatchAEError(
                f"optimized_metric={cfg.optimized_metric} is unknown; use one of {', '.join(OPTIMIZABLE)}"
            )
        results = fit_and_test(cfg)
        value = float(results.get(cfg.optimized_metric, math.nan))
        if math.isnan(value) and is_optuna_sweep():
            raise PatchAEError(f"{cfg.optimized_metric} is nan for this run, so Optuna cannot rank it")
    except PatchAEError as error:
        finish_wandb_run(failed=True)
        if is_optuna_sweep():
            log.error("error: %s", user_message(error))
            raise
        if is_multirun():
            log.error("error: %s", user_message(error))
            return math.nan
        print(f"error: {user_message(error)}", file=sys.stderr)
        sys.exit(1)
    except BaseException:
        finish_wandb_run(failed=True)
        raise
    return value
