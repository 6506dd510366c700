"""Loading a trained model from its checkpoint: the one place every entry point (predict, export, the
benchmarks) gets a model from, with one-line errors for files that are not a usable patchae model."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import torch

from patchae.checkpoints import load_checkpoint
from patchae.data import ImageTransform
from patchae.errors import PatchAEError
from patchae.models import AnomalyModule, PatchAEModule
from patchae.models.base import CHECKPOINT_KEY, set_setting, upgrade_hparams
from patchae.models.fusion import fold_for_inference
from patchae.thresholds import Thresholds


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise PatchAEError(f"device={device} is not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise PatchAEError(f"device={device} but no CUDA GPU is visible; use device=cpu or device=auto")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise PatchAEError(
            f"device={device} but only {torch.cuda.device_count()} GPU(s) are visible; use cuda:0 .. cuda:N-1"
        )
    return resolved


def set_threads(threads: int) -> None:
    """CPU threads of torch and of faiss's OpenMP search."""
    import faiss

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise PatchAEError(f"threads must be a positive integer or null, got {threads!r}")
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict (memory-mapped, so reading it costs little), with one-line errors.

    Read weights-only (:mod:`patchae.checkpoints`): a file that holds anything but tensors and plain values is
    refused, so opening a model.ckpt never runs code."""
    path = Path(path).expanduser()
    checkpoint = load_checkpoint(path)
    if (
        not isinstance(checkpoint, dict)
        or "state_dict" not in checkpoint
        or "hyper_parameters" not in checkpoint
    ):
        raise PatchAEError(
            f"{path} is not a patchae checkpoint (no state_dict/hyper_parameters); use a model.ckpt written by train.py"
        )
    return checkpoint


def checkpoint_class(checkpoint: dict[str, Any], path: Path) -> type[AnomalyModule]:
    """The model class recorded in the checkpoint (PatchAEModule for checkpoints that record none)."""
    name = checkpoint.get(CHECKPOINT_KEY, {}).get("model_class")
    if name is None:
        return PatchAEModule
    module_name, _, class_name = str(name).rpartition(".")
    # Importing whatever module a file names could run that module's import-time code.
    if module_name.split(".")[0] != "patchae":
        raise PatchAEError(f"checkpoint {path} names {name}, which is not a patchae model; refused")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        # Models moved into packages of their own (patchae.models.module -> patchae.models.<name>); every model
        # class is exported by patchae.models, so older checkpoints still find theirs by its name.
        cls = getattr(importlib.import_module("patchae.models"), class_name, None)
    if cls is None:
        raise PatchAEError(
            f"checkpoint {path} was saved by model class {name}, which this patchae does not have; update patchae"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, AnomalyModule)):
        raise PatchAEError(f"checkpoint {path} names {name}, which is not an anomaly model")
    return cls


def load_model(
    path: str | Path,
    device: str = "cpu",
    fold_batchnorm: bool = True,
    require_fitted: bool = True,
    **overrides: Any,
) -> AnomalyModule:
    """A trained model, in eval mode on ``device``, from a checkpoint written by train.py, for inference only:
    with ``fold_batchnorm`` its batch norms are folded into the convolutions before them
    (:mod:`patchae.models.fusion`; same outputs, ~15 % faster at batch 1 on CPU), so it must not be trained.

    ``overrides`` replace hyper-parameters the model was saved with: model arguments, or settings of its
    groups by their own name (``search="torch"`` sets ``bank.search``); names the model does not have are
    ignored. Pretrained weights are never downloaded: the checkpoint has them. Checkpoints written before the
    settings were grouped (flat hyper-parameters, weights under their old names) load the same. Without
    ``require_fitted`` a model whose scorer the checkpoint cannot fill (per-pixel statistics asked of a run saved
    with global ones) loads unfitted, for the caller to fit.
    """
    path = Path(path).expanduser()
    checkpoint = read_checkpoint(path)
    cls = checkpoint_class(checkpoint, path)
    hparams = upgrade_hparams(checkpoint["hyper_parameters"])
    arguments = inspect.signature(cls.__init__).parameters
    for key, value in {"pretrained": False, **overrides}.items():
        if value is not None:
            set_setting(hparams, key, value, arguments)
    try:
        model = cls(**hparams)
    except TypeError as error:  # a hyper-parameter this version's model does not take
        raise PatchAEError(
            f"checkpoint {path} was saved with settings this patchae's {cls.__name__} does not take ({error}); "
            "use the patchae version that wrote it"
        ) from None
    try:
        model.on_load_checkpoint(checkpoint)  # an older file's weight names, and the calibrated thresholds
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        first = str(error).splitlines()
        detail = next((line.strip() for line in first[1:] if line.strip()), first[0] if first else "")[:160]
        raise PatchAEError(
            f"checkpoint {path}: its weights do not fit a {cls.__name__} with backbone {hparams.get('backbone')} "
            f"layers {hparams.get('layers')} ({detail}); it was saved from another model/backbone than its settings say: "
            "retrain, or use the model.ckpt of the matching run"
        ) from None
    # No memory bank yet (or, for a reconstruction model, no normal statistics of the kind asked for).
    if not model.is_fitted and require_fitted:
        if overrides.get("error_statistics", "global") != "global":
            raise PatchAEError(
                f"checkpoint {path} holds global error statistics, not per-pixel ones: retrain with "
                "model.error_statistics=per_pixel, or rescore it (python -m patchae.benchmarks.rescore fits them)"
            )
        raise PatchAEError(
            f"checkpoint {path} has no memory bank (saved before the end of training); use the model.ckpt a finished run wrote"
        )
    model = model.to(resolve_device(device)).eval()
    if fold_batchnorm:
        fold_for_inference(model, example_images(model))
    return model


def example_images(model: AnomalyModule) -> torch.Tensor:
    """One seeded random image of the shape the model is given (its preprocessing's output)."""
    height, width = ImageTransform.from_preprocessing(model.preprocessing).output_shape
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    return images.to(model.device)


def pick_thresholds(
    thresholds: Thresholds,
    value: float | None = None,
    method: str | None = None,
    quantile: float | None = None,
    source: str = "the checkpoint",
) -> Thresholds:
    """The thresholds to decide with: a raw ``value`` beats a re-picked ``quantile`` beats ``method``."""
    if value is not None:
        return thresholds.with_value(value)
    if quantile is not None:
        return thresholds.with_quantile(quantile)
    if method is not None:
        return thresholds.with_method(method)
    if not thresholds.is_set:
        raise PatchAEError(
            f"{source} has no calibrated threshold (its test split lacked normal or anomalous images and there were "
            "no held-out normals); pass threshold=<raw score>"
        )
    return thresholds
