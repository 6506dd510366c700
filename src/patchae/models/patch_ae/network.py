"""The Patch-wise Auto-Encoder network and its loss (Cui, Liu, Lian: Patch AE, Eq. 3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from patchae.errors import PatchAEError
from patchae.models.backbone import check_image_batch, create_feature_extractor
from patchae.models.features import locally_aware_features

# PatchCore's 3x3 local aggregation: off, of the stage features before the concat (R is trained on them),
# or of R only where it is scored (training still sees per-patch R).
AGGREGATIONS = ("none", "features", "representation")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "leaky_relu": nn.LeakyReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1)


class PatchAE(nn.Module):
    """Encoder (pretrained CNN stages -> upsample + concat -> two 1x1 conv + ReLU to ``c3``) and a decoder
    (1x1 conv, activation, 1x1 conv, depth-to-space) in which every feature vector rebuilds only its own
    ``stride x stride`` image patch.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[int] = (2, 3),
        pretrained: bool = True,
        weights: str | None = None,
        c3: int | None = None,
        decoder_hidden: int | None = None,
        activation: str = "relu",
        aggregate: str = "none",
    ) -> None:
        super().__init__()
        if len(layers) < 1:
            raise PatchAEError(
                "backbone.layers is empty; give at least one stage, e.g. backbone.layers=[2,3]"
            )
        if activation not in ACTIVATIONS:
            raise PatchAEError(
                f"model.activation={activation} is unknown; choose one of {sorted(ACTIVATIONS)}"
            )
        if aggregate not in AGGREGATIONS:
            raise PatchAEError(
                f"model.aggregate={aggregate} is unknown; choose one of {', '.join(AGGREGATIONS)}"
            )
        self.aggregate = aggregate
        self.backbone = create_feature_extractor(backbone, layers, pretrained=pretrained, weights=weights)
        channels = self.backbone.feature_info.channels()
        reductions = self.backbone.feature_info.reduction()
        self.stride = int(min(reductions))  # the shallowest stage sets the patch size
        self.max_stride = int(max(reductions))
        concat = sum(channels)
        self.concat_channels = concat
        self.c3 = int(c3) if c3 else concat // 2
        if not 0 < self.c3 < concat:
            raise PatchAEError(
                f"model.c3={self.c3} must compress the {concat} concatenated channels (0 < c3 < {concat})"
            )
        self.compress = nn.Sequential(
            conv1x1(concat, (concat + self.c3) // 2),
            nn.ReLU(),
            conv1x1((concat + self.c3) // 2, self.c3),
            nn.ReLU(),
        )
        patch_values = 3 * self.stride * self.stride
        hidden = int(decoder_hidden) if decoder_hidden else max(self.c3, patch_values)
        self.decoder = nn.Sequential(
            conv1x1(self.c3, hidden), ACTIVATIONS[activation](), conv1x1(hidden, patch_values)
        )

    def check_input(self, images: torch.Tensor) -> None:
        check_image_batch(images, self.max_stride)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The representation R: (B, c3, H / stride, W / stride), one vector per image patch."""
        return self.compress_features(self.backbone(images))

    def compress_features(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """R from the backbone's stage maps: deeper ones upsampled to the first, concatenated, compressed."""
        patch_size = 3 if self.aggregate == "features" else 1
        return self.compress(locally_aware_features(features, patch_size))

    def decode(self, representation: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) rebuilt patch by patch: only 1x1 convs, then depth-to-space."""
        return F.pixel_shuffle(self.decoder(representation), self.stride)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        representation = self.encode(images)
        return representation, self.decode(representation)


def standardize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """norm() of Eq. 3: zero mean, unit variance over the pixels of each patch (as MAE does)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    return (patches - mean) / torch.sqrt(var + eps)


def patchify(images: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, patches, 3 * stride * stride): each row holds one patch's pixels."""
    return F.pixel_unshuffle(images, stride).flatten(2).transpose(1, 2)


def patch_ae_loss(
    reconstruction: torch.Tensor, target: torch.Tensor, stride: int, alpha: float, eps: float = 1e-6
) -> torch.Tensor:
    """Eq. 3: alpha * ||norm(I^_p) - norm(I_p)||_2 + (1 - alpha) * ||I^_p - I_p||_2 over patches p.

    Averaged (not summed) over patches and images, so the learning rate does not depend on image size.
    """
    if not 0.0 <= alpha <= 1.0:
        raise PatchAEError(f"loss.alpha={alpha} must be in [0, 1]")
    predicted, actual = patchify(reconstruction, stride), patchify(target, stride)
    loss = torch.zeros((), device=target.device)
    if alpha > 0:
        normalized = torch.linalg.vector_norm(
            standardize_patches(predicted, eps) - standardize_patches(actual, eps), dim=-1
        )
        loss = loss + alpha * normalized.mean()
    if alpha < 1:
        loss = loss + (1 - alpha) * torch.linalg.vector_norm(predicted - actual, dim=-1).mean()
    return loss
