"""One scoring path: every model's maps and scores equal an independent reference of the documented scoring,
its export equals its checkpoint, and checkpoints written before the scorers existed still load.

The reference below is written from the method's description with other library calls (cdist, interpolate,
torchvision's Gaussian blur), not with patchae's scorers: nearest-bank distance per patch (mean over k), bilinear
upsampling, Gaussian blur (sigma, 4 sigma each side, reflect padding), image score = the map's maximum; for the
reconstruction models each error term standardised with its mean and std over the fitting images' pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur

from checkpoint_fixture import save_checkpoint
from patchae.deploy.export import export_model
from patchae.deploy.loading import load_model
from patchae.models import DAADModule, PatchAEModule, PatchCoreModule, SSLAEModule, torch_model
from patchae.thresholds import Thresholds

LEGACY = Path(__file__).parent / "data" / "legacy_checkpoints.json"
SIGMA = 2.0


def blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, H, W) -> blurred, with torchvision's Gaussian blur (reflect padding)."""
    size = 2 * int(4.0 * sigma + 0.5) + 1
    return gaussian_blur(maps.unsqueeze(1), [size, size], [sigma, sigma]).squeeze(1)


def reference_bank_scores(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    embedding = model.model.embed(images).double()
    batch, dim, height, width = embedding.shape
    queries = embedding.permute(0, 2, 3, 1).reshape(-1, dim)
    k = model.bank_settings.num_neighbors
    distances = torch.cdist(queries, model.model.scorer.bank.double()).topk(k, dim=1, largest=False).values
    patch = distances.mean(dim=1).reshape(batch, 1, height, width)
    maps = F.interpolate(patch, size=images.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
    maps = blur(maps, SIGMA)
    return maps, maps.flatten(1).amax(dim=1)


def reference_statistics_scores(model, fit_images, images) -> tuple[torch.Tensor, torch.Tensor]:
    fitted = model.model.error_terms(fit_images).double()
    mean = fitted.mean(dim=(0, 2, 3))
    std = fitted.permute(1, 0, 2, 3).flatten(1).std(dim=1, unbiased=False)
    weights = model.model.scorer.term_weights.double()
    terms = model.model.error_terms(images).double()
    standard = ((terms - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1) * weights.view(1, -1, 1, 1)).sum(1)
    maps = blur(standard, SIGMA)
    return maps, maps.flatten(1).amax(dim=1)


def untrained(name: str):
    """Each model with random weights (nothing downloaded), the torch search and a 2 px blur, at 32 px."""
    torch.manual_seed(0)
    groups = {"scoring": {"blur_sigma": SIGMA}, "preprocessing": {"image_size": 32, "crop_size": None}}
    if name == "patch_ae":
        return PatchAEModule(
            "resnet18",
            (2, 3),
            pretrained=False,
            c3=16,
            bank_features="features",
            bank={"search": "torch"},
            **groups,
        )
    if name == "patchcore":
        return PatchCoreModule(
            "resnet18", (2, 3), pretrained=False, bank={"search": "torch", "num_neighbors": 3}, **groups
        )
    if name == "ssl_ae":
        return SSLAEModule(channels=(4, 8, 16), **groups)
    return DAADModule(
        channels=(4, 8, 16), block_sizes=(4, 2, 1), memory_items=6, discriminator_width=4, **groups
    )


MODELS = ["patch_ae", "patchcore", "ssl_ae", "daad"]


@pytest.fixture(params=MODELS)
def fitted(request):
    """(name, model fitted on 3 random 'normal' images, 4 other images)."""
    model = untrained(request.param).eval()
    generator = torch.Generator().manual_seed(1)
    normal, others = (
        torch.randn(3, 3, 32, 32, generator=generator),
        torch.randn(4, 3, 32, 32, generator=generator),
    )
    with torch.no_grad():
        model.fit_scorer([normal[:2], normal[2:]])  # two batches: the statistics gather over batches
    return request.param, model, normal, others


@torch.no_grad()
def test_maps_and_scores_equal_the_independent_reference(fitted):
    name, model, normal, images = fitted
    maps, scores = model(images)
    if name in ("patch_ae", "patchcore"):
        expected_maps, expected_scores = reference_bank_scores(model, images)
        assert model.bank_size == 3 * 4 * 4  # every patch of the fitting images (no subsampling asked)
    else:
        expected_maps, expected_scores = reference_statistics_scores(model, normal, images)
    assert maps.shape == (4, 32, 32) and scores.shape == (4,)
    scale = float(expected_maps.abs().max())
    assert (maps.double() - expected_maps).abs().max() <= 1e-4 * max(1.0, scale)
    assert (scores.double() - expected_scores).abs().max() <= 1e-4 * max(1.0, scale)


@torch.no_grad()
def test_cpu_batches_are_scored_a_few_images_at_a_time_with_the_same_results(fitted, monkeypatch):
    name, model, normal, _ = fitted
    images = torch.randn(9, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    sizes = []
    inner = model.model.scorer.forward
    monkeypatch.setattr(
        model.model.scorer, "forward", lambda *a, **k: sizes.append(len(a[0])) or inner(*a, **k)
    )
    maps, scores = model(images)
    assert sizes == [4, 4, 1]  # torch_model.CPU_MICRO_BATCH: no large activations to page-fault in
    monkeypatch.setattr(torch_model, "CPU_MICRO_BATCH", 64)
    whole_maps, whole_scores = model(images)
    assert sizes[3:] == [9]
    assert torch.allclose(maps, whole_maps, atol=1e-5) and torch.allclose(scores, whole_scores, atol=1e-5)


@torch.no_grad()
def test_mixed_precision_scores_in_float32(fitted):
    """Inside autocast (trainer.precision=bf16-mixed runs validation and test in it) maps and scores stay float32,
    which the metrics' NumPy can read; a reconstruction model's network runs in float32 for its error (the same
    maps), a bank model's embedding is rounded to bf16 and only the embedding (maps within 2 %)."""
    name, model, _, images = fitted
    maps, scores = model(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed_maps, mixed_scores = model(images)
    assert mixed_maps.dtype == mixed_scores.dtype == torch.float32
    tolerance = 1e-5 if name in ("ssl_ae", "daad") else 2e-2
    scale = float(maps.abs().max())
    assert (mixed_maps - maps).abs().max() <= tolerance * scale
    assert (mixed_scores - scores).abs().max() <= tolerance * scale


@pytest.mark.parametrize("name", ["patch_ae", "patchcore"])
@torch.no_grad()
def test_faiss_and_torch_search_give_the_same_scores(name):
    model = untrained(name).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.fit_scorer([images[:2]])
    torch_maps, torch_scores = model(images)
    model.model.scorer.set_search("faiss")
    faiss_maps, faiss_scores = model(images)
    assert torch.allclose(faiss_maps, torch_maps, atol=1e-4) and torch.allclose(
        faiss_scores, torch_scores, atol=1e-4
    )


def test_export_of_every_model_traces_its_own_forward(fitted, tmp_path):
    """TorchScript and ONNX of each model agree with its checkpoint to 1e-4 (export checks it and raises)."""
    name, model, _, images = fitted
    model.thresholds = Thresholds(method="manual", value=1.0, low=0.0, high=2.0)
    ckpt = tmp_path / f"{name}.ckpt"
    save_checkpoint(model, ckpt)
    result = export_model(ckpt, tmp_path / "export", format="both", example=images)
    assert max(result["onnx_max_difference"].values()) <= 1e-4
    assert max(result["torchscript_max_difference"].values()) <= 1e-4
    reloaded = load_model(ckpt, search="torch")
    with torch.no_grad():
        assert torch.allclose(reloaded(images)[1], model(images)[1], rtol=1e-6, atol=0)


# -- checkpoints written before this layout -------------------------------------------------------------------
# tests/data/legacy_checkpoints.json records, for checkpoints that train.py wrote before the scorers existed
# (flat settings, weights under their old names), their hyper-parameters, their patchae key and the name and
# shape of every tensor. The test fills the tensors with random values, writes the file, and loads it.
LEGACY_RUNS = json.loads(LEGACY.read_text())


def legacy_checkpoint(record: dict, path: Path) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in record["state_dict"].items():
        if record["dtypes"].get(key) == "int64":
            state[key] = torch.zeros(shape, dtype=torch.long)
        elif key.endswith(("running_var", "term_std", "term_weights")):
            state[key] = torch.rand(shape, generator=generator) + 0.5  # positive, as trained ones are
        else:
            state[key] = 0.1 * torch.randn(shape, generator=generator)
    checkpoint = {
        "state_dict": state,
        "hyper_parameters": record["hyper_parameters"],
        "patchae": record["patchae"],
        "pytorch-lightning_version": record["pytorch-lightning_version"],
    }
    torch.save(checkpoint, path)
    return state


@pytest.mark.parametrize("run", sorted(LEGACY_RUNS))
def test_checkpoints_written_before_the_scorers_still_load(run, tmp_path):
    record = LEGACY_RUNS[run]
    saved = legacy_checkpoint(record, tmp_path / "model.ckpt")
    model = load_model(tmp_path / "model.ckpt", fold_batchnorm=False)  # its weights as saved
    assert f"{type(model).__module__}.{type(model).__name__}".endswith(
        record["patchae"]["model_class"].split(".")[-1]
    )
    assert model.thresholds.value == pytest.approx(record["patchae"]["thresholds"]["value"])
    # Every saved tensor is in the model (under its new name), and the old empty bank of SSL-AE / DAAD is gone.
    loaded = model.state_dict()
    assert len(loaded) == len(saved) - (
        0 if "memory_bank" in record["state_dict"] and saved["memory_bank"].numel() else 1
    )
    remaining = {key: value for key, value in saved.items() if value.numel() or key != "memory_bank"}
    signature = sorted((tuple(v.shape), round(float(v.double().sum()), 6)) for v in remaining.values())
    assert signature == sorted((tuple(v.shape), round(float(v.double().sum()), 6)) for v in loaded.values())
    if saved["memory_bank"].numel():
        assert torch.equal(model.model.scorer.bank, saved["memory_bank"])
    hparams = record["hyper_parameters"]
    assert model.scoring.blur_sigma == hparams["blur_sigma"]
    assert model.preprocessing.image_size == hparams["image_size"]
    assert model.threshold_settings.method == hparams["threshold_method"]
    if (hparams.get("tiling") or {}).get("tile"):
        assert model.tiling is not None and model.tiling.as_config() == hparams["tiling"]
    size = model.preprocessing.image_size
    with torch.no_grad():
        maps, scores = model(torch.randn(2, 3, size, size))
    assert maps.shape == (2, size, size) and torch.isfinite(scores).all()
