"""SSL-AE: shapes, the corrupted training input; end to end in test_reconstruction_models."""

import pytest
import torch
from torch import nn

from patchae.data.corruption import Corruption
from patchae.errors import PatchAEError
from patchae.models import SSLAEModule
from patchae.models.reconstruction import cell_phases, inpainted

CHANNELS = (4, 8, 16)


def test_shapes():
    model = SSLAEModule(channels=CHANNELS, preprocessing={"image_size": 32})
    images = torch.randn(2, 3, 32, 48)
    assert model.model.network(images).shape == (2, 3, 32, 48)
    assert model.model.error_terms(images).shape == (2, 1, 32, 48)
    model.model.fit([torch.randn(3, 3, 32, 32)])
    maps, scores = model(images)
    assert maps.shape == (2, 32, 48) and scores.shape == (2,)
    assert torch.allclose(scores, maps.flatten(1).amax(dim=1))


def test_channels_last_order_changes_neither_the_output_nor_the_gradients(monkeypatch):
    """The network runs in NHWC order for speed; in NCHW it must compute the same function."""
    torch.manual_seed(0)
    network = SSLAEModule(channels=CHANNELS, per_image_intensity=True).model.network
    images = torch.randn(2, 3, 32, 32)

    def output_and_gradients():
        network.zero_grad()
        output = network(images)
        output.pow(2).mean().backward()
        return output.detach(), [p.grad.clone() for p in network.parameters()]

    assert network.channels_last
    output, gradients = output_and_gradients()
    assert output.is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(network, "channels_last", False)
    reference, reference_gradients = output_and_gradients()
    assert reference.is_contiguous()
    torch.testing.assert_close(output, reference, rtol=1e-4, atol=1e-5)
    for gradient, expected in zip(gradients, reference_gradients, strict=True):
        torch.testing.assert_close(gradient, expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(("skips", "kept"), [(True, {0, 1}), (False, set()), ([1], {1})])
def test_skips_keep_only_the_chosen_levels(skips, kept):
    network = SSLAEModule(channels=CHANNELS, skips=skips).model.network
    assert network.skip_levels == kept
    # a decoder block takes the coarser level's channels plus, where a skip is kept, its own level's
    assert [block[0].in_channels for block in network.decoder] == [
        CHANNELS[i + 1] + (CHANNELS[i] if i in kept else 0) for i in range(2)
    ]
    assert network(torch.randn(1, 3, 16, 16)).shape == (1, 3, 16, 16)


def test_a_skip_at_the_bottleneck_says_which_levels_exist():
    with pytest.raises(PatchAEError) as error:
        SSLAEModule(channels=CHANNELS, skips=[1, 2])
    assert str(error.value) == (
        "model.skips=[1, 2] must be true, false or a list of levels from 0 (full resolution) to 1 "
        "(the bottleneck, level 2, has none), e.g. model.skips=[0,1]"
    )


def test_untrained_model_and_bad_sizes_say_what_to_do():
    model = SSLAEModule(channels=CHANNELS)
    with pytest.raises(PatchAEError, match="no normal-image statistics; train it first"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(PatchAEError) as error:
        model.model.error_terms(torch.randn(1, 3, 30, 32))
    assert str(error.value) == (
        "image size (30, 32) must be a multiple of 4 (the coarsest level of model.channels, or memory block); "
        "change data.image_size / data.crop_size"
    )
    with pytest.raises(PatchAEError, match="reweight needs a memory bank"):
        SSLAEModule(scoring={"image_score": "reweight"})


def test_standardised_map_has_zero_mean_unit_std_on_the_fitting_images():
    model = SSLAEModule(channels=CHANNELS, scoring={"blur_sigma": 0.0}).eval()
    batch = {"image": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    model.model.fit([batch["image"]])
    with torch.no_grad():
        standard = model.model.scorer.standardized(model.model.error_terms(batch["image"]))
    assert abs(float(standard.mean())) < 1e-4 and abs(float(standard.std()) - 1) < 1e-3


def test_corrupted_input_is_deterministic():
    model = SSLAEModule(channels=CHANNELS, seed=3)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    (first, _, mask), (again, _, _), (later, _, _) = (
        model.corrupt(images, 5),
        model.corrupt(images, 5),
        model.corrupt(images, 6),
    )
    assert torch.equal(first, again) and not torch.equal(first, later)
    assert not torch.equal(first, images) and first.shape == images.shape
    assert mask.shape == (3, 1, 32, 32) and 0 < float(mask.mean()) < 1


def test_region_weight_weighs_the_corrupted_pixels():
    outputs, targets = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    targets[..., :2, :] = 3.0  # error 9 on the top half, 1 on the bottom half
    masks = torch.zeros(1, 1, 4, 4)
    masks[..., :2, :] = 1.0
    plain = SSLAEModule(channels=CHANNELS).reconstruction_loss(outputs, targets, masks)
    assert torch.isclose(plain, torch.nn.functional.mse_loss(outputs, targets))  # 5
    weighted = SSLAEModule(channels=CHANNELS, region_weight=3.0).reconstruction_loss(outputs, targets, masks)
    assert torch.isclose(weighted, torch.tensor((3 * 9 + 1) / 4))
    with pytest.raises(PatchAEError, match="model.region_weight=0.0 must be positive"):
        SSLAEModule(channels=CHANNELS, region_weight=0.0)


@pytest.mark.parametrize("noise_in_target", [True, False])
def test_target_is_the_clean_image_plus_exactly_the_inputs_noise_outside_the_corruption(noise_in_target):
    """The follow-up's target: the model passes its input, noise included, through outside the corrupted regions
    and repairs them inside; the ablation's (noise_in_target=False) is the clean image everywhere."""
    corruption = Corruption(noise_std=0.05, noise_in_target=noise_in_target)
    image = torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(0))
    corrupted, target, mask = corruption.training_pair(
        image, torch.Generator().manual_seed(2), source=image.flip(2)
    )
    inside, outside = mask[0].bool(), ~mask[0].bool()
    assert inside.any() and outside.any()
    # The noise sample the input carries (clipped to [0, 1] like the input), drawn after the regions.
    noise = corrupted - image
    assert float(noise[:, outside].std()) > 0.04
    if noise_in_target:
        assert torch.equal(target[:, outside], corrupted[:, outside])  # the clean image + the input's noise
    else:
        assert torch.equal(target, image)
    assert torch.equal(target[:, inside], image[:, inside])
    assert torch.equal(
        corruption(image, torch.Generator().manual_seed(2), source=image.flip(2))[0], corrupted
    )


def test_pretrained_encoder_option():
    model = SSLAEModule(channels=(8,), backbone="tf_efficientnet_lite0", pretrained=False, encoder_lr=1e-5)
    assert model.model.network.channels == [
        8,
        16,
        24,
        40,
        112,
    ]  # level 0 ours, then the stages at strides 2 .. 16
    assert model.model.network(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    model.train()
    batchnorms = [m for m in model.model.network.pretrained.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms and not any(m.training for m in batchnorms)
    groups = model.configure_optimizers()["optimizer"].param_groups
    assert [group["lr"] for group in groups] == [1e-3, 1e-5]
    with pytest.raises(PatchAEError) as error:
        SSLAEModule(backbone="tf_efficientnet_lite0", encoder_layers=(2, 3), pretrained=False)
    assert str(error.value) == (
        "model.encoder_layers=[2, 3] of tf_efficientnet_lite0 are at strides [8, 16]; the encoder needs "
        "consecutive stages at strides 2, 4, 8, ..., e.g. model.encoder_layers=[0,1,2,3]"
    )


def test_inpainting_takes_every_pixel_from_the_pass_that_hid_it() -> None:
    images = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(0))
    # The identity gives back its input: with each pixel hidden when it is taken, only the fill comes back.
    rebuilt = inpainted(nn.Identity(), images, cell=4, grid=3)
    assert torch.equal(rebuilt, images.mean(dim=(2, 3), keepdim=True).expand_as(images))
    # A network that sees one pixel to each side: a pixel in the middle of its cell gets only hidden neighbours.
    blur = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    rebuilt = inpainted(blur, images, cell=4, grid=2)
    assert torch.allclose(rebuilt[..., 1:3, 1:3], images.mean(dim=(2, 3), keepdim=True).expand(2, 3, 2, 2))


def test_inpainting_scores_a_defect_the_plain_reconstruction_passes_through() -> None:
    # An SSL-AE network that is the identity hides every defect from the papers' map; hidden cells expose it.
    model = SSLAEModule(channels=CHANNELS, inpaint_cells=[4], inpaint_grid=2).eval()
    model.model.network.forward = lambda x: x  # a perfect copier, the failure the option is for
    image = torch.zeros(1, 3, 32, 32)
    defective = image.clone()
    defective[..., 12:16, 12:16] = 3.0
    errors = model.model.error_terms(torch.cat([image, defective]))
    assert errors[0].abs().max() == 0 and errors[1, 0, 12:16, 12:16].min() > 1.0
    plain = SSLAEModule(channels=CHANNELS).eval()
    plain.model.network.forward = lambda x: x
    assert plain.model.error_terms(defective).abs().max() == 0


@pytest.mark.parametrize("cells, grid", [([0], 3), (8, 3), ([8.5], 3), ([8], 1), ([8], True)])
def test_bad_inpainting_settings_say_what_to_use(cells, grid) -> None:
    with pytest.raises(PatchAEError, match=r"model.inpaint_cells=.* must be a list of cell sides in pixels"):
        SSLAEModule(channels=CHANNELS, inpaint_cells=cells, inpaint_grid=grid)


def test_inpaint_training_hides_one_scoring_pass_and_asks_for_the_clean_image_there() -> None:
    model = SSLAEModule(channels=CHANNELS, inpaint_cells=[4], inpaint_grid=2, inpaint_training=0.5)
    rng = torch.Generator().manual_seed(0)
    inputs, targets, clean = (torch.randn(64, 3, 16, 16, generator=rng) for _ in range(3))
    masks = torch.zeros(64, 1, 16, 16)
    hidden_inputs, hidden_targets, hidden_masks = model.hide_cells(inputs, targets, masks, clean, step=3)
    phases = cell_phases(inputs, 4, 2)
    touched = 0
    for i in range(64):
        changed = (hidden_inputs[i] != inputs[i]).any(dim=0)
        if not changed.any():
            assert torch.equal(hidden_targets[i], targets[i]) and hidden_masks[i].sum() == 0
            continue
        touched += 1
        # exactly the cells of one of the four passes, set to the image's mean colour, the clean image as target
        (turn,) = phases[changed].unique().tolist()
        hidden = phases == turn
        assert torch.equal(changed, hidden)
        assert torch.allclose(hidden_inputs[i][:, hidden], inputs[i].mean(dim=(1, 2))[:, None].expand(3, 64))
        assert torch.equal(hidden_targets[i][:, hidden], clean[i][:, hidden])
        assert torch.equal(hidden_targets[i][:, ~hidden], targets[i][:, ~hidden])
        assert torch.equal(hidden_masks[i, 0], hidden.float())
    assert 20 <= touched <= 44  # about half of the images
    # the same draws every run
    again = model.hide_cells(inputs, targets, masks, clean, step=3)
    assert torch.equal(again[0], hidden_inputs)


@pytest.mark.parametrize("share, cells", [(0.5, []), (1.5, [4]), (-0.1, [4])])
def test_bad_inpaint_training_says_what_it_needs(share, cells) -> None:
    with pytest.raises(PatchAEError, match=r"model.inpaint_training=.* must be a share in \[0, 1\]"):
        SSLAEModule(channels=CHANNELS, inpaint_cells=cells, inpaint_training=share)


def test_inpaint_training_targets_the_clean_image_in_the_inputs_intensity_frame() -> None:
    """Without regions and noise the input is the image: every target pixel, hidden cells included, is the image
    in its own frame (a target in the data set's frame inside the cells once trained the model off by a gain)."""
    model = SSLAEModule(
        channels=CHANNELS,
        per_image_intensity=True,
        corruption={"regions": [0, 0], "noise_std": 0.0},
        inpaint_cells=[4],
        inpaint_grid=2,
        inpaint_training=1.0,
    )
    images = 3 * torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) + 1
    inputs, targets, masks = model.training_batch(images, step=0)
    expected = model.model.network.standardize(images)
    torch.testing.assert_close(targets, expected)
    assert masks.sum() > 0 and torch.equal((inputs != targets).any(dim=1, keepdim=True), masks.bool())


def test_convex_skips_pass_the_skip_or_the_decoder_as_their_gate_says() -> None:
    network = SSLAEModule(channels=CHANNELS, skip_merge="convex", bottleneck_dilations=[1, 2]).model.network
    assert [block[0].in_channels for block in network.decoder] == [4, 8]  # each skip's own width
    assert network(torch.randn(2, 3, 16, 24)).shape == (2, 3, 16, 24)
    merge = network.merges["0"]
    skip, decoded = torch.randn(1, 4, 8, 8), torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        merge.gate.weight.zero_()
        merge.gate.bias.fill_(50.0)  # open: the skip itself
        torch.testing.assert_close(merge(skip, decoded), skip)
        merge.gate.bias.fill_(-50.0)  # shut: the decoder's features, projected to the skip's width
        torch.testing.assert_close(merge(skip, decoded), merge.project(decoded))


def test_default_network_keeps_its_weights_names() -> None:
    """Checkpoints written before the options load: the defaults add no weights."""
    names = SSLAEModule(channels=CHANNELS).model.network.state_dict()
    assert not any(name.startswith(("merges.", "bottleneck.")) for name in names)


def weights(network: nn.Module) -> int:
    return sum(parameter.numel() for parameter in network.parameters())


def test_folded_network_sees_and_rebuilds_every_pixel_at_about_the_unfolded_cost() -> None:
    folded = SSLAEModule(channels=CHANNELS, fold=2).model.network
    plain = SSLAEModule(channels=CHANNELS).model.network
    assert folded.stride == 2 * plain.stride
    images = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    folded.eval()
    assert folded(images).shape == (1, 3, 32, 48)
    # One pixel at an odd row and column (dropped by a strided stem) still changes the output, at that pixel too.
    moved = images.clone()
    moved[0, :, 17, 31] += 5.0
    change = (folded(moved) - folded(images)).abs().sum(dim=1)[0]
    assert change[17, 31] > 0
    # Only level 0's input and the head widen: the weights stay within a few percent of the unfolded network's.
    assert weights(plain) < weights(folded) < 1.1 * weights(plain)
    with pytest.raises(PatchAEError, match=r"must be a multiple of 8"):
        folded.check_input(torch.randn(1, 3, 20, 20))  # a multiple of the unfolded stride, 4


@pytest.mark.parametrize(
    "options, message",
    [
        ({"fold": 0}, r"model.fold=0 must be an integer >= 1"),
        (
            {"fold": 2, "backbone": "resnet18", "pretrained": False},
            r"model.fold=2 needs the from-scratch encoder",
        ),
        ({"skip_merge": "add"}, r"model.skip_merge='add' must be one of concat, convex"),
        (
            {"bottleneck_dilations": [0]},
            r"model.bottleneck_dilations=\[0\] must be a list of positive integers",
        ),
        ({"bottleneck_dilations": 2}, r"model.bottleneck_dilations=2 must be a list of positive integers"),
    ],
)
def test_bad_architecture_options_say_what_to_use(options, message) -> None:
    with pytest.raises(PatchAEError, match=message):
        SSLAEModule(channels=CHANNELS, **options)
