"""SSL-AE's corruption: exact masks, each kind of shape and fill, opacity, noise, determinism, bad settings."""

import pytest
import torch

from patchae.data.corruption import FILLS, SHAPES, Corruption, foreground_mask
from patchae.errors import PatchAEError


def picture(seed: int = 0, size: int = 48) -> torch.Tensor:
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", range(12))
def test_mask_is_exactly_the_changed_pixels(seed):
    image = picture(seed)
    out, mask = Corruption(noise_std=0.0)(image, torch.Generator().manual_seed(seed), source=picture(99))
    assert mask.shape == (1, 48, 48) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask[0].bool(), (out != image).any(dim=0))
    assert mask.sum() > 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fill", FILLS)
def test_every_shape_and_fill_changes_exactly_its_mask(shape, fill):
    corruption = Corruption(regions=(1, 1), shapes=(shape,), fills=(fill,), opacity=(1.0, 1.0), noise_std=0.0)
    image = picture(1)
    out, mask = corruption(image, torch.Generator().manual_seed(3), source=picture(2))
    assert 0 < mask.sum() < 48 * 48
    assert torch.equal(mask[0].bool(), (out != image).any(dim=0))
    assert out.min() >= 0 and out.max() <= 1


def test_image_fill_copies_the_source_and_opacity_blends():
    image, source = picture(1), torch.full((3, 48, 48), 0.25)
    opaque = Corruption(regions=(1, 1), fills=("image",), opacity=(1.0, 1.0), noise_std=0.0)
    out, mask = opaque(image, torch.Generator().manual_seed(5), source=source)
    inside = mask[0].bool()
    assert torch.all(out[:, inside] == 0.25)
    half = Corruption(regions=(1, 1), fills=("image",), opacity=(0.5, 0.5), noise_std=0.0)
    out, mask = half(image, torch.Generator().manual_seed(5), source=source)
    inside = mask[0].bool()
    assert torch.allclose(out[:, inside], 0.5 * 0.25 + 0.5 * image[:, inside])


def test_noise_is_added_everywhere_but_not_to_the_mask():
    image = torch.full((3, 64, 64), 0.5)
    clean, clean_mask = Corruption(noise_std=0.0)(image, torch.Generator().manual_seed(4))
    noisy, noisy_mask = Corruption(noise_std=0.05)(image, torch.Generator().manual_seed(4))
    assert torch.equal(clean_mask, noisy_mask)  # the same regions: the noise is drawn after them
    outside = ~clean_mask[0].bool()
    difference = (noisy - image)[:, outside]
    assert (difference != 0).float().mean() > 0.99
    assert 0.045 < float(difference.std()) < 0.055


def test_deterministic_under_a_seed():
    image = picture(0)
    first = Corruption()(image, torch.Generator().manual_seed(7))
    again = Corruption()(image, torch.Generator().manual_seed(7))
    other = Corruption()(image, torch.Generator().manual_seed(8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert torch.equal(Corruption(seed=3)(image)[0], Corruption(seed=3)(image)[0])


def test_region_count_and_size_follow_the_settings():
    image = picture(0, 64)
    none = Corruption(regions=(0, 0), noise_std=0.0)(image, torch.Generator().manual_seed(0))
    assert torch.equal(none[0], image) and none[1].sum() == 0
    areas = [
        Corruption(
            regions=(1, 1), shapes=("rectangle",), opacity=(1.0, 1.0), area_ratio=(0.04, 0.04), noise_std=0.0
        )(image, torch.Generator().manual_seed(seed), source=picture(9, 64))[1].mean()
        for seed in range(10)
    ]
    # 4 % of the image, less what falls off its border
    assert max(areas) <= 0.05 and sum(areas) / len(areas) > 0.02


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"shapes": ("star",)},
            "corruption.shapes=['star'] must be a non-empty list of rectangle, ellipse, blob",
        ),
        ({"fills": ()}, "corruption.fills=[] must be a non-empty list of image, texture, noise, color, warp"),
        (
            {"opacity": (0.8, 0.2)},
            "corruption.opacity=(0.8, 0.2) must be [low, high] with low <= high within [0.001, 1.0]",
        ),
        ({"noise_std": 1.5}, "corruption.noise_std=1.5 must be in [0, 1)"),
        ({"regions": "x"}, "corruption.regions='x' must be two numbers [low, high]"),
        ({"placement": "object"}, "corruption.placement='object' must be one of uniform, foreground"),
    ],
)
def test_bad_settings_say_what_to_change(settings, message):
    with pytest.raises(PatchAEError) as error:
        Corruption(**settings)
    assert str(error.value) == message


def test_warp_moves_the_images_own_content_within_the_amplitude():
    # a horizontal ramp: only a warp's x shift changes a value, so every changed pixel holds the value of a
    # pixel within the largest displacement of it
    ramp = torch.linspace(0, 1, 64).expand(3, 64, 64).clone()
    corruption = Corruption(
        regions=(1, 1), fills=("warp",), opacity=(1.0, 1.0), noise_std=0.0, warp_amplitude=(0.05, 0.05)
    )
    out, mask = corruption(ramp, torch.Generator().manual_seed(2), source=torch.zeros(3, 64, 64))
    inside = mask[0].bool()
    assert inside.sum() > 0 and torch.equal(inside, (out != ramp).any(dim=0))
    largest_step = 0.05 * 64 / 63  # 3.2 pixels of a ramp that rises 1/63 per pixel
    moved = float((out - ramp)[:, inside].abs().max())
    assert 0.2 * largest_step < moved <= 1.02 * largest_step  # Perlin noise peaks at 0.707, not 0.7


def object_on_plain_background(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A light background with a dark bar over 7 % of it, as a screw lies on its table; and the bar."""
    image = torch.full((3, size, size), 0.8)
    bar = torch.zeros(size, size, dtype=torch.bool)
    bar[size // 2 - 3 : size // 2 + 3, 8:-8] = True
    image[:, bar] = 0.3
    return image, bar


def test_foreground_mask_finds_the_object_and_nothing_on_a_plain_image():
    image, bar = object_on_plain_background()
    assert torch.equal(foreground_mask(image), bar)
    assert not foreground_mask(torch.full((3, 32, 32), 0.6)).any()


def test_foreground_placement_puts_the_regions_on_the_object():
    image, bar = object_on_plain_background()
    near_bar = torch.nn.functional.max_pool2d(bar[None, None].float(), 9, stride=1, padding=4)[0, 0].bool()

    def share_near_bar(placement: str) -> float:
        corruption = Corruption(regions=(1, 1), area_ratio=(0.002, 0.01), placement=placement, noise_std=0.0)
        masks = [
            corruption(image, torch.Generator().manual_seed(seed), source=picture(seed, 64))[1][0].bool()
            for seed in range(60)
        ]
        return float(sum((m & near_bar).sum() for m in masks) / sum(m.sum() for m in masks))

    # the bar and its 4-pixel surround are about a fifth of the image: uniform centres hit it about that often
    assert share_near_bar("uniform") < 0.4
    assert share_near_bar("foreground") > 0.9


def test_foreground_placement_falls_back_to_uniform_without_an_object():
    plain = torch.full((3, 48, 48), 0.6)
    out, mask = Corruption(placement="foreground", noise_std=0.0)(plain, torch.Generator().manual_seed(1))
    assert mask.sum() > 0 and torch.equal(mask[0].bool(), (out != plain).any(dim=0))
