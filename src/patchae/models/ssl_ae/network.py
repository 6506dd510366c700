"""SSL-AE's network: a convolutional autoencoder that rebuilds the clean normal image from a corrupted one.

Bauer et al. do not publish their layers; this framework's choice is the U-Net-shaped autoencoder of
:mod:`patchae.models.reconstruction` with skip connections at every scale: the corruption objective (inpaint
what was replaced, keep what was not) stops the skips from becoming an identity map, and they keep the
reconstruction of normal detail sharp, so the error concentrates on what does not look normal.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from patchae.models.reconstruction import EncoderDecoder


class SSLAutoencoder(EncoderDecoder):
    """The denoising autoencoder; ``skips=False`` makes it a plain bottleneck autoencoder, a list of levels keeps
    only those skips (e.g. ``[2, 3]``: none finer than stride 4), ``skip_merge="convex"`` gates them
    (:class:`patchae.models.reconstruction.ConvexMerge`), ``bottleneck_dilations`` adds a
    :class:`patchae.models.reconstruction.DilatedStack`, ``encoder`` (a
    :func:`patchae.models.reconstruction.pretrained_encoder`) replaces levels 1 and deeper, ``fold=2`` runs it on the
    image folded 2 x 2 into channels (a 256 px map for about a 128 px network's cost)."""

    # A training step at 128 px on 2 CPU cores (AMD EPYC, oneDNN) takes about 0.65x the time in NHWC order, and
    # scoring about 0.65x as well (docs/results.md). DAAD's block memories reshape their inputs and lose more than
    # this gains, so it stays in NCHW.
    channels_last = True

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        skips: bool | Sequence[int] = True,
        encoder: nn.Module | None = None,
        per_image_intensity: bool = False,
        skip_merge: str = "concat",
        bottleneck_dilations: Sequence[int] = (),
        fold: int = 1,
    ) -> None:
        super().__init__(
            channels,
            skips=skips,
            encoder=encoder,
            per_image_intensity=per_image_intensity,
            skip_merge=skip_merge,
            bottleneck_dilations=bottleneck_dilations,
            fold=fold,
        )
