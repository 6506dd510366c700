import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from conftest import TINY_SYNTHETIC
from patchae.errors import PatchAEError
from patchae.models import PatchCoreModule
from patchae.models.backbone import create_feature_extractor
from patchae.models.features import locally_aware_features, pool_channels
from patchae.scoring.maps import reweighted_image_scores
from patchae.train import fit_and_test

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = [
    *TINY_SYNTHETIC,
    "data.n_train=8",
    "data.n_test_good=4",
    "data.n_test_defect=4",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "trainer.max_epochs=1",
    "bank.coreset_ratio=0.5",
    "logger=none",
    "+trainer.enable_model_summary=false",
]


def test_locally_aware_features_average_each_3x3_neighbourhood_with_zero_padding():
    fine = torch.ones(1, 2, 4, 4)
    coarse = torch.arange(4.0).reshape(1, 1, 2, 2)
    features = locally_aware_features([fine, coarse], patch_size=3)
    assert features.shape == (1, 3, 4, 4)
    assert features[0, 0, 1, 1] == pytest.approx(1.0)  # interior: nine ones
    assert features[0, 0, 0, 0] == pytest.approx(4 / 9)  # corner: four ones, five padded zeros
    assert features[0, 0, 0, 1] == pytest.approx(6 / 9)  # edge
    # The coarse stage is pooled on its own grid first (every cell sees all four values: 6/9 at each), then
    # resized to the fine grid.
    pooled = F.avg_pool2d(coarse, 3, stride=1, padding=1)
    assert torch.allclose(pooled, torch.full((1, 1, 2, 2), 6 / 9))
    assert torch.allclose(
        features[:, 2:], F.interpolate(pooled, size=(4, 4), mode="bilinear", align_corners=False)
    )


def test_patch_size_one_gives_the_plain_backbone_features():
    torch.manual_seed(0)
    model = PatchCoreModule("resnet18", layers=[2], pretrained=False, patch_size=1).eval()
    backbone = create_feature_extractor("resnet18", [2], pretrained=False)
    backbone.load_state_dict(model.model.backbone.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.model.embed(images), backbone.eval()(images)[0], atol=1e-6)


def test_pool_channels_averages_neighbouring_channels():
    embedding = torch.arange(8.0).reshape(1, 4, 1, 2)  # channels c hold 2c, 2c+1 over width
    reduced = pool_channels(embedding, 2)
    assert reduced.shape == (1, 2, 1, 2)
    assert torch.allclose(reduced[0, :, 0, 0], torch.tensor([(0 + 2) / 2, (4 + 6) / 2]))
    assert pool_channels(embedding, 4) is embedding


def test_embedding_dim_weighs_every_stage_the_same():
    """As PatchCore's reference code: stages are pooled to the same size before they are combined."""
    shallow, deep = torch.ones(1, 2, 2, 2), torch.zeros(1, 6, 2, 2)  # 2 channels of ones, 6 of zeros
    embedding = locally_aware_features([shallow, deep], patch_size=1, embedding_dim=2)
    assert embedding.shape == (1, 2, 2, 2)
    assert torch.allclose(embedding.mean(), torch.tensor(0.5))  # pooling the plain concatenation: 0.25


def test_reweighted_score_matches_the_formula_by_hand():
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [10.0, 10.0]])
    # Two patches; the second (score 3.0) is the most anomalous; its feature (0, -1) is nearest to bank[0].
    features = torch.tensor([[[0.5, 0.0], [0.0, -1.0]]])
    scores = torch.tensor([[0.5, 3.0]])
    # N_3(m*) for m* = (0, 0): itself, (1, 0), (0, 2). Distances from (0, -1): 1, sqrt(2), 3.
    distances = torch.tensor([1.0, math.sqrt(2.0), 3.0])
    expected = (1 - math.exp(1.0) / distances.exp().sum().item()) * 3.0
    result = reweighted_image_scores(features, scores, bank, neighbors=3)
    assert result.shape == (1,)
    assert result.item() == pytest.approx(expected, rel=1e-5)
    # b = 1: m* alone, softmax weight 1, score 0.
    assert reweighted_image_scores(features, scores, bank, neighbors=1).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("search", ["faiss", "torch"])
def test_scores_are_zero_for_images_in_the_bank(search):
    torch.manual_seed(0)
    model = PatchCoreModule(
        "resnet18", (2, 3), pretrained=False, bank={"search": search}, scoring={"blur_sigma": 1.0}
    ).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        model.model.scorer.fit(model.model.embed_patches(images[:2]))
        maps, scores = model(images)
    assert maps.shape == (3, 64, 64)
    assert scores[:2].max() < 1e-2
    assert scores[2] > 10 * scores[:2].max() + 0.1


def test_reweighting_scales_the_largest_patch_score_down():
    torch.manual_seed(0)
    plain = PatchCoreModule(
        "resnet18", (2, 3), pretrained=False, bank={"search": "torch"}, scoring={"blur_sigma": 0.0}
    )
    plain.eval()
    reweighted = PatchCoreModule(
        "resnet18",
        (2, 3),
        pretrained=False,
        bank={"search": "torch"},
        scoring={"blur_sigma": 0.0},
        reweight=True,
    )
    reweighted.load_state_dict(plain.state_dict(), strict=False)
    reweighted.eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        bank = plain.model.embed_patches(images[:1])
        plain.model.scorer.fit(bank)
        reweighted.model.scorer.fit(bank)
        _, max_scores = plain(images)  # no blur: the map's max is the largest patch score s*
        maps, scores = reweighted(images)
    assert maps.shape == (3, 64, 64)
    assert torch.all(scores <= max_scores + 1e-6)
    assert torch.all(scores[1:] > 0)


def test_backbone_stays_frozen_in_eval_mode():
    model = PatchCoreModule("resnet18", (2, 3), pretrained=False).train()
    assert not model.model.backbone.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.requires_training is False


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"patch_size": 2}, "patch_size"), ({"layers": []}, "layers"), ({"embedding_dim": 0}, "embedding_dim")],
)
def test_bad_settings_are_clear_errors(kwargs, match):
    with pytest.raises(PatchAEError, match=match):
        PatchCoreModule(**{"backbone": "resnet18", "pretrained": False, **kwargs})


def test_input_size_must_fit_the_stride():
    model = PatchCoreModule("resnet18", (2, 3), pretrained=False)
    with pytest.raises(PatchAEError, match="multiple of"):
        model.model.embed(torch.randn(1, 3, 70, 70))


def test_end_to_end_run_builds_the_bank_without_training(tmp_path):
    out = tmp_path / "run"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                *TINY,
                "model=patchcore",
                "logger=csv",
                f"data.root={tmp_path / 'data'}",
                f"paths.output_dir={out}",
            ],
        )
    results = fit_and_test(cfg)
    saved = json.loads((out / "results.json").read_text())
    assert saved["model"] == "PatchCoreModule"
    assert saved["alpha"] is None  # no Patch AE loss
    # Each 64 px training image gives 8 x 8 patches (stride 8); half are kept. Up to 8 images build the bank
    # (the data module may hold one or two out for threshold calibration).
    images_in_bank, remainder = divmod(saved["bank_size"], 8 * 8 // 2)
    assert remainder == 0 and 6 <= images_in_bank <= 8
    assert 0.5 < results["image_auroc"] <= 1.0
    assert results["pixel_auroc"] > 0.5
    model = PatchCoreModule.load_from_checkpoint(
        out / "model.ckpt", pretrained=False, map_location="cpu"
    ).eval()
    assert model.model.scorer.bank.shape == (saved["bank_size"], 40 + 112)
    # The fit loop was skipped: the CSV log has the test metrics and no training loss.
    logged = (out / "csv" / "version_0" / "metrics.csv").read_text()
    assert "test/image_auroc" in logged
    assert "train/loss" not in logged


def test_top_k_image_score_lies_between_the_maps_mean_and_max():
    torch.manual_seed(0)
    model = PatchCoreModule(
        "resnet18",
        (2, 3),
        pretrained=False,
        bank={"search": "torch"},
        scoring={"image_score": "topk", "top_k": 0.05},
    )
    model.eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        model.model.scorer.fit(model.model.embed_patches(images[:1]))
        maps, scores = model(images)
    flat = maps.flatten(1)
    expected = flat.topk(205, dim=1).values.mean(dim=1)  # ceil(0.05 * 64 * 64) pixels
    assert torch.allclose(scores, expected)
    assert torch.all(scores <= flat.amax(dim=1)) and torch.all(scores >= flat.mean(dim=1))
