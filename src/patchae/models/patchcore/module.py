"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022) as a baseline.

No training: the memory bank is built from the pretrained backbone's locally aware patch features, with the
same coreset, search and scoring as Patch AE, so a comparison isolates what Patch AE's fine-tuning adds.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from patchae.errors import PatchAEError
from patchae.models.backbone import check_image_batch, create_feature_extractor
from patchae.models.base import AnomalyModule
from patchae.models.features import locally_aware_features

# PatchCore has nothing to optimise; Lightning's note about it is expected, not a problem.
warnings.filterwarnings("ignore", message=r".*configure_optimizers.* returned `None`.*")


class PatchCoreModule(AnomalyModule):
    """PatchCore on a frozen pretrained backbone: locally aware patch features, greedy coreset, NN scoring.

    ``requires_training`` is False: the runner skips the fit loop and the memory bank is built at the end
    of fit, exactly as for Patch AE. Image scores are the maximum of the anomaly map (as Patch AE), or
    PatchCore's re-weighted score with ``reweight=True`` (the same as ``image_score="reweight"``).
    """

    requires_training = False

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[int] = (2, 3),
        pretrained: bool = True,
        weights: str | None = None,
        patch_size: int = 3,
        embedding_dim: int | None = None,
        reweight: bool = False,
        reweight_neighbors: int = 9,
        image_score: str = "max",
        top_k: float = 0.01,
        num_neighbors: int = 1,
        blur_sigma: float = 4.0,
        search: str = "faiss",
        faiss_device: str = "auto",
        faiss_index: str = "flat",
        threshold_method: str = "f1",
        threshold_quantile: float = 0.99,
        threshold_value: float | None = None,
        image_size: int = 256,
        crop_size: int | None = 224,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        resize_mode: str = "squash",  # preprocessing, saved for predict.py (see ImageTransform)
        tiling: dict | None = None,  # data.tiling: {tile, stride} (see patchae.tiling)
    ) -> None:
        super().__init__(
            num_neighbors,
            blur_sigma,
            search,
            faiss_device,
            faiss_index,
            threshold_method,
            threshold_quantile,
            threshold_value,
            image_score="reweight" if reweight else image_score,
            top_k=top_k,
            reweight_neighbors=reweight_neighbors,
            tiling=tiling,
        )
        self.save_hyperparameters()
        if len(layers) < 1:
            raise PatchAEError(
                "backbone.layers is empty; give at least one stage, e.g. backbone.layers=[2,3]"
            )
        if patch_size < 1 or patch_size % 2 == 0:
            raise PatchAEError(
                f"model.patch_size={patch_size} must be a positive odd number (PatchCore uses 3)"
            )
        if embedding_dim is not None and embedding_dim < 1:
            raise PatchAEError(f"model.embedding_dim={embedding_dim} must be a positive integer or null")
        self.backbone = create_feature_extractor(backbone, layers, pretrained=pretrained, weights=weights)
        self.backbone.requires_grad_(False).eval()
        self.max_stride = int(max(self.backbone.feature_info.reduction()))

    def train(self, mode: bool = True) -> PatchCoreModule:
        super().train(mode)
        self.backbone.eval()  # pretrained features, pretrained BatchNorm statistics: always
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        check_image_batch(images, self.max_stride)
        return locally_aware_features(
            self.backbone(images), self.hparams.patch_size, self.hparams.embedding_dim
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Never runs: the runner skips the fit loop of models with ``requires_training = False``."""
        return None

    def configure_optimizers(self) -> None:
        return None
