"""The lighting jitter the reconstruction models train with: a global gain and contrast change, seeded."""

import pytest
import torch

from patchae.data.lighting import LightingJitter
from patchae.errors import PatchAEError
from patchae.models import DAADModule, SSLAEModule


def test_gain_and_contrast_stay_in_their_ranges_and_clip():
    image = torch.full((3, 16, 16), 0.5)
    image[:, :8] = 0.25
    lighting = LightingJitter(brightness=(0.8, 1.2), contrast=(0.5, 0.5))
    for seed in range(20):
        out = lighting(image, torch.Generator().manual_seed(seed))
        gain = float(out.mean() / image.mean())  # contrast keeps the mean; the gain scales it
        assert 0.8 - 1e-6 <= gain <= 1.2 + 1e-6
        spread = float(out[:, 8:].mean() - out[:, :8].mean())
        assert spread == pytest.approx(0.5 * 0.25 * gain, rel=1e-5)
    bright = LightingJitter(brightness=(3.0, 3.0))(image, torch.Generator().manual_seed(0))
    assert float(bright.max()) == 1.0  # clipped to [0, 1]


def test_inactive_lighting_leaves_training_batches_unchanged_and_active_is_seeded():
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = SSLAEModule(channels=(4, 8, 16))
    assert torch.equal(model.vary_lighting(images, LightingJitter(), 0, 5), images)
    lighting = LightingJitter(brightness=(0.85, 1.15), contrast=(0.9, 1.1))
    first, again = model.vary_lighting(images, lighting, 0, 5), model.vary_lighting(images, lighting, 0, 5)
    assert torch.equal(first, again) and not torch.equal(first, model.vary_lighting(images, lighting, 0, 6))
    assert not torch.equal(first, images)
    assert DAADModule(
        channels=(4, 8, 16), block_sizes=(4, 2, 1), lighting={"brightness": [0.9, 1.1]}
    ).lighting.active


def test_bad_ranges_say_what_to_change():
    with pytest.raises(PatchAEError, match=r"lighting.brightness=\[1.2, 0.8\] must be a range"):
        LightingJitter(brightness=(1.2, 0.8))
