"""What the SSL-AE and DAAD tests share: their tiny end-to-end setting and the rescoring of a test split."""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import instantiate

# On top of checkpoint_fixture's tiny run (10 synthetic 64 px images, 2 held out): 8 epochs of batches of 2, so
# that a from-scratch network takes 32 steps; the last weights (no validation), the default statistics.
TINY_RECONSTRUCTION = ["trainer.max_epochs=8", "data.batch_size=2", "validation.enabled=false"]


@torch.no_grad()
def rescore_test_split(model: Any, cfg: Any) -> dict[str, float]:
    """Image score of every test image of the run's data, by ``model``: path -> score."""
    datamodule = instantiate(cfg.data, augment=None, _convert_="all")
    datamodule.setup("test")
    scores = {}
    for batch in datamodule.test_dataloader():
        _, batch_scores = model(batch["image"])
        scores.update(zip(batch["path"], batch_scores.tolist(), strict=True))
    return scores
