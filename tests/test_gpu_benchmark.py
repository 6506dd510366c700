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
