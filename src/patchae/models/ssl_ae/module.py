"""SSL-AE's Lightning wrapper: trains the autoencoder to undo structured corruption, scores by its error."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from patchae.data.corruption import Corruption
from patchae.data.datamodule import seeded_generator
from patchae.data.lighting import LightingJitter
from patchae.errors import PatchAEError
from patchae.models.base import ReconstructionModule
from patchae.models.reconstruction import cell_phases, hide, squared_error_map
from patchae.models.ssl_ae.network import SSLAutoencoder
from patchae.models.ssl_ae.torch_model import SSLAEModel


class SSLAEModule(ReconstructionModule):
    """SSL-AE: every training image is corrupted (:class:`patchae.data.corruption.Corruption`, regions filled
    from the other images of the batch, textures, noise or a colour, plus Gaussian noise) and the autoencoder
    is trained (L2) to give back the clean image inside the corrupted regions and its input, noise included,
    everywhere else (``corruption.noise_in_target``, the follow-up's; false: the clean image everywhere). The
    anomaly map is the standardised squared reconstruction error of the uncorrupted input, averaged over the
    colour channels; with ``inpaint_cells`` (our option) that of the inpainted input, each cell rebuilt while
    hidden (:func:`patchae.models.reconstruction.inpainted`); ``inpaint_training`` (our option, RIAD-style) is the
    share of training images that also get such cells hidden, so that the model learns the inpainting it is then
    scored by. Training data must come without CutPaste (``augment=none``, the model's config sets it): the target
    would otherwise contain the defect."""

    legacy_state_keys = (
        ("model.", "model.network."),
        ("term_weights", "model.scorer.term_weights"),
        ("term_mean", "model.scorer.term_mean"),
        ("term_std", "model.scorer.term_std"),
        ("memory_bank", None),  # the empty bank buffer every model had
    )

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        skips: bool | Sequence[int] = True,
        skip_merge: str = "concat",
        bottleneck_dilations: Sequence[int] = (),
        fold: int = 1,
        corruption: dict[str, Any] | None = None,
        region_weight: float = 1.0,
        lr: float = 1e-3,
        lr_schedule: str = "constant",
        weight_decay: float = 0.0,
        seed: int = 0,
        backbone: str = "scratch",
        encoder_layers: Sequence[int] = (0, 1, 2, 3),
        pretrained: bool = True,
        weights: str | None = None,
        encoder_lr: float = 1e-4,
        lighting: Mapping[str, Any] | None = None,
        per_image_intensity: bool = False,
        inpaint_cells: Sequence[int] = (),
        inpaint_grid: int = 3,
        inpaint_training: float = 0.0,
        error_statistics: str = "global",
        scoring: Mapping[str, Any] | None = None,
        threshold: Mapping[str, Any] | None = None,
        preprocessing: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(scoring=scoring, threshold=threshold, preprocessing=preprocessing)
        self.save_hyperparameters()
        if not region_weight > 0:
            raise PatchAEError(
                f"model.region_weight={region_weight} must be positive (1: plain mean squared error)"
            )
        if not 0.0 <= inpaint_training <= 1.0 or (inpaint_training > 0 and not inpaint_cells):
            raise PatchAEError(
                f"model.inpaint_training={inpaint_training} must be a share in [0, 1], and above 0 it needs the "
                f"cell sides to hide in model.inpaint_cells (now {list(inpaint_cells)}), e.g. model.inpaint_cells=[4,8]"
            )
        self.corruption = Corruption(**(corruption or {}))
        self.lighting = LightingJitter(**(lighting or {}))
        network = SSLAutoencoder(
            channels,
            skips,
            encoder=self.build_encoder(),
            per_image_intensity=per_image_intensity,
            skip_merge=skip_merge,
            bottleneck_dilations=bottleneck_dilations,
            fold=fold,
        )
        self.model = SSLAEModel(network, self.scoring, inpaint_cells, inpaint_grid, error_statistics)
        mean, std = self.preprocessing.mean, self.preprocessing.std
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def corrupt(self, images: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(inputs, targets, masks)`` of a (normalised) batch: each image corrupted, what the model is to give
        back and the corrupted pixels (:meth:`patchae.data.corruption.Corruption.training_pair`); fills of kind
        ``image`` copy from the next image of the batch. Drawn from ``(seed, step, index)``: the same every run."""
        unit = images * self.pixel_std + self.pixel_mean
        pairs = [
            self.corruption.training_pair(
                unit[i], seeded_generator(self.hparams.seed, step, i), source=unit[(i + 1) % len(unit)]
            )
            for i in range(len(unit))
        ]
        inputs, targets, masks = (torch.stack([pair[k] for pair in pairs]) for k in (0, 1, 2))
        return (
            (inputs - self.pixel_mean) / self.pixel_std,
            (targets - self.pixel_mean) / self.pixel_std,
            masks,
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        self.model.network.check_input(images)
        inputs, targets, masks = self.training_batch(images, self.global_step)
        loss = self.reconstruction_loss(self.model.network(inputs), targets, masks)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=images.shape[0])
        return loss

    def training_batch(
        self, images: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(inputs, targets, masks)`` of a training batch: lit, corrupted, in the input's intensity frame (what
        error_terms compares at test time) and, with ``inpaint_training``, with hidden cells."""
        network = self.model.network
        lit = self.vary_lighting(images, self.lighting, self.hparams.seed, step)
        corrupted, targets, masks = self.corrupt(lit, step)
        inputs, targets = network.standardize(corrupted), network.standardize(targets, reference=corrupted)
        if self.hparams.inpaint_training > 0:
            clean = network.standardize(lit, reference=corrupted)
            inputs, targets, masks = self.hide_cells(inputs, targets, masks, clean, step)
        return inputs, targets, masks

    def hide_cells(
        self, inputs: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor, clean: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(inputs, targets, masks)`` with, in a share ``inpaint_training`` of the images, the cells of one random
        pass of :func:`patchae.models.reconstruction.inpainted` (a random size of ``inpaint_cells``) hidden as
        scoring hides them, their target the clean image. Drawn from ``(seed, step, index, 1)``."""
        inputs, targets, masks = inputs.clone(), targets.clone(), masks.clone()
        model = self.model
        for i in range(len(inputs)):
            rng = seeded_generator(self.hparams.seed, step, i, 1)
            if torch.rand((), generator=rng).item() >= self.hparams.inpaint_training:
                continue
            cell = model.inpaint_cells[int(torch.randint(len(model.inpaint_cells), (), generator=rng))]
            turn = int(torch.randint(model.inpaint_grid**2, (), generator=rng))
            hidden = cell_phases(inputs, cell, model.inpaint_grid) == turn
            inputs[i] = hide(inputs[i : i + 1], hidden)[0]
            targets[i] = torch.where(hidden, clean[i], targets[i])
            masks[i] = torch.where(hidden, torch.ones_like(masks[i]), masks[i])
        return inputs, targets, masks

    def reconstruction_loss(
        self, outputs: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor
    ) -> torch.Tensor:
        """The weighted mean of the squared-error map the scorer uses, the corrupted pixels weighted
        ``region_weight`` times the others (1: plain mean squared error)."""
        weights = 1.0 + (self.hparams.region_weight - 1.0) * masks[:, 0]
        return (squared_error_map(targets, outputs) * weights).sum() / weights.sum()

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(self.parameter_groups(), weight_decay=self.hparams.weight_decay)
        scheduler = self.learning_rate_schedule(optimizer)
        if scheduler is None:
            return {"optimizer": optimizer}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
