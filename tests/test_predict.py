"""predict.py and the Predictor: decisions, files written, agreement with test-time scoring, scale."""

import csv
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint_fixture import session_checkpoint_fixture
from conftest import REPO
from patchae.benchmarks.inference import benchmark_bank, extra_peak_mb, reset_peak_memory
from patchae.data import ImageTransform, SyntheticDataModule
from patchae.deploy.inputs import folder_label
from patchae.deploy.predict import Predictor, predict_to_folder
from patchae.errors import PatchAEError
from patchae.memory import MemoryBank, torch_nearest
from patchae.scoring.bank import search_chunks

trained = session_checkpoint_fixture()


@pytest.fixture(scope="module")
def prediction_run(trained, tmp_path_factory):
    output = tmp_path_factory.mktemp("predict")
    summary = predict_to_folder(
        trained.ckpt, trained.data_dir / "test", output, batch_size=5, show_progress=False
    )
    with (output / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return output, summary, rows


def test_predict_writes_a_decision_an_overlay_and_a_summary_per_image(prediction_run):
    output, summary, rows = prediction_run
    assert len(rows) == 12 and summary["predicted"] == 12 and summary["errors"] == []
    overlays = sorted(p.name for p in (output / "overlays").glob("*.png"))
    assert len(overlays) == 12 and "good__000.png" in overlays
    with Image.open(output / "overlays" / "good__000.png") as overlay:
        assert overlay.size == (2 * 64, 64)  # the image and its map side by side, original size
    threshold = summary["threshold"]["value"]
    for row in rows:
        score, normalized = float(row["score"]), float(row["normalized_score"])
        assert row["decision"] == ("anomalous" if score >= threshold else "normal")
        assert (normalized >= 0.5) == (score >= threshold)
        assert row["label"] == ("normal" if "/good/" in row["path"] else "anomalous")
    correct = [row["decision"] == row["label"] for row in rows]
    assert summary["accuracy"] == pytest.approx(sum(correct) / 12)
    assert summary["accuracy"] >= 0.8
    assert json.loads((output / "summary.json").read_text())["predicted"] == 12


def test_predicted_scores_equal_the_scores_seen_at_test_time(trained, prediction_run):
    _, _, rows = prediction_run
    predictor = Predictor.from_checkpoint(trained.ckpt, device="cpu")
    preprocessing = predictor.model.preprocessing
    datamodule = SyntheticDataModule(
        root=trained.data_dir.parent,
        category=trained.data_dir.name,
        n_train=10,
        n_test_good=6,
        n_test_defect=6,
        synthetic_size=64,
        image_size=preprocessing.image_size,
        crop_size=preprocessing.crop_size,
        mean=preprocessing.mean,
        std=preprocessing.std,
    )
    with torch.no_grad():
        expected = {
            p: float(s)
            for batch in datamodule.test_dataloader()
            for p, s in zip(batch["path"], predictor.model(batch["image"])[1], strict=True)
        }
    for row in rows:
        assert float(row["score"]) == pytest.approx(expected[row["path"]], abs=1e-5)


def test_in_memory_images_score_like_their_files(trained):
    predictor = Predictor.from_checkpoint(trained.ckpt, device="cpu", batch_size=2)
    paths = sorted((trained.data_dir / "test").rglob("*.png"))[:3]
    from_files = list(predictor.predict_paths(paths))
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    in_memory = predictor.predict(arrays)
    assert [p.score for p in in_memory] == pytest.approx([p.score for p in from_files], abs=1e-6)
    assert in_memory[0].anomaly_map.shape == arrays[0].shape[:2]


def test_threshold_override_and_normalisation(trained, tmp_path):
    predictor = Predictor.from_checkpoint(trained.ckpt, device="cpu")
    image = sorted((trained.data_dir / "test" / "good").glob("*.png"))[0]
    score = next(predictor.predict_paths([image])).score
    at_score = Predictor.from_checkpoint(trained.ckpt, device="cpu", threshold=score)
    result = next(at_score.predict_paths([image]))
    assert result.normalized_score == pytest.approx(0.5) and result.anomalous
    summary = predict_to_folder(
        trained.ckpt, trained.data_dir / "test", tmp_path, threshold=1e9, overlays=False, show_progress=False
    )
    assert summary["normal"] == 12 and summary["threshold"]["method"] == "manual"
    quantile = predict_to_folder(
        trained.ckpt,
        trained.data_dir / "test",
        tmp_path / "q",
        threshold_method="quantile",
        overlays=False,
        show_progress=False,
    )
    assert quantile["threshold"]["method"] == "quantile"


def test_map_comes_back_at_original_size_through_the_centre_crop(trained):
    predictor = Predictor.from_checkpoint(trained.ckpt, device="cpu")
    predictor.transform = ImageTransform(64, 48)  # as if the model had been tested with a centre crop
    anomaly_map = torch.zeros(48, 48)
    anomaly_map[20:28, 20:28] = 1.0  # a blob at the centre of the crop
    full = predictor.to_original_size(anomaly_map, (128, 256))
    assert full.shape == (128, 256)
    assert full[:8].max() == 0 and full[:, :16].max() == 0  # cropped-away border: the map's minimum
    rows, cols = torch.meshgrid(torch.arange(128.0), torch.arange(256.0), indexing="ij")
    centre = ((full * rows).sum() / full.sum(), (full * cols).sum() / full.sum())
    assert centre[0] == pytest.approx(63.5, abs=0.5) and centre[1] == pytest.approx(127.5, abs=0.5)
    assert (full > 0.5).sum() == pytest.approx(8 * 2 * 8 * 4, rel=0.2)  # the blob scaled 2x and 4x


def test_stream_from_stdin(trained, tmp_path, monkeypatch):
    images = sorted((trained.data_dir / "test").rglob("*.png"))[:3]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(str(p) for p in images) + "\n\n"))
    summary = predict_to_folder(
        trained.ckpt, "-", tmp_path, batch_size=2, overlays=False, show_progress=False
    )
    assert summary["predicted"] == 3


def test_empty_stdin_is_a_one_line_error(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(PatchAEError, match="no image paths came on stdin"):
        predict_to_folder(trained.ckpt, "-", tmp_path, show_progress=False)


def test_a_stream_result_does_not_wait_for_the_next_path(trained):
    """On a line, image N's decision must come before image N+1 arrives, whatever the batch size."""
    images = sorted((trained.data_dir / "test").rglob("*.png"))[:2]
    first_scored = threading.Event()

    def camera():
        yield images[0]
        assert first_scored.wait(timeout=30), "the first result was held back until the next path came"
        yield images[1]

    predictor = Predictor.from_checkpoint(trained.ckpt, device="cpu", batch_size=8)
    results = predictor.predict_paths(camera())
    first = next(results)
    first_scored.set()
    assert first.path == str(images[0]) and first.error is None
    assert [p.path for p in results] == [str(images[1])]


def test_bad_command_line_values_are_one_line_errors(trained, tmp_path):
    with pytest.raises(PatchAEError, match="threshold='abc' must be a finite number"):
        predict_to_folder(trained.ckpt, trained.data_dir / "test", tmp_path, threshold="abc")
    with pytest.raises(PatchAEError, match="search_memory_mb"):
        predict_to_folder(trained.ckpt, trained.data_dir / "test", tmp_path, search_memory_mb="lots")
    with pytest.raises(PatchAEError, match="dtype uint16"):
        Predictor.from_checkpoint(trained.ckpt, device="cpu").predict([np.zeros((8, 8, 3), np.uint16)])


def test_folder_labels_follow_the_mvtec_layout(tmp_path, monkeypatch):
    for folder in ("test/good", "test/crack", "plain"):
        (tmp_path / folder).mkdir(parents=True)
    assert folder_label(tmp_path / "test" / "good" / "a.png") == 0
    assert folder_label(tmp_path / "test" / "crack" / "a.png") == 1
    assert folder_label(tmp_path / "plain" / "a.png") is None
    monkeypatch.chdir(tmp_path / "test" / "crack")
    assert folder_label(Path("a.png")) == 1  # a relative path is labelled like its absolute one


def test_command_line_with_a_glob(trained, tmp_path):
    pattern = f"{trained.data_dir}/test/*/00[01].png"  # Hydra needs the quotes for [ ]
    done = subprocess.run(
        [
            sys.executable,
            "predict.py",
            f"ckpt={trained.ckpt}",
            f"input='{pattern}'",
            f"output={tmp_path / 'out'}",
            "progress=false",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "predicted 8 of 8 image(s)" in done.stdout  # good, patch, scratch, spot x 000, 001
    assert len(list((tmp_path / "out" / "overlays").glob("*.png"))) == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_and_cpu_agree(trained):
    image = sorted((trained.data_dir / "test").rglob("*.png"))[:4]
    cpu = [p.score for p in Predictor.from_checkpoint(trained.ckpt, device="cpu").predict_paths(image)]
    gpu = [p.score for p in Predictor.from_checkpoint(trained.ckpt, device="cuda").predict_paths(image)]
    assert gpu == pytest.approx(cpu, abs=1e-3)


# -- scale ---------------------------------------------------------------------------------------------------
def test_search_chunks_respect_the_budget():
    for budget, bank in ((256, 1_000_000), (16, 5_000_000), (1, 300), (64, 100)):
        query_chunk, bank_chunk = search_chunks(budget, bank)
        assert query_chunk >= 64 and 1 <= bank_chunk <= max(bank, 1)
        assert 8 * query_chunk * bank_chunk <= max(budget * 2**20, 8 << 16)


def test_chunked_exact_search_stays_within_its_memory_budget():
    if not reset_peak_memory():
        pytest.skip("peak memory cannot be reset on this system")
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300_000, 16, generator=generator), torch.randn(1024, 16, generator=generator)
    chunk, bank_chunk = search_chunks(32, len(bank))
    (distances, indices), extra = extra_peak_mb(
        lambda: torch_nearest(queries, bank, k=1, chunk_size=chunk, bank_chunk_size=bank_chunk)
    )
    # A full 1024 x 300k distance matrix would take 1170 MB; blocks take 32 MB (+ allocator slack, bank norms).
    assert extra < 200, f"chunked search used {extra:.0f} MB above its start"
    reference, _ = MemoryBank(bank, device="cpu").search(queries[:256], k=1)
    assert torch.allclose(distances[:256], reference, atol=1e-4)


def test_ivf_indexes_have_measured_recall():
    result = benchmark_bank(20_000, 16, 300, 64, None, nlist=32, nprobes=[2, 32], pq_m=8)
    faiss = result["faiss"]
    assert faiss["flat"]["recall_at_1"] == 1.0
    assert faiss["ivf_nprobe32"]["recall_at_1"] == 1.0  # every list probed: exact
    assert faiss["ivf_nprobe2"]["recall_at_1"] > 0.5
    assert 0.3 < faiss["ivfpq_nprobe32"]["recall_at_1"] <= 1.0
    assert faiss["ivf_nprobe2"]["max_score_error"] >= 0.0  # distances of what it finds are exact


def test_checkpoints_naming_the_old_module_path_still_load(trained, tmp_path):
    # Before the models moved into packages of their own, checkpoints recorded patchae.models.module.<class>.
    from patchae.deploy.loading import checkpoint_class, read_checkpoint
    from patchae.models import PatchAEModule
    from patchae.models.base import CHECKPOINT_KEY

    checkpoint = read_checkpoint(trained.ckpt)
    checkpoint[CHECKPOINT_KEY]["model_class"] = "patchae.models.module.PatchAEModule"
    assert checkpoint_class(checkpoint, tmp_path / "old.ckpt") is PatchAEModule
    checkpoint[CHECKPOINT_KEY]["model_class"] = "patchae.models.module.NoSuchModule"
    with pytest.raises(PatchAEError, match="NoSuchModule, which this patchae does not have"):
        checkpoint_class(checkpoint, tmp_path / "old.ckpt")
