import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_MVTEC = REPO.parent / "shared" / "data" / "mvtec_ad"

# A run small enough for a test: a few 64 px synthetic images, the offline backbone, one epoch.
TINY_RUN = [
    "experiment=demo",
    "data.n_train=10",
    "data.n_test_good=6",
    "data.n_test_defect=6",
    "data.synthetic_size=64",
    "data.image_size=64",
    "data.crop_size=null",
    "trainer.max_epochs=1",
    "logger=none",
    "~callbacks.progress",
]


# The same small synthetic setting spelled out group by group, to combine with any experiment (sweeps).
TINY_SYNTHETIC = [
    "data=synthetic",
    "category=synthetic",
    "backbone=efficientnet_lite0",
    "data.image_size=64",
    "data.crop_size=null",
    "data.synthetic_size=64",
]


def run_tiny_sweep(tmp_path: Path, sweep: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python train.py`` on 4 + 5 synthetic 64 px images, one epoch, writing the multirun into ``sweep``."""
    command = [
        sys.executable,
        str(REPO / "train.py"),
        *overrides,
        *TINY_SYNTHETIC,
        f"data.root={tmp_path / 'data'}",
        "data.n_train=4",
        "data.n_test_good=2",
        "data.n_test_defect=3",
        "trainer.max_epochs=1",
        "logger=none",
        "callbacks.results.overlays_per_type=0",
        f"hydra.sweep.dir={sweep}",
    ]
    # One thread is plenty for 64 px images, and keeps a shared CPU from spinning idle OpenMP workers.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture
def make_config(tmp_path):
    """Compose conf/train.yaml as train.py would, writing into tmp_path."""

    def make(*overrides: str):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            return compose(
                "train",
                overrides=[
                    f"paths.output_dir={tmp_path / 'run'}",
                    f"data.root={tmp_path / 'data'}",
                    *overrides,
                ],
            )

    return make
