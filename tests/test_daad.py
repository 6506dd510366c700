"""DAAD: shapes, block-wise memories (convex combinations of their items); end to end in test_reconstruction_models."""

import pytest
import torch
import torch.nn.functional as F

from patchae.errors import PatchAEError
from patchae.models import DAADModule
from patchae.models.daad import BlockMemory, DAADNetwork, Discriminator

SMALL = {"channels": (4, 8, 16), "block_sizes": (4, 2, 1), "memory_items": 10}


def test_shapes():
    model = DAADModule(**SMALL, discriminator_width=4)
    images = torch.randn(2, 3, 32, 48)
    assert model.model.network(images).shape == (2, 3, 32, 48)
    logits, features = model.model.discriminator(images)
    assert logits.shape == (2, 1, 4, 6) and features.shape == (2, 16, 4, 6)
    assert model.model.error_terms(images).shape == (2, 2, 32, 48)
    model.model.fit([torch.randn(3, 3, 32, 32)])
    maps, scores = model(images)
    assert maps.shape == (2, 32, 48) and scores.shape == (2,)


def test_every_block_is_a_convex_combination_of_memory_items():
    memory = BlockMemory(channels=3, block_size=4, items=7, temperature=0.5)
    features = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    blocks, weights = memory.address(features)
    assert blocks.shape == (2, 6, 48) and weights.shape == (2, 6, 7)
    assert torch.all(weights >= 0) and torch.allclose(weights.sum(dim=-1), torch.ones(2, 6))
    output = memory(features)
    assert output.shape == features.shape
    rebuilt = F.unfold(output, 4, stride=4).transpose(1, 2)  # (2, 6 blocks, 48)
    assert torch.allclose(rebuilt, weights @ memory.memory, atol=1e-6)
    # Block (0, 0) of image 0 is those 4 x 4 pixels of every channel, nothing else.
    assert torch.allclose(output[0, :, :4, :4].reshape(-1), weights[0, 0] @ memory.memory, atol=1e-6)


def test_an_input_equal_to_an_item_is_assembled_mostly_from_it():
    memory = BlockMemory(channels=2, block_size=2, items=5, temperature=0.01)
    item = memory.memory[3].detach()
    features = item.view(1, 8, 1).expand(1, 8, 4)  # four identical blocks holding item 3
    features = F.fold(features, (4, 4), 2, stride=2)
    _, weights = memory.address(features)
    assert torch.all(weights.argmax(dim=-1) == 3)


def test_memories_on_every_skip_and_the_bottleneck():
    network = DAADNetwork(**SMALL)
    assert [m.block_size for m in network.level_modules] == [4, 2, 1]
    assert all(m.memory.shape[0] == 10 for m in network.level_modules)
    network(torch.randn(1, 3, 16, 16))
    assert 0 < float(network.entropy()) <= torch.log(torch.tensor(10.0))


def test_bad_block_settings_say_what_to_change():
    with pytest.raises(PatchAEError) as error:
        DAADNetwork(channels=(4, 8), block_sizes=(2,))
    assert str(error.value) == "model.block_sizes=[2] needs one size per level of model.channels=[4, 8]"
    with pytest.raises(PatchAEError) as error:
        BlockMemory(3, 4, 5).address(torch.randn(1, 3, 6, 8))
    assert str(error.value) == (
        "a feature map of 6x8 cannot be divided into 4x4 blocks; change model.block_sizes or the image size"
    )
    with pytest.raises(PatchAEError, match="must be a multiple of 16"):
        DAADModule(memory_items=2).model.error_terms(
            torch.randn(1, 3, 24, 24)
        )  # 4 px blocks at stride 4: 16 px


def test_discriminator_feature_term_is_zero_for_a_perfect_reconstruction():
    model = DAADModule(**SMALL, discriminator_width=4)
    model.model.network = torch.nn.Identity()
    model.model.network.check_input = lambda images: None
    model.model.network.standardize = lambda images: images
    terms = model.model.error_terms(torch.randn(1, 3, 32, 32))
    assert torch.count_nonzero(terms) == 0
    assert isinstance(model.model.discriminator, Discriminator)


def test_pretrained_encoder_option():
    model = DAADModule(
        channels=(8,),
        block_sizes=(4, 2, 2, 1, 1),
        memory_items=4,
        backbone="tf_efficientnet_lite0",
        pretrained=False,
    )
    assert [m.memory.shape[1] for m in model.model.network.level_modules] == [8 * 16, 16 * 4, 24 * 4, 40, 112]
    assert model.model.network(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_the_training_loss_holds_the_feature_alignment_term():
    """E ||f_D(x) - f_D(x^)||_2 over the discriminator's feature locations, weighted by alignment_weight, and the
    reconstruction is what it pulls on (the input's features are a fixed target)."""
    torch.manual_seed(0)
    model = DAADModule(
        **SMALL, discriminator_width=4, adversarial_weight=0.0, alignment_weight=0.1, entropy_weight=0.0
    )
    images = torch.randn(2, 3, 32, 32)
    reconstruction = model.model.network(images)
    terms = model.autoencoder_losses(images, reconstruction, model.model.network.entropy())
    _, real = model.model.discriminator(images)
    _, fake = model.model.discriminator(reconstruction)
    expected = (real - fake).pow(2).sum(dim=1).sqrt().mean()
    assert torch.allclose(terms["alignment"], expected, rtol=1e-5) and float(expected) > 0
    assert torch.allclose(terms["loss"], terms["reconstruction"] + 0.1 * expected, rtol=1e-5)
    without = DAADModule(**SMALL, discriminator_width=4, alignment_weight=0.0, adversarial_weight=0.0)
    without.load_state_dict(model.state_dict())
    plain = without.autoencoder_losses(images, reconstruction, model.model.network.entropy())
    assert torch.allclose(plain["loss"], terms["reconstruction"] + 2e-4 * model.model.network.entropy())
    terms["alignment"].backward()
    assert model.model.network.head.weight.grad.abs().sum() > 0
