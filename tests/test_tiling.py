"""Tiling for large images: tiles cover the input, stitch back as a mean over overlaps, and work end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from checkpoint_fixture import train_tiny
from patchae.data import SyntheticDataModule
from patchae.deploy.export import export_model
from patchae.deploy.predict import Predictor
from patchae.errors import PatchAEError
from patchae.models import PatchCoreModule
from patchae.tiling import Tiling

TILING = ["data.tiling.tile=32", "data.tiling.stride=24"]  # 64 px inputs: tiles at 0, 24 and 32 on each axis


def test_tiles_cover_the_input_the_last_one_flush_with_the_edge():
    tiling = Tiling(256, 192)
    assert tiling.starts(512) == [0, 192, 256]
    assert tiling.starts(256) == [0]
    assert tiling.starts(448) == [0, 192]
    assert tiling.count(512, 768) == 3 * 4  # 768: 0, 192, 384, 512


def test_cut_then_stitch_gives_the_input_back():
    tiling = Tiling(16, 12)
    images = torch.rand(2, 3, 40, 28)
    tiles = tiling.cut(images)
    assert tiles.shape == (2 * tiling.count(40, 28), 3, 16, 16)
    assert torch.equal(tiles[0], images[0, :, :16, :16])
    assert torch.allclose(tiling.stitch(tiles[:, 1], 40, 28), images[:, 1])


def test_stitch_takes_the_mean_where_tiles_overlap():
    tiling = Tiling(4, 2)  # 6 px: tiles at 0 and 2, overlapping in pixels 2 and 3
    tile_maps = torch.stack([torch.full((4, 4), float(value)) for value in (0, 4, 8, 12)])
    stitched = tiling.stitch(tile_maps, 6, 6)[0]
    assert stitched[0].tolist() == [0, 0, 2, 2, 4, 4]
    assert stitched[2].tolist() == [4, 4, 6, 6, 8, 8]
    assert stitched[5, 5] == 12


@pytest.mark.parametrize(
    "config, message",
    [
        ({"tile": 256, "stride": 300}, "data.tiling.stride=300 is larger than data.tiling.tile=256"),
        ({"tile": 0, "stride": None}, "data.tiling.tile must be a positive integer, got 0"),
        ({"tile": None, "stride": 192}, "data.tiling.stride is set but data.tiling.tile is not"),
        ({"tile": 256, "overlap": 64}, "data.tiling has unknown key(s) overlap; use tile and stride"),
    ],
)
def test_bad_tiling_keys_are_one_line(config, message):
    with pytest.raises(PatchAEError) as error:
        Tiling.from_config(config)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_no_tiling_without_a_tile():
    assert Tiling.from_config(None) is None
    assert Tiling.from_config({"tile": None, "stride": None}) is None
    assert Tiling.from_config({"tile": 64}) == Tiling(64, 64)


def test_a_tile_larger_than_the_input_is_refused(tmp_path):
    with pytest.raises(
        PatchAEError, match=r"data.tiling.tile=96 is larger than the model input 64x64; use a tile"
    ):
        SyntheticDataModule(tmp_path, image_size=64, crop_size=None, tiling={"tile": 96, "stride": 64})


def test_training_items_are_random_tiles_with_their_masks(tmp_path):
    datamodule = SyntheticDataModule(
        tmp_path, n_train=4, n_test_good=1, n_test_defect=1, synthetic_size=64, image_size=64, crop_size=None,
        tiling={"tile": 32, "stride": 24},
    )  # fmt: skip
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape[-2:] == (32, 32) and batch["mask"].shape[-2:] == (32, 32)
    assert next(iter(datamodule.test_dataloader()))["image"].shape[-2:] == (64, 64)  # tiled by the model


def patchcore(tiling: dict | None = None, **kwargs) -> PatchCoreModule:
    torch.manual_seed(0)  # the same random backbone and bank every time
    model = PatchCoreModule(
        "resnet18",
        (2, 3),
        pretrained=False,
        bank={"search": "torch"},
        scoring={"blur_sigma": 2.0},
        preprocessing={"tiling": tiling},
        **kwargs,
    ).eval()
    model.model.scorer.fit(torch.randn(50, model.model.embed(torch.zeros(1, 3, 32, 32)).shape[1]))
    return model


@torch.no_grad()
def test_one_tile_the_size_of_the_input_scores_as_without_tiling():
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    maps, scores = patchcore()(images)
    tiled_maps, tiled_scores = patchcore(tiling={"tile": 32, "stride": 32})(images)
    assert torch.allclose(maps, tiled_maps, atol=1e-5) and torch.allclose(scores, tiled_scores, atol=1e-5)


@torch.no_grad()
def test_tiled_maps_have_the_input_size_and_the_score_is_their_max():
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    model = patchcore(tiling={"tile": 32, "stride": 24})
    maps, scores = model(images)
    assert maps.shape == (2, 64, 96)
    assert torch.allclose(scores, maps.flatten(1).amax(dim=1))
    assert (
        model.model.embed_patches(images).shape[0] == 2 * model.tiling.count(64, 96) * 4 * 4
    )  # 32 px tile: 4x4 patches
    reweighted = patchcore(tiling={"tile": 32, "stride": 24}, reweight=True)(images)[1]
    assert reweighted.shape == (2,) and bool((reweighted <= scores + 1e-6).all())


@pytest.fixture(scope="module")
def tiled_run(tmp_path_factory):
    """Patch AE (trained on random tiles) with its bank, test and thresholds on 32 px tiles of 64 px images."""
    return train_tiny(tmp_path_factory.mktemp("tiled"), *TILING)


def test_tiled_patch_ae_trains_and_tests(tiled_run):
    assert tiled_run.results["image_auroc"] >= 0.8 and tiled_run.results["pixel_auroc"] >= 0.8
    assert tiled_run.results["bank_size"] > 0


def test_tiled_checkpoint_predicts_and_exports(tiled_run, tmp_path):
    predictor = Predictor.from_checkpoint(tiled_run.ckpt, device="cpu")
    assert predictor.model.tiling == Tiling(32, 24)
    images = sorted((tiled_run.data_dir / "test").rglob("*.png"))[:3]
    predictions = list(predictor.predict_paths(images))
    assert [p.anomaly_map.shape for p in predictions] == [(64, 64)] * 3
    result = export_model(tiled_run.ckpt, tmp_path / "export", format="both", bank_block=64)
    assert max(result["torchscript_max_difference"].values()) < 1e-4
    assert max(result["onnx_max_difference"].values()) < 1e-4
    exported = json.loads((tmp_path / "export" / "export.json").read_text())
    assert exported["input"]["tiling"] == {"tile": 32, "stride": 24}
    assert exported["input"]["shape"] == ["batch", 3, 64, 64]
    assert np.isfinite([p.score for p in predictions]).all()
