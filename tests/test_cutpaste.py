"""CutPaste: pixels change only inside the returned mask, masks are exact, and everything is seeded."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from patchae.data.cutpaste import CutPaste
from patchae.errors import PatchAEError


@pytest.fixture(autouse=True)
def _single_thread():
    # Tiny tensor ops are dominated by thread hand-off on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _image(seed: int = 0, size: tuple[int, int] = (96, 112)) -> torch.Tensor:
    return torch.rand((3, *size), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("defect_type", ["normal", "scar", "both"])
def test_pixels_change_only_inside_the_mask(defect_type: str) -> None:
    image = _image()
    cutpaste = CutPaste(probability=1.0, defect_type=defect_type)
    for seed in range(150):
        out, mask = cutpaste(image, generator=torch.Generator().manual_seed(seed))
        assert out.shape == image.shape and mask.shape == (1, *image.shape[1:])
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert mask.sum() > 0, f"seed {seed}: applied but empty mask"
        outside = mask[0] == 0
        assert torch.equal(out[:, outside], image[:, outside]), f"seed {seed}: pixel outside the mask changed"
        assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("defect_type", ["normal", "scar"])
def test_mask_is_the_set_of_changed_pixels_on_a_piecewise_constant_image(defect_type: str) -> None:
    """Four flat quadrants: a pasted patch partly lands on its own colour, which is no defect."""
    image = torch.zeros(3, 64, 64)
    image[:, :32, 32:], image[:, 32:, :32], image[:, 32:, 32:] = 0.25, 0.5, 0.75
    cutpaste = CutPaste(probability=1.0, defect_type=defect_type, color_jitter=0.0)
    partly_unchanged = 0  # pastes whose changed pixels do not fill the pasted rectangle's box
    for seed in range(60):
        out, mask = cutpaste(image, generator=torch.Generator().manual_seed(seed))
        changed = (out != image).any(dim=0)
        assert torch.equal(mask[0].bool(), changed), f"seed {seed}"
        if changed.any():
            rows, cols = changed.any(dim=1).nonzero(), changed.any(dim=0).nonzero()
            box = (int(rows[-1]) - int(rows[0]) + 1) * (int(cols[-1]) - int(cols[0]) + 1)
            partly_unchanged += int(changed.sum()) < box
    if defect_type == "normal":  # a written rectangle would always fill its box
        assert partly_unchanged > 0


def test_patch_is_moved_away_from_where_it_was_cut() -> None:
    # Without jitter, a patch pasted back onto its own source would leave every pixel unchanged.
    image = _image(1)
    for defect_type in ("normal", "scar"):
        cutpaste = CutPaste(probability=1.0, defect_type=defect_type, color_jitter=0.0)
        for seed in range(100):
            out, mask = cutpaste(image, generator=torch.Generator().manual_seed(seed))
            changed = (out != image).any(dim=0)
            assert changed.any(), f"{defect_type} seed {seed}: nothing changed"
            assert changed.float().sum() >= 0.5 * mask.sum()


def test_normal_patch_is_a_rectangle_of_the_requested_area() -> None:
    height, width = 100, 120
    cutpaste = CutPaste(probability=1.0, defect_type="normal", area_ratio=(0.05, 0.1))
    for seed in range(50):
        _, mask = cutpaste(_image(seed, (height, width)), generator=torch.Generator().manual_seed(seed))
        rows, cols = mask[0].any(dim=1).nonzero(), mask[0].any(dim=0).nonzero()
        box_area = (int(rows[-1]) - int(rows[0]) + 1) * (int(cols[-1]) - int(cols[0]) + 1)
        assert mask.sum() == box_area  # a filled, axis-aligned rectangle
        ratio = box_area / (height * width)
        assert 0.04 <= ratio <= 0.115, ratio  # range +- rounding of the sides


def test_rotated_scar_mask_follows_the_strip_not_its_bounding_box() -> None:
    cutpaste = CutPaste(
        probability=1.0, defect_type="scar", scar_width=(6, 6), scar_length=(30, 30), rotation=(40, 40)
    )
    _, mask = cutpaste(_image(2, (128, 128)), generator=torch.Generator().manual_seed(0))
    area = float(mask.sum())
    assert abs(area - 6 * 30) <= 0.15 * 6 * 30
    rows, cols = mask[0].any(dim=1).nonzero(), mask[0].any(dim=0).nonzero()
    box_area = (int(rows[-1]) - int(rows[0]) + 1) * (int(cols[-1]) - int(cols[0]) + 1)
    expected_box = (6 * math.cos(math.radians(40)) + 30 * math.sin(math.radians(40))) * (
        6 * math.sin(math.radians(40)) + 30 * math.cos(math.radians(40))
    )
    assert box_area > 2.5 * area and abs(box_area - expected_box) < 0.25 * expected_box


def test_probability_zero_leaves_image_untouched_and_probability_half_applies_about_half() -> None:
    image = _image()
    never = CutPaste(probability=0.0, seed=0)
    for _ in range(20):
        out, mask = never(image)
        assert torch.equal(out, image) and mask.sum() == 0
    half = CutPaste(probability=0.5, seed=3)
    applied = sum(int(half(image)[1].sum() > 0) for _ in range(400))
    assert 160 <= applied <= 240


def test_same_seed_same_sequence_and_explicit_generators_override_the_internal_one() -> None:
    image = _image()
    first, second, other = (
        CutPaste(probability=1.0, seed=0),
        CutPaste(probability=1.0, seed=0),
        CutPaste(seed=1),
    )
    outs_first = [first(image) for _ in range(6)]
    outs_second = [second(image) for _ in range(6)]
    for (a, ma), (b, mb) in zip(outs_first, outs_second, strict=True):
        assert torch.equal(a, b) and torch.equal(ma, mb)
    assert any(not torch.equal(a, other(image)[0]) for a, _ in outs_first)
    # An explicit generator makes the result independent of the internal state.
    a, _ = first(image, generator=torch.Generator().manual_seed(42))
    b, _ = CutPaste(probability=1.0, seed=99)(image, generator=torch.Generator().manual_seed(42))
    assert torch.equal(a, b)


def test_pickling_keeps_the_generator_state() -> None:
    cutpaste = CutPaste(probability=1.0, seed=5)
    image = _image()
    cutpaste(image)
    clone = pickle.loads(pickle.dumps(cutpaste))
    assert torch.equal(cutpaste(image)[0], clone(image)[0])


def test_invalid_settings_raise_clear_errors() -> None:
    with pytest.raises(PatchAEError, match="defect_type 'stripe'"):
        CutPaste(defect_type="stripe")
    with pytest.raises(PatchAEError, match="probability"):
        CutPaste(probability=1.5)
    with pytest.raises(PatchAEError, match="area_ratio"):
        CutPaste(area_ratio=(0.2, 0.1))
    with pytest.raises(PatchAEError, match="scar_width"):
        CutPaste(scar_width=(0, 4))
    with pytest.raises(PatchAEError, match="color_jitter"):
        CutPaste(color_jitter=-0.1)


def test_repr_and_list_arguments_from_configs() -> None:
    cutpaste = CutPaste(area_ratio=[0.01, 0.2], scar_width=[2, 4], defect_type="scar")  # Hydra passes lists
    assert cutpaste.area_ratio == (0.01, 0.2) and cutpaste.scar_width == (2, 4)
    text = repr(cutpaste)
    assert text.startswith("CutPaste(") and "defect_type='scar'" in text and "area_ratio=(0.01, 0.2)" in text
    assert "_generator" not in text


def test_tiny_images_still_get_a_moved_patch() -> None:
    image = _image(0, (4, 5))
    cutpaste = CutPaste(probability=1.0, scar_length=(10, 25), color_jitter=0.0)
    for seed in range(30):
        out, mask = cutpaste(image, generator=torch.Generator().manual_seed(seed))
        assert mask.sum() > 0 and torch.equal(out[:, mask[0] == 0], image[:, mask[0] == 0])
