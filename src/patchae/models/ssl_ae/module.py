"""SSL-AE's Lightning wrapper: trains the autoencoder to undo structured corruption, scores by its error."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from patchae.data.corruption import Corruption
from patchae.data.datamodule import seeded_generator
from patchae.models.reconstruction import ReconstructionModule, squared_error_map
from patchae.models.ssl_ae.network import SSLAutoencoder


class SSLAEModule(ReconstructionModule):
    """SSL-AE: every training image is corrupted (:class:`patchae.data.corruption.Corruption`, regions filled
    from the other images of the batch, textures, noise or a colour, plus Gaussian noise) and the autoencoder
    is trained to give back the clean image (L2). The anomaly map is the standardised squared reconstruction
    error of the uncorrupted input. Training data must come without CutPaste (``augment=none``, the model's
    config sets it): the clean target would otherwise contain the defect."""

    term_names = ("reconstruction",)

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        skips: bool = True,
        corruption: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        backbone: str = "scratch",
        encoder_layers: Sequence[int] = (0, 1, 2, 3),
        pretrained: bool = True,
        weights: str | None = None,
        encoder_lr: float = 1e-4,
        blur_sigma: float = 4.0,
        threshold_method: str = "f1",
        threshold_quantile: float = 0.99,
        threshold_value: float | None = None,
        image_score: str = "max",
        top_k: float = 0.01,
        image_size: int = 256,
        crop_size: int | None = None,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        resize_mode: str = "squash",  # preprocessing, saved for predict.py (see ImageTransform)
    ) -> None:
        super().__init__(
            (1.0,), blur_sigma, threshold_method, threshold_quantile, threshold_value, image_score, top_k
        )
        self.save_hyperparameters()
        self.corruption = Corruption(**(corruption or {}))
        self.model = SSLAutoencoder(channels, skips, encoder=self.build_encoder())
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def error_terms(self, images: torch.Tensor) -> torch.Tensor:
        self.model.check_input(images)
        return squared_error_map(images, self.model(images)).unsqueeze(1)

    def corrupt(self, images: torch.Tensor, step: int) -> torch.Tensor:
        """The batch (normalised) with each image corrupted; fills of kind ``image`` copy from the next image of
        the batch. Drawn from ``(seed, step, index)``: the same every run."""
        unit = images * self.pixel_std + self.pixel_mean
        corrupted = [
            self.corruption(
                unit[i], seeded_generator(self.hparams.seed, step, i), source=unit[(i + 1) % len(unit)]
            )[0]
            for i in range(len(unit))
        ]
        return (torch.stack(corrupted) - self.pixel_mean) / self.pixel_std

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        self.model.check_input(images)
        loss = F.mse_loss(self.model(self.corrupt(images, self.global_step)), images)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=images.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameter_groups(self.model), weight_decay=self.hparams.weight_decay)
