"""SSL-AE as a plain torch module: the autoencoder and the scorer of its standardised reconstruction error."""

from __future__ import annotations

from torch import Tensor

from patchae.models.reconstruction import squared_error_map
from patchae.models.ssl_ae.network import SSLAutoencoder
from patchae.models.torch_model import ReconstructionModel
from patchae.scoring import StatisticsScorer
from patchae.settings import ScoringSettings

TERM_NAMES = ("reconstruction",)


class SSLAEModel(ReconstructionModel):
    """One error term: the squared reconstruction error of the (uncorrupted) input, averaged over channels (in
    the image's own intensity frame with ``per_image_intensity``)."""

    def __init__(self, network: SSLAutoencoder, scoring: ScoringSettings) -> None:
        super().__init__(StatisticsScorer(TERM_NAMES, (1.0,), scoring))
        self.network = network

    def error_terms(self, images: Tensor) -> Tensor:
        self.network.check_input(images)
        images = self.network.standardize(images)
        return squared_error_map(images, self.network(images)).unsqueeze(1)
