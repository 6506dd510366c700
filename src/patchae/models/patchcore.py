"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022) as a baseline.

No training: the memory bank is built from the pretrained backbone's locally aware patch features, with the
same coreset, search and scoring as Patch AE, so a comparison isolates what Patch AE's fine-tuning adds.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from patchae.errors import PatchAEError
from patchae.memory import torch_nearest
from patchae.models.backbone import check_image_batch, create_feature_extractor
from patchae.models.module import AnomalyModule

# PatchCore has nothing to optimise; Lightning's note about it is expected, not a problem.
warnings.filterwarnings("ignore", message=r".*configure_optimizers.* returned `None`.*")


def locally_aware_features(
    features: Sequence[torch.Tensor], patch_size: int = 3, embedding_dim: int | None = None
) -> torch.Tensor:
    """PatchCore's patch features: every stage averaged over a ``patch_size`` neighbourhood (zero padded, as
    PatchCore's unfold), deeper stages bilinearly resized to the first stage's grid, then concatenated.

    With ``embedding_dim``, as PatchCore's reference code: each stage's channels are average-pooled to
    ``embedding_dim`` before the concatenation, which is then pooled to ``embedding_dim`` again, so every
    stage weighs the same whatever its channel count.

    Returns (B, sum(C_i), h, w), or (B, embedding_dim, h, w), with (h, w) the grid of ``features[0]``.
    """
    if patch_size < 1 or patch_size % 2 == 0:
        raise PatchAEError(f"model.patch_size={patch_size} must be a positive odd number (PatchCore uses 3)")
    size = features[0].shape[-2:]
    pooled = []
    for feature in features:
        if patch_size > 1:
            feature = F.avg_pool2d(feature, patch_size, stride=1, padding=patch_size // 2)
        if feature.shape[-2:] != size:
            feature = F.interpolate(feature, size=size, mode="bilinear", align_corners=False)
        pooled.append(feature if embedding_dim is None else pool_channels(feature, embedding_dim))
    embedding = torch.cat(pooled, dim=1)
    return embedding if embedding_dim is None else pool_channels(embedding, embedding_dim)


def pool_channels(embedding: torch.Tensor, dim: int) -> torch.Tensor:
    """Adaptive average pooling along the channel axis to exactly ``dim`` channels (fewer are repeated)."""
    batch, channels, height, width = embedding.shape
    if dim == channels:
        return embedding
    flat = embedding.permute(0, 2, 3, 1).reshape(-1, 1, channels)
    reduced = F.adaptive_avg_pool1d(flat, dim)
    return reduced.reshape(batch, height, width, dim).permute(0, 3, 1, 2)


def reweighted_image_scores(
    patch_features: torch.Tensor, patch_scores: torch.Tensor, bank: torch.Tensor, neighbors: int = 9
) -> torch.Tensor:
    """PatchCore's Eq. 7: the largest patch score s* scaled by 1 - softmax weight of its nearest bank vector m*.

    With m_test the patch that scored s*, and N_b(m*) the ``neighbors`` nearest bank vectors of m*
    (m* itself among them): s = (1 - exp||m_test - m*|| / sum_{m in N_b(m*)} exp||m_test - m||) * s*.
    An anomalous patch whose nearest normal vector sits in a dense region of the bank keeps more of its
    score than one that is merely near a rare normal vector.

    Args:
        patch_features: (B, P, D) features of every patch.
        patch_scores: (B, P) patch scores (nearest-neighbour distances).
        bank: (M, D) memory bank.
        neighbors: b, the size of the neighbourhood N_b(m*).
    Returns:
        (B,) image scores.
    """
    batch = patch_features.shape[0]
    s_star, where = patch_scores.max(dim=1)
    m_test = patch_features[torch.arange(batch, device=where.device), where].float()
    bank = bank.to(m_test.device)
    nearest = torch_nearest(m_test, bank, k=1)[1][:, 0]
    support = torch_nearest(bank[nearest], bank, k=min(max(neighbors, 1), bank.shape[0]))[1]
    support[:, 0] = nearest  # m* first; an exact duplicate of m* would otherwise be as good a column 0
    distances = torch.linalg.vector_norm(bank[support] - m_test.unsqueeze(1), dim=-1)
    weights = 1.0 - torch.softmax(distances, dim=1)[:, 0]
    return weights * s_star.to(weights.device)


class PatchCoreModule(AnomalyModule):
    """PatchCore on a frozen pretrained backbone: locally aware patch features, greedy coreset, NN scoring.

    ``requires_training`` is False: the runner skips the fit loop and the memory bank is built at the end
    of fit, exactly as for Patch AE. Image scores are the maximum of the anomaly map (as Patch AE), or
    PatchCore's re-weighted score with ``reweight=True``.
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
        if reweight_neighbors < 1:
            raise PatchAEError(f"model.reweight_neighbors={reweight_neighbors} must be at least 1")
        self.backbone = create_feature_extractor(backbone, layers, pretrained=pretrained, weights=weights)
        self.backbone.requires_grad_(False).eval()
        self.max_stride = int(max(self.backbone.feature_info.reduction()))
        # The re-weighted score needs the features patch_scores() computed; kept only for that call.
        self._capture_features = False
        self._captured_features: torch.Tensor | None = None
        self._captured_patch_scores: torch.Tensor | None = None

    def train(self, mode: bool = True) -> PatchCoreModule:
        super().train(mode)
        self.backbone.eval()  # pretrained features, pretrained BatchNorm statistics: always
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        check_image_batch(images, self.max_stride)
        embedding = locally_aware_features(
            self.backbone(images), self.hparams.patch_size, self.hparams.embedding_dim
        )
        if self._capture_features:
            self._captured_features = embedding
        return embedding

    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        self._capture_features = bool(self.hparams.reweight)
        try:
            scores = super().patch_scores(images)
        finally:
            self._capture_features = False
        if self.hparams.reweight:
            self._captured_patch_scores = scores
        return scores

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._captured_features = None
        maps, scores = super().forward(images)
        features, self._captured_features = self._captured_features, None
        patch, self._captured_patch_scores = self._captured_patch_scores, None
        if self.hparams.reweight and features is not None and patch is not None:
            # patch_scores() has just embedded these images: reuse its features instead of embedding twice.
            batch, dim = features.shape[:2]
            scores = reweighted_image_scores(
                features.reshape(batch, dim, -1).transpose(1, 2),
                patch.reshape(batch, -1),
                self.memory_bank,
                self.hparams.reweight_neighbors,
            ).to(scores.device)
        return maps, scores

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Never runs: the runner skips the fit loop of models with ``requires_training = False``."""
        return None

    def configure_optimizers(self) -> None:
        return None
