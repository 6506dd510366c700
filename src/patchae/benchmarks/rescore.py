"""Finished runs scored again under other scoring settings, on their label-free validation and their test split.

    python -m patchae.benchmarks.rescore 'runs=[multirun/b/ssl_ae/bottle/seed_0,multirun/b/ssl_ae/bottle/seed_1]' \\
        'blur_sigmas=[2,4,8]' 'image_scores=[max,topk]' top_k=0.01 output=rescore.json

A run directory is what train.py writes (``.hydra/config.yaml`` and ``model.ckpt``). For every combination of
``blur_sigmas`` and ``image_scores`` the checkpoint is loaded with those settings (as predict.py would load it with
``blur_sigma=...``) and scored by the model's own forward, so the figures are what a retrained run with the same
weights would report: the test split as in testing, and validation as in training (held-out normal images with
synthetic defects, scored against the statistics or bank of the validation bank's images, fitted with these
weights). Without retraining, a setting can then be chosen on validation alone, across seeds: the table's mean
rows. An empty list keeps the run's own setting.

``model`` replaces model settings by name for every row, e.g. ``'model={inpaint_cells:[8,16]}'`` (SSL-AE scored by
inpainting); ``val_placement=foreground`` puts validation's synthetic defects on the object (``validation.placement``),
``'val_kinds=[warp]'`` chooses their kinds (``validation.kinds``).
Statistics a reconstruction model keeps of its normal errors are not refitted: for a single error term (SSL-AE)
they rescale the map and leave every AUROC and AUPRO as a refitted run would give them. Statistics the checkpoint
does not hold (``'model={error_statistics: per_pixel}'`` of a run saved with global ones) are fitted on the run's
training images, as at the end of its fit.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from patchae.benchmarks.cli import run_command
from patchae.deploy.loading import load_model
from patchae.errors import PatchAEError
from patchae.models.base import AnomalyModule
from patchae.train import build_datamodule

METRICS = ("image_auroc", "pixel_auroc", "aupro")
SPLITS = ("val", "test")


@dataclass
class RescoreConfig:
    """``python -m patchae.benchmarks.rescore key=value ...``"""

    runs: list[str] = field(default_factory=list)  # run directories written by train.py
    blur_sigmas: list[float] = field(default_factory=list)  # empty: each run's own scoring.blur_sigma
    image_scores: list[str] = field(default_factory=list)  # max | topk | reweight; empty: each run's own
    top_k: float | None = None  # topk's share of pixels; empty: each run's own
    # Model settings replaced by name, for every row (load_model's overrides), e.g. {inpaint_cells: [8]}
    model: dict[str, Any] = field(default_factory=dict)
    val_placement: str | None = None  # uniform | foreground (validation.placement); empty: each run's own
    val_kinds: list[str] | None = None  # of cutpaste, perlin, warp (validation.kinds); empty: each run's own
    output: str | None = None  # a .json file for the results


def run_config(run_dir: Path) -> Any:
    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file() or not (run_dir / "model.ckpt").is_file():
        raise PatchAEError(
            f"{run_dir} is not a finished run: it needs .hydra/config.yaml and model.ckpt (as train.py writes them)"
        )
    return OmegaConf.load(config)


@torch.no_grad()
def split_metrics(module: AnomalyModule, datamodule: Any, split: str) -> dict[str, float]:
    """``split``'s image AUROC, pixel AUROC and AUPRO, through the module's own validation or test steps."""
    if split == "val":
        module.fit_validation_scorer(module.image_batches(datamodule.val_bank_dataloader()))
        module.on_validation_epoch_start()
        step, loader, metrics = module.validation_step, datamodule.val_dataloader(), module.val_metrics
    else:
        module.on_test_epoch_start()
        step, loader, metrics = module.test_step, datamodule.test_dataloader(), module.test_metrics
    for index, batch in enumerate(loader):
        step(batch, index)
    results = metrics.compute()
    return {name: float(results[name]) for name in METRICS}


def rescore(cfg: RescoreConfig) -> dict[str, Any]:
    if not cfg.runs:
        raise PatchAEError(
            "no runs given: runs=[<run dir>,...] (directories with .hydra/config.yaml and model.ckpt)"
        )
    unset = [name for name, value in cfg.model.items() if value is None]
    if unset:  # YAML reads {a:1} as the key "a:1" without a value
        raise PatchAEError(
            f"model setting {unset[0]!r} has no value; write a space after each colon, e.g. "
            "'model={inpaint_cells: [8], inpaint_training: 0}'"
        )
    rows = []
    for run in cfg.runs:
        run_dir = Path(run)
        config = run_config(run_dir)
        if cfg.val_placement is not None:
            config.data.val_placement = cfg.val_placement
        if cfg.val_kinds is not None:
            config.data.val_kinds = list(cfg.val_kinds)
        datamodule = build_datamodule(config)
        datamodule.setup("test")
        if not datamodule.has_validation:
            raise PatchAEError(
                f"{run_dir} kept no held-out images (data.holdout_ratio=0): no validation to rescore"
            )
        for sigma, method in itertools.product(cfg.blur_sigmas or [None], cfg.image_scores or [None]):
            settings = {**cfg.model, "blur_sigma": sigma, "image_score": method, "top_k": cfg.top_k}
            module = load_model(
                run_dir / "model.ckpt", fold_batchnorm=False, require_fitted=False, **settings
            )
            if not module.is_fitted:  # e.g. per-pixel error statistics asked of a run saved with global ones
                module.fit_scorer(module.image_batches(datamodule.bank_dataloader()))
            scoring = module.model.scorer.scoring
            row = {"run": str(run_dir), "blur_sigma": scoring.blur_sigma, "image_score": scoring.image_score}
            row.update(
                model=dict(cfg.model),
                val_placement=datamodule.val_placement,
                val_kinds=list(datamodule.val_kinds),
            )
            if scoring.image_score == "topk":
                row["image_score"] = f"topk {scoring.top_k:g}"
            for split in SPLITS:
                row.update({f"{split}_{k}": v for k, v in split_metrics(module, datamodule, split).items()})
            rows.append(row)
    return {"rows": rows, "means": setting_means(rows)}


def setting_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over the runs of every setting (blur sigma, image score)."""
    settings: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        settings.setdefault((row["blur_sigma"], row["image_score"]), []).append(row)
    means = []
    for (sigma, method), group in settings.items():
        mean = {"blur_sigma": sigma, "image_score": method, "runs": len(group)}
        for key in (f"{split}_{name}" for split in SPLITS for name in METRICS):
            values = [row[key] for row in group]
            if any(math.isnan(value) for value in values):  # e.g. pixel AUROC of image-level data
                mean[key] = mean[f"{key}_std"] = math.nan
                continue
            mean[key] = statistics.fmean(values)
            mean[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        means.append(mean)
    return means


def format_results(results: dict[str, Any]) -> str:
    header = "| blur sigma | image score | runs | " + " | ".join(
        f"{split} {name.replace('_', ' ')}" for split in SPLITS for name in METRICS
    )
    lines = [header + " |", "|---:|---|---:|" + "---:|" * (len(SPLITS) * len(METRICS))]
    for mean in results["means"]:
        cells = [
            f"{100 * mean[key]:.2f} ± {100 * mean[key + '_std']:.2f}"
            for key in (f"{split}_{name}" for split in SPLITS for name in METRICS)
        ]
        lines.append(
            f"| {mean['blur_sigma']:g} | {mean['image_score']} | {mean['runs']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_command("patchae.benchmarks.rescore", __doc__, RescoreConfig, rescore, format_results, argv)


if __name__ == "__main__":
    main()
