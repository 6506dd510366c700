"""PatchCore as a plain torch module: a frozen pretrained backbone's locally aware patch features and the bank
scorer."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from patchae.errors import PatchAEError
from patchae.models.backbone import check_image_batch, create_feature_extractor
from patchae.models.features import locally_aware_features
from patchae.models.torch_model import BankModel
from patchae.scoring import BankScorer


class PatchCoreModel(BankModel):
    """Locally aware patch features of a frozen pretrained backbone (PatchCore's), scored against the bank."""

    def __init__(
        self,
        backbone: str,
        layers: Sequence[int],
        pretrained: bool,
        weights: str | None,
        patch_size: int,
        embedding_dim: int | None,
        scorer: BankScorer,
    ) -> None:
        super().__init__(scorer)
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
        self.patch_size, self.embedding_dim = int(patch_size), embedding_dim
        self.backbone = create_feature_extractor(backbone, layers, pretrained=pretrained, weights=weights)
        self.backbone.requires_grad_(False).eval()
        self.max_stride = int(max(self.backbone.feature_info.reduction()))

    def train(self, mode: bool = True) -> PatchCoreModel:
        super().train(mode)
        self.backbone.eval()  # pretrained features, pretrained BatchNorm statistics: always
        return self

    def embed(self, images: Tensor) -> Tensor:
        check_image_batch(images, self.max_stride)
        return locally_aware_features(self.backbone(images), self.patch_size, self.embedding_dim)
