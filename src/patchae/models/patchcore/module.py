"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022) as a baseline.

No training: the memory bank is built from the pretrained backbone's locally aware patch features, with the
same coreset, search and scoring as Patch AE, so a comparison isolates what Patch AE's fine-tuning adds.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from patchae.models.base import AnomalyModule
from patchae.models.patchcore.torch_model import PatchCoreModel

# PatchCore has nothing to optimise; Lightning's note about it is expected, not a problem.
warnings.filterwarnings("ignore", message=r".*configure_optimizers.* returned `None`.*")


class PatchCoreModule(AnomalyModule):
    """PatchCore on a frozen pretrained backbone: locally aware patch features, greedy coreset, NN scoring.

    ``requires_training`` is False: the runner skips the fit loop and the memory bank is built at the end
    of fit, exactly as for Patch AE. Image scores are the maximum of the anomaly map (as Patch AE), or
    PatchCore's re-weighted score with ``reweight=True`` (the same as ``scoring.image_score=reweight``).
    """

    requires_training = False
    legacy_state_keys = (("backbone.", "model.backbone."), ("memory_bank", "model.scorer.bank"))

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[int] = (2, 3),
        pretrained: bool = True,
        weights: str | None = None,
        patch_size: int = 3,
        embedding_dim: int | None = None,
        reweight: bool = False,
        scoring: Mapping[str, Any] | None = None,
        bank: Mapping[str, Any] | None = None,
        threshold: Mapping[str, Any] | None = None,
        preprocessing: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(scoring, bank, threshold, preprocessing)
        self.save_hyperparameters()
        if reweight:
            self.scoring = dataclasses.replace(self.scoring, image_score="reweight")
        self.model = PatchCoreModel(
            backbone, layers, pretrained, weights, patch_size, embedding_dim, self.bank_scorer()
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Never runs: the runner skips the fit loop of models with ``requires_training = False``."""
        return None

    def configure_optimizers(self) -> None:
        return None
