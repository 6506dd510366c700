"""SSL-AE as a plain torch module: the autoencoder and the scorer of its standardised reconstruction error."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from patchae.models.reconstruction import check_inpainting, inpainted, squared_error_map
from patchae.models.ssl_ae.network import SSLAutoencoder
from patchae.models.torch_model import ReconstructionModel
from patchae.scoring import StatisticsScorer
from patchae.settings import ScoringSettings

TERM_NAMES = ("reconstruction",)


class SSLAEModel(ReconstructionModel):
    """One error term: the squared reconstruction error of the (uncorrupted) input, averaged over channels (in
    the image's own intensity frame with ``per_image_intensity``): the papers' map. With ``inpaint_cells`` the
    reconstruction is instead the inpainted one (:func:`patchae.models.reconstruction.inpainted`), its error
    averaged over the cell sizes: our option, ``grid ** 2`` network passes per cell size."""

    def __init__(
        self,
        network: SSLAutoencoder,
        scoring: ScoringSettings,
        inpaint_cells: Sequence[int] = (),
        inpaint_grid: int = 3,
        error_statistics: str = "global",
    ) -> None:
        super().__init__(StatisticsScorer(TERM_NAMES, (1.0,), scoring, error_statistics))
        self.network = network
        self.inpaint_cells, self.inpaint_grid = check_inpainting(inpaint_cells, inpaint_grid)

    def error_terms(self, images: Tensor) -> Tensor:
        self.network.check_input(images)
        images = self.network.standardize(images)
        if not self.inpaint_cells:
            return squared_error_map(images, self.network(images)).unsqueeze(1)
        errors = [
            squared_error_map(images, inpainted(self.network, images, cell, self.inpaint_grid))
            for cell in self.inpaint_cells
        ]
        return torch.stack(errors).mean(dim=0).unsqueeze(1)
