"""Batch norm folded into the convolution before it, for inference.

In eval mode a batch norm is a per-channel affine map, so a convolution followed directly by one equals a single
convolution with scaled weights and a shifted bias. EfficientNet-Lite0 at batch 1 on a CPU spends about 15 % of
its time in its 33 separate batch-norm calls; folded, the network runs that much less for the same outputs (to
float rounding). Only for models that will not train again: :func:`patchae.deploy.loading.load_model` folds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

try:  # timm's batch norm with its activation fused in (EfficientNet, ResNet in timm)
    from timm.layers import BatchNormAct2d
except ImportError:  # pragma: no cover - timm is a dependency
    BatchNormAct2d = None

log = logging.getLogger(__name__)


def fold_batchnorm(model: nn.Module, *example: Any) -> list[Folded]:
    """Fold every eval-mode 2-d batch norm whose input is exactly a convolution's output into that convolution
    and return what was folded. Which convolution feeds which norm is seen in one forward pass on
    ``example`` (the module graph alone does not say); a convolution whose output also reaches another module
    is left alone. The model must be in eval mode and is changed in place."""
    return _fold_seen(model, example)[0]


def _fold_seen(model: nn.Module, example: tuple[Any, ...]) -> tuple[list[Folded], Any]:
    """:func:`fold_batchnorm`, and the model's outputs on ``example`` before folding (its hooked pass)."""
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode: batch statistics cannot be folded")
    producers: dict[int, tuple[nn.Conv2d, Tensor]] = {}  # id(output) -> (conv, output: kept alive for the id)
    consumers: dict[int, list[nn.Module]] = {}
    pairs: list[tuple[str, nn.Conv2d, nn.BatchNorm2d]] = []
    names = {module: name for name, module in model.named_modules()}

    def after_conv(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, Tensor):
            producers[id(output)] = (module, output)

    def before_any(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        for value in inputs:
            if isinstance(value, Tensor) and id(value) in producers:
                consumers.setdefault(id(value), []).append(module)
                conv = producers[id(value)][0]
                if _foldable(module) and conv.weight.shape[0] == module.num_features:
                    pairs.append((names[module], conv, module))

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(after_conv))
        if not list(module.children()) or _foldable(module):  # leaves, and norms with an activation inside
            handles.append(module.register_forward_pre_hook(before_any))
    try:
        with torch.no_grad():
            outputs = model(*example)
    finally:
        for handle in handles:
            handle.remove()
    shared = {id(producers[key][0]) for key, users in consumers.items() if len(users) > 1}
    folded: list[Folded] = []
    done: set[str] = set()
    for name, conv, norm in pairs:
        if name in done or id(conv) in shared:
            continue
        bias = None if conv.bias is None else conv.bias.detach().clone()
        folded.append(Folded(name, conv, conv.weight.detach().clone(), bias, norm))
        _fold(conv, norm)
        _replace(model, name, _after_norm(norm))
        done.add(name)
    return folded, outputs


@dataclass
class Folded:
    """One folded pair, with what it takes to undo it."""

    name: str  # the norm's name in the model
    conv: nn.Conv2d
    weight: Tensor
    bias: Tensor | None
    norm: nn.Module


def unfold(model: nn.Module, folded: list[Folded]) -> None:
    """Undo :func:`fold_batchnorm`: the convolutions' weights and the norms back in place."""
    with torch.no_grad():
        for record in folded:
            record.conv.weight.copy_(record.weight)
            if record.bias is None:
                record.conv.bias = None
            else:
                record.conv.bias.copy_(record.bias)
            _replace(model, record.name, record.norm)


def fold_for_inference(model: nn.Module, example: Tensor, tolerance: float = 1e-4) -> int:
    """Fold the model's batch norms (:func:`fold_batchnorm`) and check on ``example`` that its outputs are
    unchanged (to ``tolerance`` of their scale); where they are not (a convolution output used by something
    the hooks cannot see), undo it. Returns how many were folded and kept."""
    folded, outputs = _fold_seen(model, (example,))
    if not folded:
        return 0
    before = _flat_outputs(outputs)
    with torch.no_grad():
        after = _flat_outputs(model(example))
    for old, new in zip(before, after, strict=True):
        scale = max(1.0, float(old.abs().max())) if old.numel() else 1.0
        if old.shape != new.shape or (old.numel() and float((old - new).abs().max()) > tolerance * scale):
            unfold(model, folded)
            log.warning("batch-norm folding changed this model's outputs; it runs unfolded (a little slower)")
            return 0
    return len(folded)


def _flat_outputs(outputs: Any) -> list[Tensor]:
    if isinstance(outputs, Tensor):
        return [outputs.float()]
    return [value.float() for value in outputs if isinstance(value, Tensor)]


def _foldable(module: nn.Module) -> bool:
    known = type(module) is nn.BatchNorm2d or (BatchNormAct2d is not None and type(module) is BatchNormAct2d)
    return known and not module.training and module.running_mean is not None and module.affine


@torch.no_grad()
def _fold(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.ndim - 1))))
    new_bias = (bias - norm.running_mean) * scale + norm.bias
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)


def _after_norm(norm: nn.Module) -> nn.Module:
    """What is left of the norm once its affine map lives in the convolution: timm's activation, or nothing."""
    if BatchNormAct2d is not None and isinstance(norm, BatchNormAct2d):
        return nn.Sequential(norm.drop, norm.act)
    return nn.Identity()


def _replace(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, replacement)
