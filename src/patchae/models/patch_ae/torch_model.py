"""Patch AE as a plain torch module: the network, the embedding its memory bank holds, and the bank scorer."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

from patchae.errors import PatchAEError
from patchae.models.features import locally_aware_features
from patchae.models.patch_ae.network import PatchAE
from patchae.models.torch_model import BankModel
from patchae.scoring import BankScorer

# What the bank holds for Patch AE, as blocks joined by '+': representation (R, the paper), features (the
# fine-tuned backbone's stage maps with PatchCore's 3x3 local averaging: R's input) and pretrained (the same
# from a frozen copy of the pretrained backbone: PatchCore's features). Several blocks are each scaled to unit
# mean norm on the training images, so that none outweighs the others.
BANK_BLOCKS = ("representation", "features", "pretrained")


def bank_blocks(bank_features: str) -> list[str]:
    blocks = bank_features.split("+")
    if not blocks or any(block not in BANK_BLOCKS for block in blocks) or len(set(blocks)) < len(blocks):
        raise PatchAEError(
            f"model.bank_features={bank_features} is unknown; join distinct blocks of {', '.join(BANK_BLOCKS)} "
            "with '+', e.g. representation or representation+pretrained"
        )
    return blocks


class PatchAEModel(BankModel):
    """The Patch AE network (trained by the Lightning wrapper) and what its bank is made of.

    ``bank_features`` names the blocks (:data:`BANK_BLOCKS`); ``frozen_backbone`` says the backbone is not
    fine-tuned, so the ``pretrained`` block can read it instead of keeping a frozen copy of it."""

    def __init__(
        self, network: PatchAE, bank_features: str, scorer: BankScorer, frozen_backbone: bool = False
    ) -> None:
        super().__init__(scorer)
        self.network = network
        self.bank_blocks = bank_blocks(bank_features)
        # The pretrained features for the bank: a frozen copy of the backbone when fine-tuning changes it.
        self.pretrained_backbone = (
            copy.deepcopy(network.backbone).requires_grad_(False).eval()
            if "pretrained" in self.bank_blocks and not frozen_backbone
            else None
        )
        if len(self.bank_blocks) > 1:
            # Mean norm of each block on the training images: see calibrate_embedding().
            self.register_buffer("block_norms", torch.ones(len(self.bank_blocks)))

    def embed(self, images: Tensor) -> Tensor:
        network = self.network
        network.check_input(images)
        features = network.backbone(images)
        blocks = []
        for block in self.bank_blocks:
            if block == "representation":
                representation = network.compress_features(features)
                if network.aggregate == "representation":
                    representation = F.avg_pool2d(representation, 3, stride=1, padding=1)
                blocks.append(representation)
            elif block == "features":
                blocks.append(locally_aware_features(features, 3))
            else:
                pretrained = (
                    features if self.pretrained_backbone is None else self.pretrained_backbone(images)
                )
                blocks.append(locally_aware_features(pretrained, 3))
        if len(blocks) == 1:
            return blocks[0]
        return torch.cat([block / norm for block, norm in zip(blocks, self.block_norms, strict=True)], dim=1)

    def calibrate_embedding(self, vectors: Tensor) -> Tensor:
        """With several bank blocks: rescale each to unit mean norm on these training vectors (embedded with
        the current norms) and remember the scale for the queries."""
        if len(self.bank_blocks) == 1:
            return vectors
        widths = {"representation": self.network.c3, "features": self.network.concat_channels}
        widths["pretrained"] = widths["features"]
        blocks = vectors.split([widths[block] for block in self.bank_blocks], dim=1)
        factors = [block.norm(dim=1).mean().clamp_min(1e-12) for block in blocks]
        self.block_norms = self.block_norms * torch.stack(factors).to(self.block_norms)
        return torch.cat([block / factor for block, factor in zip(blocks, factors, strict=True)], dim=1)

    def train(self, mode: bool = True) -> PatchAEModel:
        super().train(mode)
        if self.pretrained_backbone is not None:
            self.pretrained_backbone.eval()  # the pretrained features, with their BatchNorm statistics
        return self
