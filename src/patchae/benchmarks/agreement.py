"""Did label-free validation foretell the test? Each candidate run against the baseline run of its seed.

    python -m patchae.benchmarks.agreement 'baseline=[multirun/daad_base_*]' \\
        'candidates=[multirun/daad_adv01_*,multirun/daad_blocks2x_*]' output=agreement.json

Settings are chosen by label-free validation (held-out normal images with synthetic defects), so it matters
whether a rise there is a rise on real defects. Every ``results.json`` under the folders named (globs allowed) is
keyed by model, category and seed; each candidate run is paired with the baseline run of the same key, and each
pair gives the change of every validation figure and of the test's image AUROC. Per model and category the
command counts how often the test moved the way each validation figure did, the Spearman correlation of the
changes, and how often the test rose when validation's image AUROC rose, and when it fell. Reading test figures
is the point here: use it to judge a validation, not to choose a setting. Quote a glob that starts with ``*``
inside a list (``'candidates=["*_s0"]'``): unquoted, it reads as a YAML alias.
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
# What a validation figure measures; pairs that differ here are not compared (placement was added later: uniform).
VALIDATION_SETTINGS = {"placement": "uniform", "defects_per_image": None}


@dataclass
class AgreementConfig:
    """``python -m patchae.benchmarks.agreement key=value ...``"""

    baseline: list[str] = field(default_factory=list)  # folders (globs) holding the baseline's results.json
    candidates: list[str] = field(default_factory=list)  # folders (globs) holding the other settings' runs
    output: str | None = None  # a .json file for the results


def find_results(patterns: list[str], role: str) -> list[tuple[str, dict[str, Any]]]:
    """(run folder, results) for every results.json under the folders the patterns match."""
    found = []
    for pattern in patterns:
        for folder in sorted(glob.glob(pattern)) or [pattern]:
            path = Path(folder)
            files = [path] if path.name == "results.json" else sorted(path.rglob("results.json"))
            found += [(str(file.parent), json.loads(file.read_text())) for file in files]
    if not found:
        raise PatchAEError(
            f"no results.json under {role}={patterns}; name the folders train.py or the benchmark wrote"
        )
    return found


def key(results: dict[str, Any]) -> tuple[str, str, int]:
    return str(results["model"]), str(results["category"]), int(results["seed"])


def validation_settings(run: str) -> dict[str, Any] | None:
    """The run's synthetic-defect validation settings from its .hydra/config.yaml; None without that file."""
    config = Path(run) / ".hydra" / "config.yaml"
    if not config.is_file():
        return None
    validation = OmegaConf.to_container(OmegaConf.load(config)).get("validation") or {}
    return {name: validation.get(name, default) for name, default in VALIDATION_SETTINGS.items()}


def change(candidate: dict[str, Any], base: dict[str, Any], name: str) -> float:
    """``candidate[name] - base[name]``; nan when either run lacks the figure (a run without validation)."""
    values = [run.get(name) for run in (candidate, base)]
    return math.nan if None in values else float(values[0]) - float(values[1])


def agreement(cfg: AgreementConfig) -> dict[str, Any]:
    baseline: dict[tuple[str, str, int], str] = {}
    base_results = {}
    for folder, results in find_results(cfg.baseline, "baseline"):
        if key(results) in baseline:
            raise PatchAEError(
                f"two baseline runs for model, category, seed {key(results)}: {baseline[key(results)]} and "
                f"{folder}; keep one"
            )
        baseline[key(results)], base_results[key(results)] = folder, results
    pairs, unpaired = [], []
    for folder, results in find_results(cfg.candidates, "candidates"):
        base = base_results.get(key(results))
        if base is None:
            unpaired.append({"run": folder, "why": "no baseline run of its model, category and seed"})
            continue
        if folder == baseline[key(results)]:
            continue
        settings = validation_settings(folder), validation_settings(baseline[key(results)])
        if settings[0] != settings[1]:
            unpaired.append(
                {
                    "run": folder,
                    "why": f"validated otherwise than its baseline: {settings[0]} vs {settings[1]}",
                }
            )
            continue
        pair = {"run": folder, "baseline": baseline[key(results)], "model": key(results)[0]}
        pair.update(category=key(results)[1], seed=key(results)[2], test_change=change(results, base, TEST))
        pair.update({f"{name}_change": change(results, base, name) for name in VALIDATION})
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
