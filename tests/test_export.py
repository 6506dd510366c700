"""TorchScript and ONNX exports score like the checkpoint (1e-4), with a dynamic batch axis."""

import json

import onnx
import pytest
import torch

from checkpoint_fixture import session_checkpoint_fixture
from patchae.deploy.export import (
    export_model,
    main,
    reference_outputs,
    run_onnx,
    run_torchscript,
)
from patchae.deploy.loading import load_model
from patchae.deploy.predict import Predictor
from patchae.errors import PatchAEError
from patchae.memory import torch_nearest

trained = session_checkpoint_fixture()


@pytest.fixture(scope="module")
def test_images(trained):
    """The synthetic test split, preprocessed as the model expects: 6 good and 6 defective images."""
    predictor = Predictor.from_checkpoint(trained.ckpt, device="cpu")
    paths = sorted((trained.data_dir / "test").rglob("*.png"))
    return predictor, torch.stack([predictor.load(p).tensor for p in paths])


@pytest.fixture(scope="module")
def exported(trained, test_images, tmp_path_factory):
    _, images = test_images
    output = tmp_path_factory.mktemp("export")
    result = export_model(trained.ckpt, output, format="both", example=images[:2], bank_block=16)
    return output, result


@pytest.mark.parametrize("run_exported", [run_torchscript, run_onnx], ids=["torchscript", "onnx"])
@pytest.mark.parametrize("batch", [1, 5, 12])
def test_export_agrees_with_the_checkpoint(exported, test_images, run_exported, batch):
    output, result = exported
    predictor, images = test_images
    path = output / ("model.torchscript.pt" if run_exported is run_torchscript else "model.onnx")
    reference = reference_outputs(predictor.model, predictor.thresholds, images[:batch])
    outputs = run_exported(path, images[:batch])
    assert [tuple(o.shape) for o in outputs] == [(batch, 64, 64), (batch,), (batch,)]
    for name, expected, actual in zip(("maps", "scores", "normalized"), reference, outputs, strict=True):
        assert torch.allclose(actual, expected, atol=1e-4, rtol=0), (
            f"{name}: {(actual - expected).abs().max():.2e}"
        )
    if batch == 12:  # the decisions are the checkpoint's too, and they mean something (both kinds occur)
        decisions = outputs[2] >= 0.5
        assert torch.equal(decisions, predictor.thresholds.is_anomalous(reference[1]))
        assert 0 < int(decisions.sum()) < 12


def test_export_records_preprocessing_and_threshold(exported, trained, test_images):
    output, result = exported
    predictor, _ = test_images
    saved = json.loads((output / "export.json").read_text())
    assert saved["input"]["preprocessing"]["image_size"] == 64 and saved["input"]["shape"][1:] == [3, 64, 64]
    assert saved["threshold"]["value"] == pytest.approx(predictor.thresholds.value)
    assert max(result["onnx_max_difference"].values()) < 1e-4
    props = {p.key: p.value for p in onnx.load(str(output / "model.onnx")).metadata_props}
    assert json.loads(props["patchae"])["bank_size"] == saved["bank_size"]
    extra = {"patchae.json": ""}
    torch.jit.load(str(output / "model.torchscript.pt"), _extra_files=extra)
    assert json.loads(extra["patchae.json"])["outputs"] == [
        "anomaly_maps",
        "image_scores",
        "normalized_scores",
    ]


@pytest.mark.parametrize("k", [1, 3])
def test_the_exported_blockwise_search_equals_brute_force(k):
    """The graph's search (all queries at once, 128-row bank blocks, as while tracing) against cdist."""
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(1000, 8, generator=generator), torch.randn(100, 8, generator=generator)
    distances, indices = torch_nearest(queries, bank, k=k, chunk_size=None, bank_chunk_size=128)
    expected = torch.cdist(queries.double(), bank.double()).topk(k, dim=1, largest=False)
    assert torch.equal(indices, expected.indices)
    assert torch.allclose(distances.double(), expected.values, atol=1e-5)


def test_export_command_line_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([f"ckpt={tmp_path / 'missing.ckpt'}"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint") and "missing.ckpt" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["ckpt=x", "bogus=1"])
    assert "bad argument" in capsys.readouterr().err
    with pytest.raises(PatchAEError, match="format"):
        export_model(tmp_path / "x.ckpt", format="tflite")
    with pytest.raises(PatchAEError, match="bank_block=0 must be a positive integer"):
        export_model(tmp_path / "x.ckpt", bank_block=0)


def test_export_of_a_model_with_an_approximate_index_checks_against_exact_search(trained, tmp_path):
    """The graph searches exactly; the check must not compare it with an IVF index's neighbours."""
    model = load_model(trained.ckpt, faiss_index="ivfpq")
    ckpt = tmp_path / "ivfpq.ckpt"
    torch.save(
        {**torch.load(trained.ckpt, weights_only=False), "hyper_parameters": dict(model.hparams)}, ckpt
    )
    result = export_model(ckpt, tmp_path / "export", format="onnx")
    assert max(result["onnx_max_difference"].values()) <= 1e-4


@pytest.mark.parametrize("batch", [0, 3, 9])
def test_onnx_scorer_in_micro_batches_equals_the_checkpoint(exported, test_images, batch):
    """OnnxScorer runs a CPU batch a few images at a time (CPU_MICRO_BATCH); a batch that is not a multiple of
    it, or empty, gives the checkpoint's maps and scores all the same."""
    from patchae.deploy.runtime import OnnxScorer

    output, _ = exported
    predictor, images = test_images
    maps, scores = OnnxScorer(output / "model.onnx")(images[:batch])
    assert tuple(maps.shape) == (batch, 64, 64) and tuple(scores.shape) == (batch,)
    if batch:
        expected_maps, expected_scores, _ = reference_outputs(
            predictor.model, predictor.thresholds, images[:batch]
        )
        assert torch.allclose(maps, expected_maps, atol=1e-4, rtol=0)
        assert torch.allclose(scores, expected_scores, atol=1e-4, rtol=0)
