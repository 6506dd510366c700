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
