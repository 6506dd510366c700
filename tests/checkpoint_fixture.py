"""A tiny trained checkpoint shared by the predict/export/threshold tests (trained once per session).

Test modules declare ``checkpoint = session_checkpoint_fixture()``; whichever runs first trains, the others
reuse the same run (a module-level cache: pytest would otherwise build one per module).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import REPO, TINY_RUN
from patchae.train import fit_and_test

# TINY_RUN (10 train images, 64 px, 1 epoch) with two training images held out for the quantile threshold.
CHECKPOINT_RUN = [*TINY_RUN, "threshold.holdout_ratio=0.2", "callbacks.results.overlays_per_type=0"]


@dataclass(frozen=True)
class TrainedRun:
    ckpt: Path
    data_dir: Path  # the generated synthetic category (MVTec layout)
    results: dict[str, Any]
    cfg: Any


_RUNS: dict[str, TrainedRun] = {}


def train_tiny(root: Path, *overrides: str) -> TrainedRun:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                *CHECKPOINT_RUN,
                f"paths.output_dir={root / 'run'}",
                f"data.root={root / 'data'}",
                *overrides,
            ],
        )
    results = fit_and_test(cfg)
    return TrainedRun(Path(cfg.paths.output_dir) / "model.ckpt", root / "data" / cfg.category, results, cfg)


def session_checkpoint_fixture() -> Any:
    @pytest.fixture(scope="session")
    def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
        if "tiny" not in _RUNS:
            _RUNS["tiny"] = train_tiny(tmp_path_factory.mktemp("tiny_checkpoint"))
        return _RUNS["tiny"]

    return trained


def save_checkpoint(model: Any, path: Path) -> dict[str, Any]:
    """model.ckpt as train.py writes it (weights, hyper-parameters, the patchae key), without a trainer."""
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return checkpoint
