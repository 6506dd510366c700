"""What the reconstruction models (SSL-AE, DAAD) share: a convolutional encoder-decoder with skip connections,
and the scoring by reconstruction error instead of a memory bank.

Their anomaly map is a weighted sum of error terms (SSL-AE: the reconstruction error; DAAD: that and its
discriminator-feature distance), each standardised with its mean and standard deviation over the normal
training images, fitted at the end of fit (and, with the current weights, before every validation). The map is
then blurred and the image score taken exactly as for the bank models (:mod:`patchae.scoring.maps`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from patchae.errors import PatchAEError
from patchae.models.backbone import create_feature_extractor
from patchae.models.base import AnomalyModule
from patchae.scoring.maps import anomaly_maps, image_scores


def conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """Two 3x3 convolutions with BatchNorm and LeakyReLU; the first one strided."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.2, inplace=True),
    )


def pretrained_encoder(
    backbone: str, layers: Sequence[int], pretrained: bool, weights: str | None
) -> nn.Module:
    """A timm backbone whose stages ``layers`` sit at strides 2, 4, 8, ...: the encoder's levels 1, 2, ..."""
    encoder = create_feature_extractor(backbone, layers, pretrained=pretrained, weights=weights)
    strides = list(encoder.feature_info.reduction())
    if strides != [2 ** (i + 1) for i in range(len(strides))]:
        raise PatchAEError(
            f"model.encoder_layers={list(layers)} of {backbone} are at strides {strides}; the encoder needs "
            "consecutive stages at strides 2, 4, 8, ..., e.g. model.encoder_layers=[0,1,2,3]"
        )
    return encoder


def level_channels(channels: Sequence[int], encoder: nn.Module | None) -> list[int]:
    """Widths of the levels: ``channels``, or with a pretrained encoder level 0's and then its stages'."""
    if encoder is None:
        return [int(c) for c in channels]
    return [int(channels[0]), *encoder.feature_info.channels()]


class EncoderDecoder(nn.Module):
    """A U-Net-shaped autoencoder: level i has ``channels[i]`` channels at stride 2**i (level 0: full
    resolution, the last level: the bottleneck). Every skip connection and the bottleneck pass through the
    given module (identity by default; DAAD's block-wise memories), so what reaches the decoder is what those
    modules let through. The output is an image in the input's (normalised) units.

    With ``encoder`` (see :func:`pretrained_encoder`), its stages are levels 1, 2, ... and only level 0 (full
    resolution) is a convolution block of its own; ``channels`` then come from :func:`level_channels`."""

    def __init__(
        self,
        channels: Sequence[int],
        skips: bool = True,
        level_modules: Sequence[nn.Module] | None = None,
        encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        channels = level_channels(channels, encoder)
        if len(channels) < 2 or min(channels) < 1:
            raise PatchAEError(f"model.channels={channels} needs at least two positive widths (levels)")
        if level_modules is not None and len(level_modules) != len(channels):
            raise ValueError("one module per level (skips and bottleneck) is needed")
        self.channels, self.skips = channels, bool(skips)
        self.pretrained = encoder
        levels = 1 if encoder is not None else len(channels)
        self.encoder = nn.ModuleList(
            conv_block(3 if i == 0 else channels[i - 1], channels[i], stride=1 if i == 0 else 2)
            for i in range(levels)
        )
        self.level_modules = nn.ModuleList(level_modules or [nn.Identity() for _ in channels])
        skip_width = channels if self.skips else [0] * len(channels)
        self.decoder = nn.ModuleList(
            conv_block(channels[i + 1] + skip_width[i], channels[i]) for i in range(len(channels) - 1)
        )
        self.head = nn.Conv2d(channels[0], 3, 1)

    @property
    def stride(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def check_input(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise PatchAEError(f"expected a batch of RGB images (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-1] % self.stride or images.shape[-2] % self.stride:
            raise PatchAEError(
                f"image size {tuple(images.shape[-2:])} must be a multiple of {self.stride} (the coarsest "
                "level of model.channels, or memory block); change data.image_size / data.crop_size"
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = []
        x = images
        for block in self.encoder:
            x = block(x)
            features.append(x)
        if self.pretrained is not None:
            features += self.pretrained(images)
        x = self.level_modules[-1](features[-1])
        for i in reversed(range(len(self.decoder))):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            if self.skips:
                x = torch.cat([x, self.level_modules[i](features[i])], dim=1)
            x = self.decoder[i](x)
        return self.head(x)


def squared_error_map(images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """(B, H, W) squared error, averaged over the channels."""
    return (images - reconstruction).pow(2).mean(dim=1)


class ReconstructionModule(AnomalyModule):
    """A model that scores by its own error terms (``error_terms``), standardised on normal training images.

    Subclasses set ``term_names`` and implement ``error_terms(images) -> (B, T, H, W)`` at input resolution.
    """

    scores_by_bank = False
    term_names: tuple[str, ...] = ("reconstruction",)

    def __init__(
        self,
        term_weights: Sequence[float],
        blur_sigma: float = 4.0,
        threshold_method: str = "f1",
        threshold_quantile: float = 0.99,
        threshold_value: float | None = None,
        image_score: str = "max",
        top_k: float = 0.01,
    ) -> None:
        if image_score == "reweight":
            raise PatchAEError(
                "scoring.image_score=reweight needs a memory bank; reconstruction models take max or topk"
            )
        super().__init__(
            blur_sigma=blur_sigma,
            threshold_method=threshold_method,
            threshold_quantile=threshold_quantile,
            threshold_value=threshold_value,
            image_score=image_score,
            top_k=top_k,
        )
        if len(term_weights) != len(self.term_names) or min(term_weights) < 0 or sum(term_weights) <= 0:
            raise PatchAEError(
                f"term weights {list(term_weights)} must be {len(self.term_names)} non-negative numbers "
                f"({', '.join(self.term_names)}), not all 0"
            )
        self.register_buffer("term_weights", torch.tensor([float(w) for w in term_weights]))
        # Mean and standard deviation of each term over the normal training pixels; std 0 = not fitted yet.
        self.register_buffer("term_mean", torch.zeros(len(self.term_names)))
        self.register_buffer("term_std", torch.zeros(len(self.term_names)))

    def error_terms(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def is_fitted(self) -> bool:
        return bool((self.term_std > 0).all())

    def check_fitted(self) -> None:
        if not self.is_fitted:
            raise PatchAEError(
                "this model has no normal-image statistics; train it first (they are fitted at the end of fit)"
            )

    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) anomaly map before the blur: the weighted sum of the standardised error terms."""
        terms = self.error_terms(images)
        standard = (terms - self.term_mean.view(1, -1, 1, 1)) / self.term_std.view(1, -1, 1, 1)
        return (standard * self.term_weights.view(1, -1, 1, 1)).sum(dim=1)

    def score(
        self, images: torch.Tensor, bank: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps (B, H, W) and image scores (B,); ``bank`` is ignored (there is none)."""
        maps = anomaly_maps(self.patch_scores(images), images.shape[-2:], self.hparams.blur_sigma)
        return maps, image_scores(maps, self.image_score, self.top_k)

    @torch.no_grad()
    def fit_normal_statistics(self, loader: Any) -> None:
        """Mean and std of every error term over all pixels of the images of ``loader`` (normal ones)."""
        was_training = self.training
        self.eval()
        count, total, squares = 0, torch.zeros(len(self.term_names)), torch.zeros(len(self.term_names))
        for batch in loader:
            terms = self.error_terms(batch["image"].to(self.device)).double().cpu()
            count += terms.numel() // terms.shape[1]
            total += terms.sum(dim=(0, 2, 3))
            squares += terms.pow(2).sum(dim=(0, 2, 3))
        if count == 0:
            raise PatchAEError("no normal training images to fit the anomaly-map statistics on")
        mean = total / count
        std = (squares / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-12)
        self.term_mean = mean.float().to(self.term_mean.device)
        self.term_std = std.float().to(self.term_std.device)
        self.normal_scores = torch.empty(0)  # scores under the old statistics are stale
        self.train(was_training)

    def build_encoder(self) -> nn.Module | None:
        """The pretrained encoder the hyperparameters name (``backbone`` a timm model), or None (scratch)."""
        hparams = self.hparams
        if hparams.backbone == "scratch":
            return None
        return pretrained_encoder(
            hparams.backbone, hparams.encoder_layers, hparams.pretrained, hparams.weights
        )

    def parameter_groups(self, network: nn.Module) -> list[dict[str, Any]]:
        """The network's parameters at ``lr``, a pretrained encoder's at ``encoder_lr``."""
        encoder = getattr(network, "pretrained", None)
        if encoder is None:
            return [{"params": list(network.parameters()), "lr": self.hparams.lr}]
        own = {id(p) for p in encoder.parameters()}
        rest = [p for p in network.parameters() if id(p) not in own]
        return [
            {"params": rest, "lr": self.hparams.lr},
            {"params": list(encoder.parameters()), "lr": self.hparams.encoder_lr},
        ]

    def train(self, mode: bool = True) -> ReconstructionModule:
        super().train(mode)
        self.keep_encoder_batchnorm()
        return self

    def on_train_epoch_start(self) -> None:
        self.keep_encoder_batchnorm()  # Lightning does not call train() when fitting starts

    def keep_encoder_batchnorm(self) -> None:
        """A pretrained encoder keeps its BatchNorm statistics: small batches would make poor ones."""
        encoder = getattr(getattr(self, "model", None), "pretrained", None)
        if encoder is not None:
            for module in encoder.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def on_fit_start(self) -> None:
        if getattr(self.trainer.datamodule, "augment", None) is not None:
            raise PatchAEError(
                f"{type(self).__name__} trains on clean normal images, but the data adds CutPaste defects; "
                "add augment=none"
            )

    # Validation scores with statistics fitted on validation's training images, with the current weights.
    def on_validation_epoch_start(self) -> None:
        self.val_metrics.reset()
        self.fit_normal_statistics(self.trainer.datamodule.val_bank_dataloader())
