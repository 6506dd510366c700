"""Speed benchmark against anomalib (table, ratios, a missing anomalib), ONNX Runtime prediction, fused maps."""

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur

from checkpoint_fixture import session_checkpoint_fixture
from conftest import TINY_RUN
from patchae.benchmarks.speed import (
    ANOMALIB_HINT,
    SpeedConfig,
    auroc,
    format_table,
    random_coreset,
    ratio,
    run_benchmark,
)
from patchae.deploy.predict import Predictor, predict_to_folder
from patchae.errors import PatchAEError
from patchae.scoring.maps import anomaly_maps, blur_kernel_size

trained = session_checkpoint_fixture()


def without_anomalib(monkeypatch):
    for name in (
        "anomalib",
        "anomalib.data",
        "anomalib.engine",
        "anomalib.models",
        "anomalib.pre_processing",
    ):
        monkeypatch.setitem(sys.modules, name, None)  # `import anomalib...` now raises ImportError


def test_speed_benchmark_tiny_run_without_anomalib(tmp_path, monkeypatch):
    without_anomalib(monkeypatch)
    tiny = [override for override in TINY_RUN if override not in ("logger=none", "~callbacks.progress")]
    cfg = SpeedConfig(
        root=str(tmp_path / "data"),
        category="synthetic",
        systems=["patchcore", "anomalib"],
        runtimes=["torch"],
        batch_sizes=[1, 4],
        iterations=1,
        warmup=0,
        num_workers=0,
        isolate=False,
        output=str(tmp_path / "speed"),
        overrides=tiny,
    )
    results = run_benchmark(cfg)
    patchcore, anomalib = results["systems"]["patchcore"], results["systems"]["anomalib"]
    assert anomalib == {"system": "anomalib", "missing": ANOMALIB_HINT}
    assert patchcore["bank_size"] > 0 and patchcore["coreset_seconds"] > 0
    assert patchcore["fit_seconds"] >= patchcore["coreset_seconds"]
    timings = patchcore["runtimes"]["torch"]["model_time"]
    assert [t["batch_size"] for t in timings] == [1, 4]
    assert all(t["images_per_second"] > 0 for t in timings)
    assert patchcore["runtimes"]["torch"]["end_to_end_images"] == 12  # 6 good + 6 defective test images
    assert patchcore["image_auroc"] == pytest.approx(patchcore["runtimes"]["torch"]["predict_image_auroc"])
    # Each phase's peak is its own; the whole process's is the largest of them.
    phases = [patchcore["peak_fit_test_mb"], patchcore["runtimes"]["torch"]["peak_memory_mb"]]
    assert all(peak > 0 for peak in phases) and patchcore["peak_memory_mb"] >= max(phases)
    table = (tmp_path / "speed" / "speed.md").read_text()
    assert table == format_table(results) + "\n"
    assert json.loads((tmp_path / "speed" / "speed.json").read_text())["systems"]["anomalib"]["missing"]
    lines = table.splitlines()
    assert lines[0] == "|  | PatchCore | anomalib PatchCore | PatchCore vs anomalib |"
    bank_row = next(line for line in lines if line.startswith("| bank vectors"))
    assert bank_row == f"| bank vectors | {patchcore['bank_size']} | missing |  |"
    assert f"anomalib PatchCore: {ANOMALIB_HINT}" in lines


def fake_results():
    def system(rate32, fit, memory, image_auroc):
        timing = {"batch_size": 32, "images_per_second": rate32}
        timing |= {"latency_per_image_ms_p50": 1000 / rate32, "latency_per_image_ms_p95": 1200 / rate32}
        return {
            "bank_size": 100,
            "coreset_seconds": fit / 2,
            "fit_seconds": fit,
            "image_auroc": image_auroc,
            "pixel_auroc": 0.9,
            "peak_memory_mb": memory,
            "runtimes": {"torch": {"model_time": [timing], "end_to_end_images_per_second": rate32 / 2}},
        }

    return {
        "config": {
            "runtimes": ["torch"],
            "batch_sizes": [32],
            "category": "bottle",
            "coreset_ratio": 0.1,
            "seed": 0,
        },
        "machine": {"cpu": "test CPU", "cores": 2, "torch": "2"},
        "systems": {
            "patchcore": system(20.0, 10.0, 500.0, 0.995),
            "anomalib": system(8.0, 40.0, 1500.0, 0.99),
        },
    }


def test_ratio_column_says_how_many_times_better():
    lines = {line.split(" | ")[0][2:]: line for line in format_table(fake_results()).splitlines()}
    assert lines["model-time images/s, batch 32 (torch)"].endswith("| 20.0 | 8.0 | 2.50x |")
    assert lines["train + bank s"].endswith("| 10.0 | 40.0 | 4.00x |")  # 4x less time
    assert lines["coreset s"].endswith("| 5.0 | 20.0 | 4.00x |")
    assert lines["peak memory MB, whole process"].endswith("| 500.0 | 1500.0 | 3.00x |")
    assert lines["image AUROC %"].endswith("| 99.50 | 99.00 | +0.50 pt |")
    assert lines["ms/image p50 / p95, batch 32 (torch)"].endswith("| 50.0 / 60.0 | 125.0 / 150.0 |  |")
    assert ratio("rate", 1.0, None) == "" and ratio("time", float("nan"), 2.0) == ""


def test_auroc_of_raw_distances_is_not_squashed():
    # torchmetrics would squash raw scores > 1 with a sigmoid (all ~1.0, AUROC 0.5); the ranking must count.
    scores = torch.tensor([40.0, 41.0, 42.0, 60.0, 61.0])
    assert auroc(scores, torch.tensor([0, 0, 0, 1, 1])) == 1.0
    assert auroc(scores, torch.tensor([0, 1, 0, 0, 1])) == pytest.approx(4 / 6)  # 41 beats only 40
    assert np.isnan(auroc(scores, torch.zeros(5)))


def test_bad_system_is_a_one_line_error(tmp_path):
    with pytest.raises(
        PatchAEError, match=r"systems=\['anomalip'\] are unknown; use some of patch_ae, patchcore, anomalib"
    ):
        run_benchmark(SpeedConfig(systems=["anomalip"], output=str(tmp_path)))


@pytest.mark.parametrize(
    ("patches", "size", "sigma"),
    [((3, 8, 8), (64, 64), 4.0), ((2, 7, 9), (56, 72), 2.0), ((2, 28, 28), (224, 224), 0.0)],
)
def test_fused_maps_equal_upsampling_then_blur(patches, size, sigma):
    scores = torch.rand(*patches, generator=torch.Generator().manual_seed(0)) * 5
    expected = F.interpolate(scores.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
    if sigma > 0:
        expected = gaussian_blur(expected, kernel_size=[blur_kernel_size(sigma)] * 2, sigma=[sigma, sigma])
    maps = anomaly_maps(scores, size, sigma)
    assert maps.shape == (patches[0], *size)
    assert torch.allclose(maps, expected.squeeze(1), atol=5e-5, rtol=0)


def test_onnx_runtime_predicts_as_torch(trained, tmp_path):
    scores = {}
    for runtime in ("torch", "onnx"):
        summary = predict_to_folder(
            trained.ckpt,
            trained.data_dir,
            tmp_path / runtime,
            device="cpu",
            overlays=False,
            save_maps=True,
            show_progress=False,
            runtime=runtime,
        )
        assert summary["runtime"] == runtime and summary["predicted"] == 12
        rows = json.loads((tmp_path / runtime / "predictions.json").read_text())
        scores[runtime] = {row["path"]: row for row in rows}
    assert scores["torch"].keys() == scores["onnx"].keys()
    for path, row in scores["torch"].items():
        onnx_row = scores["onnx"][path]
        assert onnx_row["score"] == pytest.approx(row["score"], rel=1e-4, abs=1e-4)
        assert onnx_row["decision"] == row["decision"]
    for map_file in (tmp_path / "torch" / "maps").iterdir():
        torch_map, onnx_map = np.load(map_file), np.load(tmp_path / "onnx" / "maps" / map_file.name)
        assert np.abs(torch_map - onnx_map).max() < 1e-4
    exported = trained.ckpt.parent / "export" / "model.onnx"
    modified = exported.stat().st_mtime_ns
    Predictor.from_checkpoint(trained.ckpt, device="cpu", runtime="onnx")  # reuses the export
    assert exported.stat().st_mtime_ns == modified


def test_unknown_runtime_is_a_one_line_error(trained):
    with pytest.raises(
        PatchAEError,
        match="runtime=openvino is unknown .OpenVINO is not supported; use onnx.; use one of torch, onnx",
    ):
        Predictor.from_checkpoint(trained.ckpt, device="cpu", runtime="openvino")


def test_random_anomalib_bank_leaves_its_times_out_and_says_so():
    results = fake_results()
    anomalib = results["systems"]["anomalib"]
    anomalib.update(coreset_seconds=None, fit_seconds=None, coreset="random")
    table = format_table(results).splitlines()
    lines = {line.split(" | ")[0][2:]: line for line in table}
    assert lines["coreset s"].endswith("| 5.0 | – |  |")
    assert lines["model-time images/s, batch 32 (torch)"].endswith("| 20.0 | 8.0 | 2.50x |")
    assert any("random subset of the same size (anomalib_coreset=random)" in line for line in table)


def test_unknown_anomalib_coreset_is_one_line():
    with pytest.raises(PatchAEError, match=r"anomalib_coreset='greedy' is unknown; use exact or random"):
        run_benchmark(SpeedConfig(anomalib_coreset="greedy"))


def testrandom_coreset_stand_in_keeps_anomalibs_size():
    sampler = type("Sampler", (), {"embedding": torch.arange(100.0)[:, None], "coreset_size": 10})()
    picked = random_coreset(seed=0)(sampler)
    assert picked.shape == (10, 1) and picked.unique().numel() == 10
    assert torch.equal(picked, random_coreset(seed=0)(sampler))
