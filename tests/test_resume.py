"""resume=true / ckpt_path=: an interrupted fit continues from its last checkpoint, complete runs are skipped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import REPO, TINY_RUN, run_tiny_sweep
from patchae.benchmarks import accuracy as benchmark
from patchae.errors import PatchAEError
from patchae.resume import COMPLETE_KEY, complete_results
from patchae.train import fit_and_test


class Interrupted(Exception):
    pass


class InterruptAfterEpochs(L.Callback):
    """Stops the fit with an exception as the epoch after ``epochs`` starts, as a crash or a killed job would."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.epochs:
            raise Interrupted(f"interrupted after {self.epochs} epochs")


class EpochRecorder(L.Callback):
    """Records the index of every training epoch that starts."""

    started: ClassVar[list[int]] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        EpochRecorder.started.append(trainer.current_epoch)


def tiny_config(root: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                *TINY_RUN,
                f"paths.output_dir={root / 'run'}",
                f"data.root={root / 'data'}",
                "callbacks.results.overlays_per_type=0",
                "+callbacks.recorder._target_=test_resume.EpochRecorder",
                *overrides,
            ],
        )


def test_interrupted_fit_resumes_to_the_same_epochs_and_keeps_the_best_weights(tmp_path):
    # min_delta=1: no trained epoch can beat the untrained encoder (epoch 0), so the kept weights must be the
    # ones validated before the interruption, not those of any later epoch.
    settings = ["trainer.max_epochs=3", "validation.select_best=true", "validation.min_delta=1.0"]
    EpochRecorder.started.clear()
    interrupted = tiny_config(
        tmp_path,
        *settings,
        "+callbacks.interrupt._target_=test_resume.InterruptAfterEpochs",
        "+callbacks.interrupt.epochs=2",
    )
    with pytest.raises(Interrupted):
        fit_and_test(interrupted)
    assert EpochRecorder.started == [0, 1, 2]  # killed as the third epoch starts
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["epoch"] == 1
    best = saved["callbacks"]["BestEpochCallback"]
    assert best["best_epoch"] == 0 and best["last_epoch"] == 2
    trained_weights = saved["state_dict"]
    assert any(not torch.equal(best["best_state"][k], trained_weights[k]) for k in trained_weights)
    seconds_before = saved["callbacks"]["ResultsWriter"]["fit_seconds"]
    assert seconds_before > 0
    assert complete_results(run_dir) is None

    EpochRecorder.started.clear()
    results = fit_and_test(tiny_config(tmp_path, *settings, "resume=true"))
    assert EpochRecorder.started == [2]  # only the epoch the interruption took: 3 in all
    assert results["selected_epoch"] == 0
    model = torch.load(run_dir / "model.ckpt", weights_only=True)
    kept = {k: v for k, v in model["state_dict"].items() if k != "model.scorer.bank"}
    assert kept.keys() == best["best_state"].keys() - {"model.scorer.bank"}
    assert all(torch.equal(kept[k], best["best_state"][k]) for k in kept)
    assert model["callbacks"]["BestEpochCallback"]["best_state"] is None  # one set of weights in model.ckpt
    assert results["train_seconds"] > seconds_before  # the interrupted fit's time counts
    assert not last.exists()  # deleted once the run is complete
    assert complete_results(run_dir)[COMPLETE_KEY] is True

    # A complete run is not run again.
    stamp = (run_dir / "model.ckpt").stat().st_mtime_ns
    EpochRecorder.started.clear()
    again = fit_and_test(tiny_config(tmp_path, *settings, "resume=true"))
    assert EpochRecorder.started == []
    assert again["image_auroc"] == results["image_auroc"]
    assert (run_dir / "model.ckpt").stat().st_mtime_ns == stamp


class InterruptTest(L.Callback):
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise Interrupted("interrupted while testing")


def test_fit_that_stopped_early_stays_stopped_when_resumed(tmp_path):
    # patience=1 with min_delta=1 stops the fit after its first epoch; the run dies later, while testing.
    settings = [
        "trainer.max_epochs=3",
        "validation.select_best=true",
        "validation.min_delta=1.0",
        "validation.patience=1",
    ]
    EpochRecorder.started.clear()
    with pytest.raises(Interrupted):
        fit_and_test(
            tiny_config(tmp_path, *settings, "+callbacks.interrupt._target_=test_resume.InterruptTest")
        )
    assert EpochRecorder.started == [0]
    EpochRecorder.started.clear()
    results = fit_and_test(tiny_config(tmp_path, *settings, "resume=true"))
    assert EpochRecorder.started == []  # not trained on to max_epochs
    assert results["selected_epoch"] == 0 and complete_results(tmp_path / "run") is not None


def test_ckpt_path_that_does_not_exist_is_one_line(tmp_path):
    with pytest.raises(
        PatchAEError, match=r"ckpt_path=.*nope.ckpt not found; give a checkpoint written during a fit"
    ):
        fit_and_test(tiny_config(tmp_path, f"ckpt_path={tmp_path / 'nope.ckpt'}"))


def complete_job(run_dir: Path, image_auroc: float) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({"image_auroc": image_auroc, COMPLETE_KEY: True}))


def test_multirun_rerun_skips_complete_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    complete_job(sweep / "0_synthetic", 0.123)  # job 0 finished earlier; job 1 never ran
    before = (sweep / "0_synthetic" / "results.json").read_text()
    result = run_tiny_sweep(tmp_path, sweep, "-m", "seed=0,1", "resume=true")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (sweep / "0_synthetic" / "results.json").read_text() == before
    assert "holds a complete run, skipped" in result.stdout + result.stderr
    assert complete_results(sweep / "1_synthetic")["seed"] == 1
    assert (sweep / "1_synthetic" / "model.ckpt").is_file()


def test_complete_means_flagged_by_the_end_of_the_run(tmp_path):
    complete_job(tmp_path / "done", 0.9)
    (tmp_path / "unflagged").mkdir()
    (tmp_path / "unflagged" / "results.json").write_text(json.dumps({"image_auroc": 0.9}))
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "results.json").write_text('{"image_auroc": 0.9, "run_comp')
    assert complete_results(tmp_path / "done") == {"image_auroc": 0.9, COMPLETE_KEY: True}
    for name in ("unflagged", "torn", "missing"):
        assert complete_results(tmp_path / name) is None


def test_benchmark_skip_finished_runs_only_the_rest_with_resume(tmp_path, capsys):
    out = tmp_path / "bench"
    complete_job(out / "patch_ae" / "bottle", 0.99)
    (out / "patchcore" / "bottle").mkdir(parents=True)  # interrupted: no complete results.json
    argv = [
        *("run", "--models", "patch_ae,patchcore", "--categories", "bottle"),
        *("--out", str(out), "--dry-run", "backbone=efficientnet_lite0"),
    ]
    assert benchmark.main([*argv, "--skip-finished"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if "train.py" in line]
    assert len(commands) == 1
    assert "model=patchcore" in commands[0] and commands[0].endswith("resume=true")
    assert benchmark.main(argv) == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if "train.py" in line]) == 2


def test_benchmark_rows_do_not_split_on_resume(tmp_path):
    runs = [
        benchmark.Run(tmp_path / "a", {"category": "bottle", "model": "PatchAEModule"}, {"seed": "0"}),
        benchmark.Run(
            tmp_path / "b", {"category": "bottle", "model": "PatchAEModule"}, {"seed": "1", "resume": "true"}
        ),
    ]
    assert benchmark.method_names(runs) == ["Patch AE", "Patch AE"]
