"""DAAD as a plain torch module: the block-wise-memory autoencoder, its discriminator (whose features score
too) and the scorer of their standardised error terms."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from patchae.models.daad.network import DAADNetwork, Discriminator
from patchae.models.reconstruction import squared_error_map
from patchae.models.torch_model import ReconstructionModel
from patchae.scoring import StatisticsScorer
from patchae.settings import ScoringSettings

TERM_NAMES = ("reconstruction", "discriminator_features")


class DAADModel(ReconstructionModel):
    """Two error terms: the squared reconstruction error and the squared distance of the discriminator's
    features of input and reconstruction (upsampled to the input), weighted by ``term_weights``."""

    def __init__(
        self,
        network: DAADNetwork,
        discriminator: Discriminator,
        term_weights: Sequence[float],
        scoring: ScoringSettings,
        error_statistics: str = "global",
    ) -> None:
        super().__init__(StatisticsScorer(TERM_NAMES, term_weights, scoring, error_statistics))
        self.network = network
        self.discriminator = discriminator

    def error_terms(self, images: Tensor) -> Tensor:
        self.network.check_input(images)
        images = self.network.standardize(images)
        reconstruction = self.network(images)
        _, real = self.discriminator(images)
        _, fake = self.discriminator(reconstruction)
        features = (real - fake).pow(2).mean(dim=1, keepdim=True)
        features = F.interpolate(features, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([squared_error_map(images, reconstruction).unsqueeze(1), features], dim=1)
