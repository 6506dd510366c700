"""Batch norms folded into their convolutions for inference: same outputs, no norms left, and undone where a
convolution's output is used elsewhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from checkpoint_fixture import session_checkpoint_fixture
from patchae.deploy.loading import load_model
from patchae.models.backbone import create_feature_extractor
from patchae.models.fusion import fold_batchnorm, fold_for_inference

trained = session_checkpoint_fixture()


def randomise_norms(model: nn.Module) -> None:
    """Running statistics and affine parameters far from the identity, so that a wrong fold shows."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator))
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(size, generator=generator))
            module.bias.data.copy_(torch.randn(size, generator=generator))


def count_norms(model: nn.Module) -> int:
    return sum(isinstance(module, nn.BatchNorm2d) for module in model.modules())


def test_efficientnet_lite0_folds_every_norm_and_gives_the_same_features():
    backbone = create_feature_extractor("tf_efficientnet_lite0", (2, 3), pretrained=False, weights=None)
    randomise_norms(backbone)
    backbone.eval()
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = backbone(images)
    norms = count_norms(backbone)
    folded = fold_batchnorm(backbone, images[:1])
    assert len(folded) == norms > 20 and count_norms(backbone) == 0
    with torch.no_grad():
        actual = backbone(images)
    for before, after in zip(expected, actual, strict=True):
        assert torch.allclose(before, after, atol=1e-4 * float(before.abs().max()), rtol=0)


class SharedOutput(nn.Module):
    """A convolution whose output feeds its norm and, outside any module, the sum after it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.conv(images)
        return self.norm(features) + features


def test_a_fold_that_would_change_the_outputs_is_undone():
    model = SharedOutput()
    randomise_norms(model)
    model.eval()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(images)
    assert fold_for_inference(model, images[:1]) == 0
    assert isinstance(model.norm, nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.equal(model(images), expected)


def test_folding_needs_eval_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(SharedOutput().train(), torch.zeros(1, 3, 8, 8))


def test_load_model_folds_and_scores_as_the_checkpoint(trained):
    plain = load_model(trained.ckpt, fold_batchnorm=False)
    folded = load_model(trained.ckpt)
    assert count_norms(plain) > 0 and count_norms(folded) == 0
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        (plain_maps, plain_scores), (maps, scores) = plain(images), folded(images)
    assert torch.allclose(scores, plain_scores, atol=1e-4 * float(plain_scores.abs().max()), rtol=0)
    assert torch.allclose(maps, plain_maps, atol=1e-4 * float(plain_maps.abs().max()), rtol=0)
