"""Several processes (``trainer=ddp``): gather what each one evaluated, share what one of them built.

Under DDP, Lightning gives every process a share of the validation and test splits through a
``DistributedSampler``, which pads the split with repeated samples when it does not divide by the number of
processes. What a process scored is therefore gathered with the dataset index of every sample, and each
index is kept once (:func:`first_of_each`), so metrics cover the whole split exactly as on one device.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy as LightningDDPStrategy


def world_size() -> int:
    """Number of processes of the current run (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every process, in rank order (``[obj]`` in a single process). Tensors stay on the CPU."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copies process ``src``'s buffers (memory bank, fitted statistics) into every process's ``module``.

    DDP keeps parameters equal, but what each process computes after fit (the coreset) may differ in the last
    bits across devices; with this, every process scores with exactly the same model."""
    if world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=src)


def first_of_each(indices: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of every distinct value of ``indices``, ordered by that value."""
    order = torch.argsort(indices, stable=True)
    ordered = indices[order]
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return order[first]


class DDPStrategy(LightningDDPStrategy):
    """Lightning's DDP (``trainer=ddp``), except that a model with nothing to train (PatchCore: a frozen
    backbone) is left unwrapped: torch's DistributedDataParallel refuses a module without trainable
    parameters, and such a model has no gradients to synchronise. The processes still share the test split."""

    def configure_ddp(self) -> None:
        if any(parameter.requires_grad for parameter in self.model.parameters()):
            super().configure_ddp()
