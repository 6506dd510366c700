"""make bench-gpu on a machine without a GPU: one line, exit 0 (the GPU path runs only where a GPU is lent)."""

from __future__ import annotations

import pytest
import torch


def test_bench_gpu_without_a_gpu_says_so_in_one_line_and_exits_0(capsys: pytest.CaptureFixture) -> None:
    from patchae.benchmarks import gpu

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: bench-gpu would measure")
    assert gpu.main(["root=nowhere"]) == {"gpu": None, "message": gpu.NO_GPU}
    assert capsys.readouterr().out == gpu.NO_GPU + "\n"


def test_model_time_rows_of_every_runtime_and_anomalib_beside_them(tmp_path, capsys) -> None:
    """The model-time step (run here on CPU; on a lent GPU with device=cuda): torch and ONNX Runtime rows of our
    PatchCore checkpoint at batch 1 and 32, and anomalib's PatchCore with the same bank size beside them, or
    its row saying how to install anomalib."""
    import importlib.util

    from checkpoint_fixture import train_tiny
    from patchae.benchmarks import gpu

    run = train_tiny(tmp_path, "model=patchcore")
    rows = gpu.model_time(str(run.ckpt), iterations=1, device="cpu")
    timed = [(row["runtime"], row["batch_size"]) for row in rows if "missing" not in row]
    assert ("torch (cpu)", 1) in timed and ("ONNX Runtime (cpu)", 32) in timed
    anomalib = [row for row in rows if row["runtime"].startswith("anomalib")]
    if importlib.util.find_spec("anomalib") is None:
        assert anomalib == [{"runtime": "anomalib PatchCore, torch (cpu)", "missing": gpu_hint()}]
    else:
        assert [row["batch_size"] for row in anomalib] == [1, 32]
        assert all(row["images_per_second"] > 0 for row in anomalib)
    assert "model time, torch (cpu), batch 32:" in capsys.readouterr().out


def gpu_hint() -> str:
    from patchae.benchmarks.speed import ANOMALIB_HINT

    return ANOMALIB_HINT


def test_onnx_on_a_gpu_without_the_cuda_provider_says_what_to_install(tmp_path) -> None:
    import onnxruntime

    from patchae.deploy.runtime import OnnxScorer
    from patchae.errors import PatchAEError

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider")
    with pytest.raises(PatchAEError, match="pip install onnxruntime-gpu"):
        OnnxScorer(tmp_path / "model.onnx", device="cuda")
