"""Continuing interrupted runs and skipping finished ones (``resume=true``, ``ckpt_path=``).

A run is *complete* when its ``results.json`` carries ``"run_complete": true``: train.py adds it as the last
step of a run, after ``model.ckpt`` is saved, so a run cut off anywhere before (fit, bank, test, saving) is not
complete. train.py with ``resume=true`` and ``python -m patchae.benchmarks.accuracy run --skip-finished`` both use
:func:`complete_results` to decide.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchae.errors import PatchAEError

if TYPE_CHECKING:  # lightning is imported only where a trainer exists: the benchmark reads results without it
    import lightning as L

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
COMPLETE_KEY = "run_complete"


def complete_results(run_dir: str | Path) -> dict[str, Any] | None:
    """The results of a complete run in ``run_dir``; None when it has none, or an unfinished or damaged one."""
    try:
        results = json.loads((Path(run_dir) / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(results, dict) or results.get(COMPLETE_KEY) is not True:
        return None
    return results


def mark_complete(run_dir: str | Path) -> None:
    """Flags the run's results.json complete (replaced atomically, so a reader never sees half a file)."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():  # the results writer was switched off: nothing to flag
        return
    results = {**json.loads(path.read_text()), COMPLETE_KEY: True}
    partial = path.with_name(f".{RESULTS_FILE}.partial")
    partial.write_text(json.dumps(results, indent=2, default=str))
    os.replace(partial, path)


def last_checkpoint_path(trainer: L.Trainer) -> Path | None:
    """Where the fit's last checkpoint goes (``callbacks.last_checkpoint``); None when that is switched off."""
    from patchae.callbacks import LastCheckpoint

    return next((cb.path for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)), None)


def checkpoint_to_resume(trainer: L.Trainer, resume: bool, ckpt_path: str | None) -> Path | None:
    """What the fit continues from: ``ckpt_path`` if given, else with ``resume`` this run's last checkpoint
    if it was written, else nothing (a fresh fit)."""
    if ckpt_path:
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise PatchAEError(
                f"ckpt_path={ckpt_path} not found; give a checkpoint written during a fit, "
                "e.g. <run dir>/checkpoints/last.ckpt"
            )
        return path
    if not resume:
        return None
    last = last_checkpoint_path(trainer)
    if last is None:
        raise PatchAEError(
            "resume=true needs the fit's last checkpoint, but callbacks.last_checkpoint is switched off; "
            "drop ~callbacks.last_checkpoint"
        )
    if not last.is_file():
        log.info("resume=true: no %s yet, so the fit starts from the beginning", last)
        return None
    log.info("resume=true: continuing the fit from %s", last)
    return last


def remove_last_checkpoint(trainer: L.Trainer) -> None:
    """Deletes the fit's last checkpoint once the run is complete: model.ckpt has what it had, and more."""
    last = last_checkpoint_path(trainer)
    if last is not None and last.is_file():
        last.unlink()
        if not any(last.parent.iterdir()):
            last.parent.rmdir()
