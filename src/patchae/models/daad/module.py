"""DAAD's Lightning wrapper: adversarial training of the block-wise-memory autoencoder, scoring by its error
and by the discriminator's features."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from patchae.data.lighting import LightingJitter
from patchae.errors import PatchAEError
from patchae.models.base import ReconstructionModule
from patchae.models.daad.network import DAADNetwork, Discriminator
from patchae.models.daad.torch_model import DAADModel


class DAADModule(ReconstructionModule):
    """DAAD: the autoencoder learns to rebuild normal images (L2) through its block-wise memories while a
    discriminator learns to tell input from reconstruction, and the autoencoder to fool it and to match the
    discriminator's intermediate features of the input (alignment); a small entropy penalty keeps the memory
    addressing sparse. Anomaly map: the squared reconstruction error plus the squared
    distance of the discriminator's features of input and reconstruction (upsampled), each standardised on
    normal training images and weighted by ``reconstruction_weight`` / ``feature_weight``. Trains on clean
    normal images (``augment=none``, set by the model's config)."""

    legacy_state_keys = (
        ("model.", "model.network."),
        ("discriminator.", "model.discriminator."),
        ("term_weights", "model.scorer.term_weights"),
        ("term_mean", "model.scorer.term_mean"),
        ("term_std", "model.scorer.term_std"),
        ("memory_bank", None),  # the empty bank buffer every model had
    )

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        block_sizes: Sequence[int] = (8, 4, 4, 2, 1),
        memory_items: int = 100,
        temperature: float = 0.1,
        discriminator_width: int = 32,
        adversarial_weight: float = 0.01,
        alignment_weight: float = 0.0,
        entropy_weight: float = 2e-4,
        reconstruction_weight: float = 1.0,
        feature_weight: float = 1.0,
        lr: float = 3e-3,
        lr_schedule: str = "constant",
        discriminator_lr: float = 1e-4,
        backbone: str = "scratch",
        encoder_layers: Sequence[int] = (0, 1, 2, 3),
        pretrained: bool = True,
        weights: str | None = None,
        encoder_lr: float = 1e-4,
        lighting: Mapping[str, Any] | None = None,
        per_image_intensity: bool = False,
        seed: int = 0,
        error_statistics: str = "global",
        scoring: Mapping[str, Any] | None = None,
        threshold: Mapping[str, Any] | None = None,
        preprocessing: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(scoring=scoring, threshold=threshold, preprocessing=preprocessing)
        self.save_hyperparameters()
        if min(adversarial_weight, alignment_weight, entropy_weight) < 0:
            raise PatchAEError(
                "model.adversarial_weight, model.alignment_weight and model.entropy_weight must be >= 0"
            )
        self.automatic_optimization = False  # two optimisers, stepped in turn
        self.lighting = LightingJitter(**(lighting or {}))
        network = DAADNetwork(
            channels,
            block_sizes,
            memory_items,
            temperature,
            self.build_encoder(),
            per_image_intensity=per_image_intensity,
        )
        weights = (reconstruction_weight, feature_weight)
        self.model = DAADModel(
            network, Discriminator(discriminator_width), weights, self.scoring, error_statistics
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        network, discriminator = self.model.network, self.model.discriminator
        network.check_input(images)
        images = self.vary_lighting(images, self.lighting, self.hparams.seed, self.global_step)
        images = network.standardize(images)
        ae_optimizer, discriminator_optimizer = self.optimizers()
        reconstruction = network(images)
        entropy = network.entropy()

        # Discriminator: inputs are real, reconstructions fake.
        real_logits, _ = discriminator(images)
        fake_logits, _ = discriminator(reconstruction.detach())
        discriminator_loss = F.binary_cross_entropy_with_logits(
            real_logits, torch.ones_like(real_logits)
        ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        discriminator_optimizer.zero_grad()
        self.manual_backward(discriminator_loss)
        discriminator_optimizer.step()

        terms = self.autoencoder_losses(images, reconstruction, entropy)
        loss = terms["loss"]
        ae_optimizer.zero_grad()
        self.manual_backward(loss)
        ae_optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:  # manual optimisation: Lightning leaves the stepping to us
            scheduler.step()

        size = images.shape[0]
        self.log(
            "train/loss", terms["reconstruction"], on_step=True, on_epoch=True, prog_bar=True, batch_size=size
        )
        self.log("train/alignment_loss", terms["alignment"], on_epoch=True, batch_size=size)
        self.log("train/discriminator_loss", discriminator_loss, on_epoch=True, batch_size=size)
        self.log("train/memory_entropy", entropy, on_epoch=True, batch_size=size)
        return loss

    def autoencoder_losses(
        self, images: torch.Tensor, reconstruction: torch.Tensor, entropy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The autoencoder's objective and its terms: rebuild the input (L2), fool the discriminator, align the
        discriminator's intermediate features of input and reconstruction (E ||f_D(x) - f_D(x^)||_2 over its
        feature locations, the paper's feature alignment; the input's side is a fixed target), and address few
        memory items (entropy)."""
        discriminator = self.model.discriminator
        fooled_logits, fake_features = discriminator(reconstruction)
        with torch.no_grad():
            _, real_features = discriminator(images)
        terms = {
            "reconstruction": F.mse_loss(reconstruction, images),
            "adversarial": F.binary_cross_entropy_with_logits(fooled_logits, torch.ones_like(fooled_logits)),
            "alignment": torch.linalg.vector_norm(real_features - fake_features, dim=1).mean(),
            "entropy": entropy,
        }
        hparams = self.hparams
        terms["loss"] = (
            terms["reconstruction"]
            + hparams.adversarial_weight * terms["adversarial"]
            + hparams.alignment_weight * terms["alignment"]
            + hparams.entropy_weight * terms["entropy"]
        )
        return terms

    def configure_optimizers(self) -> Any:
        # Adam with beta1 = 0.5, the usual choice for adversarial training.
        optimizers = [
            torch.optim.Adam(self.parameter_groups(), betas=(0.5, 0.999)),
            torch.optim.Adam(
                self.model.discriminator.parameters(), lr=self.hparams.discriminator_lr, betas=(0.5, 0.999)
            ),
        ]
        # lr_schedule applies to the autoencoder; the discriminator keeps its (small) rate.
        scheduler = self.learning_rate_schedule(optimizers[0])
        return optimizers if scheduler is None else (optimizers, [scheduler])
