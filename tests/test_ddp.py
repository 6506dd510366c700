"""Several processes (trainer=ddp): metrics, thresholds and results cover the whole split, as on one device."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

import patchae.callbacks
import patchae.metrics
from conftest import REPO, TINY_RUN
from patchae.callbacks import ResultsWriter
from patchae.data.synthetic import generate_synthetic_category
from patchae.distributed import first_of_each
from patchae.errors import PatchAEError
from patchae.metrics import AnomalyMetrics


def test_first_of_each_keeps_each_index_once_in_index_order():
    positions = first_of_each(torch.tensor([4, 0, 2, 0, 1, 4]))
    assert positions.tolist() == [1, 4, 2, 0]


def shards(count: int, world: int = 2) -> list[list[int]]:
    """The dataset indices each process scores under DDP: Lightning's DistributedSampler, padded to even shares."""
    return [list(DistributedSampler(range(count), world, rank, shuffle=False)) for rank in range(world)]


def pretend_processes(monkeypatch, module, shares: list) -> None:
    """Make ``module`` see ``len(shares)`` processes whose states are ``shares`` (no process group needed)."""
    if hasattr(module, "world_size"):
        monkeypatch.setattr(module, "world_size", lambda: len(shares))
    monkeypatch.setattr(module, "all_gather_objects", lambda state: shares)


def test_gathered_metrics_equal_one_process_despite_repeated_samples(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    count = 7  # odd: the sampler repeats index 0 on the second process
    scores, labels = torch.rand(count, generator=generator), torch.tensor([0, 1, 0, 1, 1, 0, 1])
    maps, masks = (
        torch.rand(count, 8, 8, generator=generator),
        torch.rand(count, 8, 8, generator=generator) > 0.7,
    )
    has_mask = torch.tensor([True, True, False, True, True, True, True])  # a mask-less image is left out
    one_process = AnomalyMetrics()
    one_process.update(scores, labels, maps, masks, has_mask)

    processes = []
    for indices in shards(count):
        metrics = AnomalyMetrics()
        for batch in torch.tensor(indices).split(2):
            metrics.update(scores[batch], labels[batch], maps[batch], masks[batch], has_mask[batch], batch)
        processes.append(metrics)
    assert sum(len(metrics.scores_and_labels()[0]) for metrics in processes) == count + 1
    states = [(m._scores, m._labels, m._indices, m._maps, m._masks, m._map_indices) for m in processes]
    pretend_processes(monkeypatch, patchae.metrics, states)
    processes[1].gather()

    gathered_scores, gathered_labels = processes[1].scores_and_labels()
    assert torch.equal(gathered_scores, scores.double()) and torch.equal(gathered_labels, labels)
    expected, result = one_process.compute(), processes[1].compute()
    assert result == expected
    assert 0 < result["pixel_auroc"] < 1 and 0 < result["aupro"] < 1


def test_gather_without_dataset_indices_says_what_to_do(monkeypatch):
    metrics = AnomalyMetrics()
    metrics.update(torch.rand(2), torch.tensor([0, 1]))
    pretend_processes(monkeypatch, patchae.metrics, [None, None])
    with pytest.raises(PatchAEError) as error:
        metrics.gather()
    assert str(error.value) == (
        "evaluating on 2 processes needs the dataset index of every image (an 'index' in each batch) "
        "to drop the sampler's repeated images; evaluate on one device"
    )


def test_results_writer_gathers_rows_and_overlays_in_dataset_order(monkeypatch, tmp_path):
    types = ["good", "good", "good", "crack", "crack", "crack", "good"]
    writers = []
    for indices in shards(len(types)):
        writer = ResultsWriter(str(tmp_path), overlays_per_type=2)
        writer.on_test_start(None, None)
        batch = {
            "path": [f"{i}.png" for i in indices],
            "defect_type": [types[i] for i in indices],
            "label": torch.tensor([int(types[i] != "good") for i in indices]),
            "image": torch.zeros(len(indices), 3, 4, 4),
            "mask": torch.zeros(len(indices), 1, 4, 4),
            "index": torch.tensor(indices),
        }
        outputs = {
            "anomaly_maps": torch.tensor(indices).float().view(-1, 1, 1).expand(-1, 4, 4),
            "image_scores": torch.tensor(indices).float(),
        }
        writer.on_test_batch_end(None, None, outputs, batch, 0)
        writers.append(writer)
    shares = [(w.row_indices, w.rows, w.selected, w.map_range) for w in writers]
    pretend_processes(monkeypatch, patchae.callbacks, shares)
    writers[0].gather_shares()
    assert [row["path"] for row in writers[0].rows] == [f"{i}.png" for i in range(len(types))]
    assert [row["score"] for row in writers[0].rows] == list(range(len(types)))
    assert [item["index"] for item in writers[0].selected] == [0, 1, 3, 4]  # the first two of each type
    assert writers[0].map_range == [0.0, 6.0]


def run_on_one_and_two_processes(tmp_path: Path, *overrides: str) -> tuple[dict, dict]:
    """``results.json`` of the same tiny run on one process and on two (DDP, gloo), started together.
    27 training, 3 held-out (9 validation items) and 11 test images: both splits leave the sampler a repeat."""
    generate_synthetic_category(  # once here, so that the two runs do not race to write it
        tmp_path / "data", "synthetic", n_train=30, n_test_good=6, n_test_defect=5, image_size=64
    )
    common = [
        *TINY_RUN,
        f"data.root={tmp_path / 'data'}",
        "data.n_train=30",
        "data.n_test_good=6",
        "data.n_test_defect=5",
        "data.eval_batch_size=1",  # the same batches on one and two processes: the same float rounding
        *overrides,
    ]
    setups = {
        "one": ["trainer=cpu"],
        "two": ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, trainer in setups.items():
        command = [
            sys.executable,
            str(REPO / "train.py"),
            *common,
            *trainer,
            f"hydra.run.dir={tmp_path / name}",
        ]
        with (tmp_path / f"{name}.out").open(
            "w"
        ) as out:  # a file: an unread pipe could fill and block a rank
            runs[name] = subprocess.Popen(
                command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
    try:
        for run in runs.values():
            run.wait(timeout=300)
    finally:  # the DDP child process is in the same session: end both ranks of a run that hangs
        for run in runs.values():
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    for name, run in runs.items():
        assert run.returncode == 0, (tmp_path / f"{name}.out").read_text()[-3000:]
    assert (tmp_path / "two" / "predictions.csv").read_text() == (
        tmp_path / "one" / "predictions.csv"
    ).read_text()
    return tuple(json.loads((tmp_path / name / "results.json").read_text()) for name in setups)


TEST_METRICS = ["image_auroc", "image_f1_max", "pixel_auroc", "aupro", "image_threshold", "image_accuracy"]


@pytest.mark.slow
def test_two_cpu_processes_give_the_results_of_one(tmp_path):
    """Learning rates of 0 keep the weights equal, since DDP trains on twice the batch: validation (with the
    epoch it keeps), the bank, testing and the F1 threshold are then all compared."""
    one, two = run_on_one_and_two_processes(
        tmp_path, "data.batch_size=2", "optimizer.lr=0", "optimizer.backbone_lr=0"
    )
    assert two["test_images"] == one["test_images"] == 11
    for key in [
        *TEST_METRICS,
        "selected_epoch",
        "val_image_auroc",
        "val_pixel_auroc",
        "val_aupro",
        "bank_size",
    ]:
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key
    assert 0.5 < one["pixel_auroc"] < 1 and 0 < one["val_aupro"] < 1  # numbers that can differ, not saturated


@pytest.mark.slow
def test_patchcore_on_two_cpu_processes_gives_the_results_of_one(tmp_path):
    """A model with nothing to train runs under DDP (torch refuses to wrap it), with the label-free threshold."""
    one, two = run_on_one_and_two_processes(tmp_path, "model=patchcore", "threshold.method=quantile")
    assert two["test_images"] == one["test_images"] == 11
    for key in [*TEST_METRICS, "bank_size"]:
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key
    assert one["image_threshold"] != one["image_f1_threshold"]  # the quantile one
