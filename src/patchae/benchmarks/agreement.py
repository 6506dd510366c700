"""Did label-free validation foretell the test? Each candidate run against the baseline run of its seed.

    python -m patchae.benchmarks.agreement 'baseline=[multirun/daad_base_*]' \\
        'candidates=[multirun/daad_adv01_*,multirun/daad_blocks2x_*]' output=agreement.json

Settings are chosen by label-free validation (held-out normal images with synthetic defects), so it matters
whether a rise there is a rise on real defects. Every ``results.json`` under the folders named (globs allowed) is
keyed by model, category and seed; each candidate run is paired with the baseline run of the same key, and each
pair gives the change of every validation figure and of the test's image AUROC. Per model and category the
command counts how often the test moved the way each validation figure did, the Spearman correlation of the
changes, and how often the test rose when validation's image AUROC rose, and when it fell. Pairs validated
otherwise (``validation.placement``, ``kinds``, ``defects_per_image``) are not compared.

``rescored=[rescore.json,...]``: outputs of ``python -m patchae.benchmarks.rescore`` (one row per run) whose
figures and validation settings replace those of the runs they name, so one validation can be judged against
another on the same weights without retraining. Reading test figures is the point here: use it to judge a
validation, not to choose a setting. Quote a glob that starts with ``*`` inside a list
(``'candidates=["*_s0"]'``): unquoted, it reads as a YAML alias.
"""

from __future__ import annotations

import glob
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from scipy.stats import spearmanr

from patchae.benchmarks.cli import run_command
from patchae.errors import PatchAEError

VALIDATION = ("val_image_auroc", "val_pixel_auroc", "val_aupro")
TEST = "image_auroc"
# What a validation figure measures, with the value of runs from before the setting existed; pairs that differ
# here are not compared.
VALIDATION_SETTINGS = {"placement": "uniform", "kinds": ["cutpaste", "perlin"], "defects_per_image": 2}


@dataclass
class AgreementConfig:
    """``python -m patchae.benchmarks.agreement key=value ...``"""

    baseline: list[str] = field(default_factory=list)  # folders (globs) holding the baseline's results.json
    candidates: list[str] = field(default_factory=list)  # folders (globs) holding the other settings' runs
    rescored: list[str] = field(default_factory=list)  # rescore outputs: their rows replace the runs' figures
    output: str | None = None  # a .json file for the results


@dataclass
class Run:
    folder: str
    results: dict[str, Any]  # results.json's figures (val_*, image_auroc), or a rescore row's
    validation: dict[str, Any] | None  # VALIDATION_SETTINGS' keys; None when the run's config is unknown

    @property
    def key(self) -> tuple[str, str, int]:
        return str(self.results["model"]), str(self.results["category"]), int(self.results["seed"])


def rescored_rows(files: list[str]) -> dict[Path, dict[str, Any]]:
    """The rows of rescore outputs by their run's resolved folder; a one-line error for two rows of one run."""
    rows: dict[Path, dict[str, Any]] = {}
    for file in files:
        try:
            found = json.loads(Path(file).read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError):
            raise PatchAEError(
                f"rescored={file} is no rescore output; give the output=... file of python -m patchae.benchmarks.rescore"
            ) from None
        for row in found:
            folder = Path(row["run"]).resolve()
            if folder in rows:
                raise PatchAEError(
                    f"two rescored rows for {row['run']} (several settings or files): give one row per run"
                )
            rows[folder] = row
    return rows


def find_runs(patterns: list[str], role: str, rescored: dict[Path, dict[str, Any]]) -> list[Run]:
    """Every run with a results.json under the folders the patterns match, rescored where a row names it."""
    runs = []
    for pattern in patterns:
        for folder in sorted(glob.glob(pattern)) or [pattern]:
            path = Path(folder)
            files = [path] if path.name == "results.json" else sorted(path.rglob("results.json"))
            for file in files:
                run = Run(str(file.parent), json.loads(file.read_text()), validation_settings(file.parent))
                row = rescored.get(file.parent.resolve())
                if row is not None:
                    run.results = {
                        **run.results,
                        **{k: row[k] for k in VALIDATION},
                        TEST: row[f"test_{TEST}"],
                    }
                    run.validation = {**(run.validation or VALIDATION_SETTINGS)}
                    run.validation.update(placement=row["val_placement"])
                    run.validation.update(kinds=row.get("val_kinds", VALIDATION_SETTINGS["kinds"]))
                runs.append(run)
    if not runs:
        raise PatchAEError(
            f"no results.json under {role}={patterns}; name the folders train.py or the benchmark wrote"
        )
    return runs


def validation_settings(run: Path) -> dict[str, Any] | None:
    """The run's synthetic-defect validation settings from its .hydra/config.yaml; None without that file."""
    config = run / ".hydra" / "config.yaml"
    if not config.is_file():
        return None
    validation = OmegaConf.to_container(OmegaConf.load(config)).get("validation") or {}
    return {name: validation.get(name, default) for name, default in VALIDATION_SETTINGS.items()}


def change(candidate: dict[str, Any], base: dict[str, Any], name: str) -> float:
    """``candidate[name] - base[name]``; nan when either run lacks the figure (a run without validation)."""
    values = [run.get(name) for run in (candidate, base)]
    return math.nan if None in values else float(values[0]) - float(values[1])


def agreement(cfg: AgreementConfig) -> dict[str, Any]:
    rescored = rescored_rows(cfg.rescored)
    baseline: dict[tuple[str, str, int], Run] = {}
    for run in find_runs(cfg.baseline, "baseline", rescored):
        if run.key in baseline:
            raise PatchAEError(
                f"two baseline runs for model, category, seed {run.key}: {baseline[run.key].folder} and "
                f"{run.folder}; keep one"
            )
        baseline[run.key] = run
    pairs, unpaired = [], []
    for run in find_runs(cfg.candidates, "candidates", rescored):
        base = baseline.get(run.key)
        if base is None:
            unpaired.append({"run": run.folder, "why": "no baseline run of its model, category and seed"})
            continue
        if run.folder == base.folder:
            continue
        if run.validation != base.validation:
            why = f"validated otherwise than its baseline: {run.validation} vs {base.validation}"
            unpaired.append({"run": run.folder, "why": why})
            continue
        pair = {"run": run.folder, "baseline": base.folder, "model": run.key[0], "category": run.key[1]}
        pair.update(seed=run.key[2], test_change=change(run.results, base.results, TEST))
        pair.update({f"{name}_change": change(run.results, base.results, name) for name in VALIDATION})
        pairs.append(pair)
    groups = sorted({(pair["model"], pair["category"]) for pair in pairs})
    summaries = [
        summary(model, category, [p for p in pairs if (p["model"], p["category"]) == (model, category)])
        for model, category in groups
    ]
    return {"pairs": pairs, "summaries": summaries, "unpaired": unpaired}


def summary(model: str, category: str, pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per validation figure: pairs where it moved as the test did, and the changes' Spearman correlation."""
    out: dict[str, Any] = {"model": model, "category": category, "pairs": len(pairs)}
    for name in VALIDATION:
        usable = [
            p for p in pairs if not math.isnan(p[f"{name}_change"]) and not math.isnan(p["test_change"])
        ]
        moves = [(p[f"{name}_change"], p["test_change"]) for p in usable]
        out[f"{name}_same_direction"] = sum((v > 0) == (t > 0) for v, t in moves)
        out[f"{name}_usable"] = len(moves)
        val_changes, test_changes = [v for v, _ in moves], [t for _, t in moves]
        # Undefined for fewer than three pairs or changes all alike.
        defined = len(moves) > 2 and len(set(val_changes)) > 1 and len(set(test_changes)) > 1
        out[f"{name}_spearman"] = float(spearmanr(val_changes, test_changes)[0]) if defined else math.nan
    moves = [(p["val_image_auroc_change"], p["test_change"]) for p in pairs]
    out["test_rose_when_val_rose"] = [sum(t > 0 for v, t in moves if v > 0), sum(v > 0 for v, _ in moves)]
    out["test_rose_when_val_fell"] = [sum(t > 0 for v, t in moves if v <= 0), sum(v <= 0 for v, _ in moves)]
    return out


def format_results(results: dict[str, Any]) -> str:
    lines = [
        "| model | category | pairs | same direction as the test (val image / pixel AUROC / AUPRO) | "
        "Spearman of the changes | test rose when val image AUROC rose | ... when it fell |",
        "|---|---|---:|---|---|---:|---:|",
    ]
    for s in results["summaries"]:
        same = " / ".join(f"{s[f'{name}_same_direction']} of {s[f'{name}_usable']}" for name in VALIDATION)
        rho = " / ".join(f"{s[f'{name}_spearman']:.2f}" for name in VALIDATION)
        rose, fell = s["test_rose_when_val_rose"], s["test_rose_when_val_fell"]
        lines.append(
            f"| {s['model']} | {s['category']} | {s['pairs']} | {same} | {rho} | "
            f"{rose[0]} of {rose[1]} | {fell[0]} of {fell[1]} |"
        )
    lines += [f"not compared: {item['run']} ({item['why']})" for item in results["unpaired"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_command(
        "patchae.benchmarks.agreement", __doc__, AgreementConfig, agreement, format_results, argv
    )


if __name__ == "__main__":
    main()
