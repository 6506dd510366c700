"""DAAD's networks: an autoencoder whose skip connections carry block-wise memories, and a discriminator.

The layers, memory sizes and addressing of Hou et al. are not known here; this framework's choices are the
U-Net-shaped autoencoder of :mod:`patchae.models.reconstruction` (skips at every scale) with a
:class:`BlockMemory` on each skip and on the bottleneck, and a small PatchGAN-style discriminator whose
stride-8 features also score.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from patchae.errors import PatchAEError
from patchae.models.reconstruction import EncoderDecoder, level_channels


class BlockMemory(nn.Module):
    """Divide a feature map into ``block_size`` x ``block_size`` blocks and assemble each from memory items.

    Every block (flattened to a ``channels * block_size**2`` vector) addresses the ``items`` learned memory
    items by softmax attention over their cosine similarities (divided by ``temperature``) and is replaced by
    the convex combination of the items with those weights. Blocks of normal content are what the items learn
    to assemble; an anomalous block comes back as the nearest mixture of normal ones. Finer blocks rebuild more
    (normal and abnormal alike), coarser blocks less.
    """

    def __init__(self, channels: int, block_size: int, items: int, temperature: float = 0.1) -> None:
        super().__init__()
        if block_size < 1 or items < 1 or temperature <= 0:
            raise PatchAEError(
                f"a block memory needs block_size >= 1, items >= 1 and temperature > 0, got "
                f"{block_size}, {items}, {temperature}"
            )
        self.block_size, self.temperature = int(block_size), float(temperature)
        dim = channels * self.block_size**2
        self.memory = nn.Parameter(torch.randn(items, dim) / dim**0.5)
        self.last_entropy = torch.zeros(())  # mean addressing entropy of the last call (a training loss)

    def address(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(blocks (B, L, D), weights (B, L, items)) of a (B, C, H, W) map; H, W multiples of block_size."""
        height, width = features.shape[-2:]
        if height % self.block_size or width % self.block_size:
            raise PatchAEError(
                f"a feature map of {height}x{width} cannot be divided into {self.block_size}x{self.block_size} "
                "blocks; change model.block_sizes or the image size"
            )
        blocks = self.divide(features)
        similarity = F.normalize(blocks, dim=-1) @ F.normalize(self.memory, dim=-1).t()
        return blocks, torch.softmax(similarity / self.temperature, dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _, weights = self.address(features)
        self.last_entropy = -(weights * weights.clamp_min(1e-12).log()).sum(dim=-1).mean()
        return self.assemble(weights @ self.memory, features.shape)

    # F.unfold / F.fold by reshapes (the same block and element order): ONNX opset 17 has no col2im.
    def divide(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, blocks, C * b * b), blocks in row-major order."""
        batch, channels, height, width = features.shape
        b = self.block_size
        grid = features.reshape(batch, channels, height // b, b, width // b, b).permute(0, 2, 4, 1, 3, 5)
        return grid.reshape(batch, (height // b) * (width // b), channels * b * b)

    def assemble(self, blocks: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The inverse of :meth:`divide`: (B, blocks, C * b * b) -> ``shape`` (B, C, H, W)."""
        batch, channels, height, width = shape
        b = self.block_size
        grid = blocks.reshape(batch, height // b, width // b, channels, b, b).permute(0, 3, 1, 4, 2, 5)
        return grid.reshape(batch, channels, height, width)


class DAADNetwork(EncoderDecoder):
    """The autoencoder: level i (stride 2**i) passes its skip, the last level its bottleneck, through a
    :class:`BlockMemory` of ``block_sizes[i]``."""

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        block_sizes: Sequence[int] = (8, 4, 4, 2, 1),
        memory_items: int = 100,
        temperature: float = 0.1,
        encoder: nn.Module | None = None,
        per_image_intensity: bool = False,
    ) -> None:
        channels = level_channels(channels, encoder)
        if len(block_sizes) != len(channels):
            raise PatchAEError(
                f"model.block_sizes={list(block_sizes)} needs one size per level of model.channels={list(channels)}"
            )
        memories = [
            BlockMemory(int(c), int(b), memory_items, temperature)
            for c, b in zip(channels, block_sizes, strict=True)
        ]
        super().__init__(
            channels,
            skips=True,
            level_modules=memories,
            encoder=encoder,
            per_image_intensity=per_image_intensity,
        )
        self.block_sizes = [int(b) for b in block_sizes]

    @property
    def stride(self) -> int:
        """Input sides must divide into every level's blocks."""
        return max(2**i * b for i, b in enumerate(self.block_sizes))

    def entropy(self) -> torch.Tensor:
        """Mean addressing entropy of the memories in the last forward pass."""
        return torch.stack([memory.last_entropy for memory in self.level_modules]).mean()


class Discriminator(nn.Module):
    """Real image or reconstruction? Three strided 4x4 convolutions give its stride-8 features (also used to
    score: a reconstruction that misses a subtle anomaly still differs from the input there), a 1x1 convolution
    the per-location logit."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for out_channels in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(in_channels, 1, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, 1, H/8, W/8), features (B, 4*width, H/8, W/8))."""
        features = self.features(images)
        return self.classifier(features), features
