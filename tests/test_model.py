import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from patchae.errors import PatchAEError
from patchae.models import PatchAE, PatchAEModule, patch_ae_loss


@pytest.mark.parametrize(
    ("backbone", "layers", "channels", "stride"),
    [
        ("tf_efficientnet_lite0", (2, 3), 40 + 112, 8),
        ("tf_efficientnet_lite0", (1, 2, 3), 24 + 40 + 112, 4),
        ("resnet18", (2, 3), 128 + 256, 8),
        ("resnet18", (1, 2), 64 + 128, 4),
    ],
)
def test_shapes_for_backbones_and_layers(backbone, layers, channels, stride):
    model = PatchAE(backbone, layers, pretrained=False, c3=32).eval()
    images = torch.randn(2, 3, 64, 96)
    representation, reconstruction = model(images)
    assert model.stride == stride
    assert representation.shape == (2, 32, 64 // stride, 96 // stride)
    assert reconstruction.shape == images.shape
    assert model.compress[0].in_channels == channels
    assert (representation >= 0).all()  # the compression ends in a ReLU


def test_default_c3_halves_the_concatenated_channels():
    assert PatchAE("resnet18", (2, 3), pretrained=False).c3 == (128 + 256) // 2


def test_c3_must_compress():
    with pytest.raises(PatchAEError, match="c3"):
        PatchAE("resnet18", (2, 3), pretrained=False, c3=4096)


def test_input_not_multiple_of_stride_is_a_clear_error():
    model = PatchAE("resnet18", (2, 3), pretrained=False)
    with pytest.raises(PatchAEError, match="multiple of"):
        model.check_input(torch.randn(1, 3, 100, 100))


def test_each_patch_is_rebuilt_from_its_own_vector_only():
    model = PatchAE("resnet18", (2, 3), pretrained=False, c3=16).eval()
    representation = torch.rand(1, 16, 5, 6)
    changed = representation.clone()
    changed[0, :, 2, 3] += torch.randn(16) * 5
    with torch.no_grad():
        difference = (model.decode(changed) - model.decode(representation)).abs().sum(dim=1)[0]
    s = model.stride
    inside = difference[2 * s : 3 * s, 3 * s : 4 * s]
    assert inside.sum() > 0
    assert difference.sum() == pytest.approx(inside.sum().item())


def images_from_patches(rows: torch.Tensor, stride: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, patches, 3*s*s) -> (B, 3, H, W): the inverse of the loss's patchify."""
    batch = rows.shape[0]
    return F.pixel_shuffle(rows.transpose(1, 2).reshape(batch, 3 * stride * stride, *grid), stride)


@pytest.mark.parametrize(("alpha", "expected"), [(0.0, 1.5), (0.5, 1.25), (1.0, 1.0)])
def test_loss_equals_hand_computed_value(alpha, expected):
    # Two patches of 3x2x2 = 12 values. Patch 1: prediction = target + 1, so the raw distance is sqrt(12)
    # and the standardised one is 0. Patch 2: target alternates +1/-1 (mean 0, std 1) and the prediction is
    # its negative, so both distances are 2 * sqrt(12). Loss = alpha * (0 + 2)/2 * sqrt(12)
    # + (1 - alpha) * (1 + 2)/2 * sqrt(12).
    first = torch.arange(12.0)
    second = torch.tensor([1.0, -1.0] * 6)
    target = torch.stack([first, second])[None]
    prediction = torch.stack([first + 1, -second])[None]
    loss = patch_ae_loss(
        images_from_patches(prediction, 2, (1, 2)), images_from_patches(target, 2, (1, 2)), 2, alpha
    )
    assert loss.item() == pytest.approx(expected * math.sqrt(12), rel=1e-5)


def test_loss_rejects_alpha_outside_unit_interval():
    with pytest.raises(PatchAEError, match="alpha"):
        patch_ae_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), 2, 1.5)


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    module = PatchAEModule("resnet18", (2, 3), pretrained=False, c3=32, lr=1e-3)
    smooth = F.interpolate(torch.randn(4, 3, 4, 4), size=(32, 32), mode="bilinear", align_corners=False)
    batch = {"image": smooth}
    optimizer = module.configure_optimizers()["optimizer"]
    module.train()
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_batchnorm_statistics_stay_frozen_while_training():
    module = PatchAEModule("resnet18", (2, 3), pretrained=False, c3=32, freeze_batchnorm=True).train()
    bn = module.model.network.backbone.bn1
    assert not bn.training
    before = bn.running_mean.clone()
    module.model.network(torch.randn(2, 3, 32, 32) * 3 + 1)
    assert torch.equal(bn.running_mean, before)


@pytest.mark.parametrize("freeze", [True, False])
def test_fitting_keeps_the_pretrained_batchnorm_statistics_when_frozen(freeze):
    """Lightning never calls train() when fitting starts: the freeze must hold in a real fit too."""
    module = PatchAEModule("resnet18", (2, 3), pretrained=False, c3=32, freeze_batchnorm=freeze)
    before = {
        name: b.clone() for name, b in module.model.network.backbone.named_buffers() if "running_mean" in name
    }
    images = [{"image": torch.randn(3, 32, 32) * 3 + 1} for _ in range(4)]
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(images, batch_size=2))
    after = dict(module.model.network.backbone.named_buffers())
    unchanged = all(torch.equal(before[name], after[name]) for name in before)
    assert unchanged == freeze


def test_every_trainable_backbone_weight_gets_a_gradient():
    """No block runs past the deepest stage used (timm's EfficientNet features run them all): unused
    parameters would cost time and make DDP fail."""
    model = PatchAE("tf_efficientnet_lite0", (2, 3), pretrained=False)
    assert len(model.backbone.blocks) == 5
    _, reconstruction = model(torch.randn(2, 3, 64, 64))
    reconstruction.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("search", ["faiss", "torch"])
def test_scoring_against_a_bank(search):
    module = PatchAEModule(
        "resnet18", (2, 3), pretrained=False, c3=16, bank={"search": search}, scoring={"blur_sigma": 1.0}
    ).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        module.model.scorer.fit(module.model.embed_patches(images[:2]))
        maps, scores = module(images)
    assert maps.shape == (3, 64, 64)
    assert scores.shape == (3,)
    # The bank holds every patch of the first two images: they are at distance ~0, the third is not.
    assert scores[:2].max() < 1e-2
    assert scores[2] > 10 * scores[:2].max()


def test_scoring_without_a_bank_is_a_clear_error():
    module = PatchAEModule("resnet18", (2, 3), pretrained=False)
    with pytest.raises(PatchAEError, match="no memory bank"):
        module(torch.randn(1, 3, 32, 32))


def test_unknown_backbone_and_missing_weights_are_clear_errors(tmp_path):
    with pytest.raises(PatchAEError, match="unknown backbone"):
        PatchAE("not_a_model", (2, 3))
    with pytest.raises(PatchAEError, match="not found"):
        PatchAE("resnet18", (2, 3), weights=str(tmp_path / "missing.pth"))


def test_aggregated_features_average_each_stage_over_3x3_before_the_compression():
    model = PatchAE("resnet18", (2, 3), pretrained=False, c3=16, aggregate="features").eval()
    plain = PatchAE("resnet18", (2, 3), pretrained=False, c3=16).eval()
    plain.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.backbone(images)
        pooled = [F.avg_pool2d(f, 3, stride=1, padding=1) for f in features]
        assert torch.allclose(model.encode(images), plain.compress_features(pooled), atol=1e-6)
    with pytest.raises(PatchAEError, match="model.aggregate"):
        PatchAE("resnet18", (2, 3), pretrained=False, aggregate="mean")


def test_bank_of_representation_and_pretrained_features():
    """R beside PatchCore's features of a frozen pretrained copy, each block scaled to unit mean norm on the
    training vectors; fine-tuning never moves the copy."""
    torch.manual_seed(0)
    module = PatchAEModule(
        "resnet18",
        (2, 3),
        pretrained=False,
        c3=16,
        bank={"search": "torch"},
        bank_features="representation+pretrained",
    )
    images = torch.randn(3, 3, 64, 64)
    module.eval()
    with torch.no_grad():
        assert module.model.embed(images).shape == (3, 16 + 128 + 256, 8, 8)
        vectors = module.model.calibrate_embedding(module.model.embed_patches(images[:2]))
        for block in (vectors[:, :16], vectors[:, 16:]):
            assert block.norm(dim=1).mean().item() == pytest.approx(1.0, rel=1e-4)
        assert torch.allclose(
            module.model.embed_patches(images[:2]), vectors, atol=1e-5
        )  # queries scaled alike
    copy_before = {k: v.clone() for k, v in module.model.pretrained_backbone.state_dict().items()}
    optimizer = module.configure_optimizers()["optimizer"]
    module.train()
    module.training_step({"image": images}, 0).backward()
    optimizer.step()
    assert not module.model.pretrained_backbone.training
    assert all(
        torch.equal(v, module.model.pretrained_backbone.state_dict()[k]) for k, v in copy_before.items()
    )
    assert not torch.equal(
        module.model.network.backbone.conv1.weight, module.model.pretrained_backbone.conv1.weight
    )


def test_warmup_holds_the_backbone_still_while_the_head_learns():
    torch.manual_seed(0)
    module = PatchAEModule("resnet18", (2, 3), pretrained=False, c3=16, lr=1e-2, warmup_epochs=1)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    backbone_before = module.model.network.backbone.conv1.weight.clone()
    head_before = module.model.network.decoder[0].weight.clone()
    module.train()
    module.training_step({"image": torch.randn(2, 3, 32, 32)}, 0).backward()
    optimizer.step()
    assert torch.equal(module.model.network.backbone.conv1.weight, backbone_before)
    assert not torch.equal(module.model.network.decoder[0].weight, head_before)
    scheduler.step()  # epoch 1: the backbone learns at its own rate
    assert [group["lr"] for group in optimizer.param_groups] == [1e-2, 1e-2]
