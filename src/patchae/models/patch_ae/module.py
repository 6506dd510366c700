"""Patch AE's Lightning wrapper: trains the encoder by patch-wise reconstruction; scoring is its torch model's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from patchae.errors import PatchAEError
from patchae.models.base import AnomalyModule
from patchae.models.patch_ae.network import PatchAE, patch_ae_loss
from patchae.models.patch_ae.torch_model import PatchAEModel

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


class PatchAEModule(AnomalyModule):
    """Patch AE: fine-tunes the encoder by patch-wise reconstruction of CutPaste-augmented normal images.

    The keyword defaults are the paper's (bank on R, no local averaging), which checkpoints saved before these
    options existed rely on; the recommended settings are conf/model/patch_ae.yaml's.
    """

    legacy_state_keys = (
        ("model.", "model.network."),
        ("pretrained_backbone.", "model.pretrained_backbone."),
        ("block_norms", "model.block_norms"),
        ("memory_bank", "model.scorer.bank"),
    )

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[int] = (2, 3),
        pretrained: bool = True,
        weights: str | None = None,
        c3: int | None = None,
        decoder_hidden: int | None = None,
        activation: str = "relu",
        freeze_backbone: bool = False,
        freeze_batchnorm: bool = True,
        alpha: float = 0.5,
        optimizer: str = "adam",
        lr: float = 1e-4,
        backbone_lr: float | None = None,
        weight_decay: float = 0.0,
        aggregate: str = "none",
        bank_features: str = "representation",
        warmup_epochs: int = 0,
        val_bank_size: int = 20000,
        scoring: Mapping[str, Any] | None = None,
        bank: Mapping[str, Any] | None = None,
        threshold: Mapping[str, Any] | None = None,
        preprocessing: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(scoring, bank, threshold, preprocessing, val_bank_size)
        # Everything, preprocessing included, goes into the checkpoint so a saved model predicts on its own.
        self.save_hyperparameters()
        if optimizer not in OPTIMIZERS:
            raise PatchAEError(f"optimizer.name={optimizer} is unknown; choose one of {sorted(OPTIMIZERS)}")
        if not 0.0 <= alpha <= 1.0:
            raise PatchAEError(f"loss.alpha={alpha} must be in [0, 1]")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise PatchAEError(f"optimizer.warmup_epochs={warmup_epochs!r} must be an integer >= 0")
        network = PatchAE(backbone, layers, pretrained, weights, c3, decoder_hidden, activation, aggregate)
        if freeze_backbone:
            network.backbone.requires_grad_(False)
        self.model = PatchAEModel(network, bank_features, self.bank_scorer(), frozen_backbone=freeze_backbone)

    @property
    def variant(self) -> str:
        """What this Patch AE is, for results: "paper" (bank of R, no local averaging, as Cui et al.), else the
        bank it holds instead, e.g. "feature bank" (this framework's default)."""
        if self.hparams.bank_features == "representation" and self.hparams.aggregate == "none":
            return "paper"
        names = {"representation": "R", "features": "feature", "pretrained": "pretrained-feature"}
        bank = "+".join(names[block] for block in self.model.bank_blocks)
        averaged = ", R averaged" if self.hparams.aggregate == "representation" and "R" in bank else ""
        return f"{bank} bank{averaged}"

    def train(self, mode: bool = True) -> PatchAEModule:
        super().train(mode)
        if mode:
            self.keep_pretrained_batchnorm()
        return self

    def keep_pretrained_batchnorm(self) -> None:
        """Small anomaly-detection batches make poor BatchNorm statistics: keep the pretrained ones."""
        if self.model.pretrained_backbone is not None:
            self.model.pretrained_backbone.eval()
        if self.hparams.freeze_batchnorm or self.hparams.freeze_backbone:
            for module in self.model.network.backbone.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def on_train_epoch_start(self) -> None:
        # Lightning does not call train() when fitting starts, so train() alone would leave them updating.
        self.keep_pretrained_batchnorm()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        network = self.model.network
        network.check_input(images)
        _, reconstruction = network(images)
        # The target is the image as the backbone sees it (normalised with its mean / std), so the raw term of
        # Eq. 3 is in those units. Measured on MVTec bottle (EfficientNet-Lite0, 3 epochs), de-normalised [0, 1]
        # pixels did worse: pixel AUROC 95.3 vs 97.1 %, AUPRO 88.5 vs 91.8 %.
        loss = patch_ae_loss(reconstruction, images, network.stride, self.hparams.alpha)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=images.shape[0])
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        backbone_lr = self.hparams.backbone_lr if self.hparams.backbone_lr is not None else self.hparams.lr
        network = self.model.network
        head = [p for name, p in network.named_parameters() if not name.startswith("backbone.")]
        groups = [{"params": head, "lr": self.hparams.lr}]
        backbone = [p for p in network.backbone.parameters() if p.requires_grad]
        if backbone:
            groups.append({"params": backbone, "lr": backbone_lr})
        optimizer = OPTIMIZERS[self.hparams.optimizer](
            groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        # Warm-up: the backbone stands still while the freshly initialised head settles, so the head's first,
        # large gradients do not wash out the pretrained features.
        warmup = self.hparams.warmup_epochs
        factors = [lambda epoch: 1.0] + [lambda epoch: 0.0 if epoch < warmup else 1.0] * (len(groups) - 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
