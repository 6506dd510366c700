"""Benchmark: run (or collect) Patch AE, PatchCore, SSL-AE and DAAD (``--models``, any conf/model name) on many
categories and write one comparison table.

    python -m patchae.benchmarks.accuracy run --categories bottle data.root=../shared/data/mvtec_ad backbone=efficientnet_lite0
    python -m patchae.benchmarks.accuracy collect multirun/2026-01-01_12-00-00   # any runs with a results.json
    python -m patchae.benchmarks.accuracy collect                                 # the latest directory under multirun/

Writes ``benchmark.md``, ``benchmark.csv`` and ``benchmark.png`` beside the runs: one row per category and
method (plus the mean over categories), with the image AUROC the papers published for the same category.
Methods are named after the model, the variant it says it is, and whatever else differs between the runs
(``Patch AE (feature bank, loss.alpha=0.25)``, ``Patch AE (paper)``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from patchae.benchmarks.cli import project_root
from patchae.callbacks import write_csv
from patchae.errors import PatchAEError
from patchae.resume import complete_results

# Published image-level AUROC (%) per MVTec AD category, in MVTec order: Table 1 of Cui, Liu, Lian,
# "Patch-wise Auto-Encoder for Visual Anomaly Detection", ICIP 2023, arXiv:2308.00429 (its "Patch AE" and
# "Patchcore-single" columns; the latter quotes Roth et al., CVPR 2022). Means as the paper prints them.
PAPER_PATCH_AE: dict[str, float | None] = {
    "bottle": 100.0,
    "cable": 99.56,
    "capsule": 99.1,
    "carpet": 99.87,
    "grid": 99.0,
    "hazelnut": 100.0,
    "leather": 100.0,
    "metal_nut": 99.8,
    "pill": 98.2,
    "screw": 97.7,
    "tile": 100.0,
    "toothbrush": 100.0,
    "transistor": 99.65,
    "wood": 99.69,
    "zipper": 99.7,
}
PAPER_PATCH_AE_MEAN = 99.48
PAPER_PATCHCORE: dict[str, float | None] = {
    "bottle": 100.0,
    "cable": 99.6,
    "capsule": 98.2,
    "carpet": 98.4,
    "grid": 99.8,
    "hazelnut": 100.0,
    "leather": 100.0,
    "metal_nut": 100.0,
    "pill": 97.2,
    "screw": 98.9,
    "tile": 98.9,
    "toothbrush": 100.0,
    "transistor": 100.0,
    "wood": 99.5,
    "zipper": 99.9,
}
PAPER_PATCHCORE_MEAN = 99.36
CATEGORY_ORDER = tuple(PAPER_PATCHCORE)

# (results.json key, column header, kind): kind "quality" is shown in %, others as they are.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("image_auroc", "image AUROC %", "quality"),
    ("pixel_auroc", "pixel AUROC %", "quality"),
    ("aupro", "AUPRO %", "quality"),
    ("image_f1_max", "F1-max %", "quality"),
    ("train_seconds", "train s", "seconds"),
    ("test_images_per_second", "images/s", "rate"),
    ("peak_memory_mb", "peak MB", "memory"),
)
PAPER_COLUMNS = (("paper_patch_ae", "paper Patch AE %"), ("paper_patchcore", "paper PatchCore %"))
MODEL_NAMES = {
    "PatchAEModule": "Patch AE",
    "PatchCoreModule": "PatchCore",
    "SSLAEModule": "SSL-AE",
    "DAADModule": "DAAD",
}
# Models trained from scratch need a schedule of their own (tens of epochs at a smaller size): the benchmark runs
# them with their CPU-sized experiment; an experiment=... among the overrides replaces it.
MODEL_EXPERIMENTS = {"ssl_ae": "ssl_ae_cpu", "daad": "daad_cpu"}
ALL_MODELS = "patch_ae,patchcore,ssl_ae,daad"
# Overrides that never name a method: they are the table's rows, or the method's own name.
NOT_A_VARIANT = ("category", "model", "seed", "resume", "ckpt_path")
MEAN = "mean"
RESULT_FILES = ("benchmark.md", "benchmark.csv", "benchmark.png")


@dataclass
class Run:
    """One finished job: its directory, results.json and command-line overrides."""

    run_dir: Path
    results: dict[str, Any]
    overrides: dict[str, str] | None = None

    @property
    def category(self) -> str:
        return str(self.results.get("category", self.run_dir.name))

    @property
    def model(self) -> str:
        name = str(self.results.get("model", "?"))
        return MODEL_NAMES.get(name, name)

    @property
    def variant(self) -> str | None:
        """What the model was run as, where it says: Patch AE's "paper" or "feature bank"."""
        return self.results.get("variant")


@dataclass
class Row:
    category: str
    method: str
    metrics: dict[str, float]
    runs: list[Path] = field(default_factory=list)
    std: dict[str, float] = field(default_factory=dict)  # over repeated runs (seeds); empty for one run

    @property
    def paper(self) -> dict[str, float | None]:
        return {
            "paper_patch_ae": paper_value(PAPER_PATCH_AE, self.category),
            "paper_patchcore": paper_value(PAPER_PATCHCORE, self.category),
        }


def paper_value(table: dict[str, float | None], category: str) -> float | None:
    return table.get(category.lower().replace(" ", "_"))


# -- collecting ---------------------------------------------------------------------------------------
def read_overrides(run_dir: Path) -> dict[str, str] | None:
    """``key -> value`` of the job's command-line overrides (Hydra's ``.hydra/overrides.yaml``), or None."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    entries = yaml.safe_load(path.read_text()) or []
    overrides = {}
    for entry in entries:
        key, _, value = str(entry).partition("=")
        overrides[key.lstrip("+~")] = value
    return overrides


def find_runs(directories: Iterable[Path]) -> list[Run]:
    runs = []
    for directory in directories:
        if not Path(directory).is_dir():
            raise PatchAEError(
                f"{directory} is not a directory; give the run or multirun directories to collect"
            )
        for path in sorted(Path(directory).rglob("results.json")):
            if ".submitit" in path.parts:
                continue
            try:
                results = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as error:
                print(f"skipping {path}: {error}", file=sys.stderr)
                continue
            runs.append(Run(path.parent, results, read_overrides(path.parent)))
    return runs


def method_names(runs: Sequence[Run]) -> list[str]:
    """The model's name plus the settings that tell runs apart (overrides, else results metadata)."""
    if all(run.overrides is not None for run in runs):
        settings = [dict(run.overrides) for run in runs]
    else:
        settings = [
            {key: str(run.results.get(key)) for key in ("backbone", "layers", "alpha", "experiment")}
            for run in runs
        ]
    keys = sorted({key for setting in settings for key in setting} - set(NOT_A_VARIANT))

    # A setting names a method only where one model's runs of one category differ in it: data.root set per
    # category names none, nor does what only tells models apart (their names do that), e.g. a setting another
    # model (DRAEM's results.json) does not have.
    values: dict[tuple[str, str], dict[str, set[str | None]]] = {}
    for run, setting in zip(runs, settings, strict=True):
        group = values.setdefault((run.category, run.model), {})
        for key in keys:
            group.setdefault(key, set()).add(setting.get(key))
    varying: dict[str, set[str]] = {}  # per model, over all categories: a method keeps its name in each
    for (_, model), group in values.items():
        differing = {key for key, seen in group.items() if len(seen) > 1 and not key.startswith("hydra")}
        varying.setdefault(model, set()).update(differing)
    names = []
    for run, setting in zip(runs, settings, strict=True):
        parts = [run.variant] if run.variant else []
        parts += [f"{key}={setting[key]}" for key in keys if key in setting and key in varying[run.model]]
        names.append(f"{run.model} ({', '.join(parts)})" if parts else run.model)
    return names


def finite_values(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def mean(values: Iterable[float | None]) -> float:
    finite = finite_values(values)
    return sum(finite) / len(finite) if finite else math.nan


def std(values: Iterable[float | None]) -> float:
    """Sample standard deviation (n - 1) of the finite values; nan for fewer than two."""
    finite = finite_values(values)
    if len(finite) < 2:
        return math.nan
    centre = sum(finite) / len(finite)
    return math.sqrt(sum((v - centre) ** 2 for v in finite) / (len(finite) - 1))


def category_key(category: str) -> tuple[int, str]:
    return (CATEGORY_ORDER.index(category) if category in CATEGORY_ORDER else len(CATEGORY_ORDER), category)


def build_rows(runs: Sequence[Run]) -> list[Row]:
    """One row per (category, method), repeated runs averaged, then (with several categories) one mean row
    per method."""
    if not runs:
        return []
    groups: dict[tuple[str, str], list[Run]] = {}
    for run, method in zip(runs, method_names(runs), strict=True):
        groups.setdefault((run.category, method), []).append(run)
    methods = list(dict.fromkeys(method for _, method in groups))
    rows = []
    for (category, method), members in sorted(
        groups.items(), key=lambda g: (category_key(g[0][0]), methods.index(g[0][1]))
    ):
        values = {key: [float(run.results.get(key, math.nan)) for run in members] for key, _, _ in METRICS}
        metrics = {key: mean(column) for key, column in values.items()}
        spread = {key: std(column) for key, column in values.items()} if len(members) > 1 else {}
        rows.append(Row(category, method, metrics, [run.run_dir for run in members], spread))
    if len({category for category, _ in groups}) < 2:
        return rows
    shared = shared_categories(rows)
    left_out = sorted({c for c, _ in groups} - shared, key=category_key)
    if left_out:
        print(
            f"mean rows cover the {len(shared)} categories every method ran on; left out: {', '.join(left_out)}",
            file=sys.stderr,
        )
    for method in methods:
        members = [row for row in rows if row.method == method and row.category in shared]
        metrics = {key: mean(row.metrics[key] for row in members) for key, _, _ in METRICS}
        rows.append(Row(MEAN, method, metrics, [path for row in members for path in row.runs]))
    return rows


def shared_categories(rows: Sequence[Row]) -> set[str]:
    """The categories every method has a row for: means compare methods over these only."""
    methods = {row.method for row in rows}
    return set.intersection(
        *(
            {row.category for row in rows if row.method == method and row.category != MEAN}
            for method in methods
        )
    )


def mean_paper(rows: Sequence[Row]) -> dict[str, float | None]:
    """Paper means over the categories of the mean rows (the printed means over all 15)."""
    categories = shared_categories(rows)
    if categories == set(CATEGORY_ORDER):
        return {"paper_patch_ae": PAPER_PATCH_AE_MEAN, "paper_patchcore": PAPER_PATCHCORE_MEAN}
    means = {
        key: mean(table.get(category) for category in categories)
        for key, table in (("paper_patch_ae", PAPER_PATCH_AE), ("paper_patchcore", PAPER_PATCHCORE))
    }
    return {key: None if math.isnan(value) else value for key, value in means.items()}


def paper_columns(rows: Sequence[Row], row: Row) -> dict[str, float | None]:
    return mean_paper(rows) if row.category == MEAN else row.paper


# -- writing ------------------------------------------------------------------------------------------
def format_value(value: float | None, kind: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if kind == "quality":
        return f"{100 * value:.2f}"
    if kind == "paper":
        return f"{value:.2f}"
    if kind == "memory":
        return f"{value:.0f}"
    return f"{value:.1f}"


def format_cell(row: Row, key: str, kind: str) -> str:
    """The mean, with ``± std`` over the repeated runs (seeds) of a quality metric."""
    text = format_value(row.metrics[key], kind)
    spread = row.std.get(key, math.nan)
    if kind == "quality" and not math.isnan(spread):
        text += f" ± {100 * spread:.2f}"
    return text


def table_cells(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    header = [
        "category",
        "method",
        *(title for _, title, _ in METRICS),
        *(title for _, title in PAPER_COLUMNS),
    ]
    body = []
    for row in rows:
        paper = paper_columns(rows, row)
        body.append(
            [
                row.category,
                row.method,
                *(format_cell(row, key, kind) for key, _, kind in METRICS),
                *(format_value(paper[key], "paper") for key, _ in PAPER_COLUMNS),
            ]
        )
    return header, body


def write_markdown(rows: Sequence[Row], path: Path, sources: Sequence[Path]) -> None:
    header, body = table_cells(rows)
    lines = [
        "# Benchmark",
        "",
        f"Runs collected from {', '.join(f'`{s}`' for s in sources)} on {datetime.now():%Y-%m-%d %H:%M}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|",
        *("| " + " | ".join(f"**{c}**" if row[0] == MEAN else c for c in row) + " |" for row in body),
        "",
        "Quality metrics in %; train s includes building the memory bank; images/s is test throughput "
        "(data loading included); peak MB is the GPU's peak allocation, or the process's peak resident memory "
        "on CPU (jobs of one in-process multirun share a process, so later jobs report at least earlier peaks).",
        "",
        "Paper columns, image AUROC: Patch AE and PatchCore-single as in Table 1 of Cui et al. "
        "(arXiv:2308.00429). They used Wide-ResNet backbones and full training: compare them with runs in that "
        "setting (experiment=paper). With several seeds a cell is mean ± std over the seeds.",
        "",
    ]
    path.write_text("\n".join(lines))


def write_table_csv(rows: Sequence[Row], path: Path) -> None:
    """The benchmark table as CSV: one line per category and method, means, stds, the papers' figures."""
    fields = [
        "category",
        "method",
        "runs",
        *(key for key, _, _ in METRICS),
        *(f"{key}_std" for key, _, _ in METRICS),
        "paper_patch_ae_image_auroc",
        "paper_patchcore_image_auroc",
        "run_dirs",
    ]
    lines = []
    for row in rows:
        paper = paper_columns(rows, row)
        lines.append(
            {
                "category": row.category,
                "method": row.method,
                "runs": len(row.runs),
                **row.metrics,
                **{f"{key}_std": row.std.get(key, "") for key, _, _ in METRICS},
                "paper_patch_ae_image_auroc": ""
                if paper["paper_patch_ae"] is None
                else paper["paper_patch_ae"] / 100,
                "paper_patchcore_image_auroc": ""
                if paper["paper_patchcore"] is None
                else paper["paper_patchcore"] / 100,
                "run_dirs": ";".join(str(p) for p in row.runs),
            }
        )
    write_csv(path, lines, fields)


def plot(rows: Sequence[Row], path: Path) -> None:
    """Grouped bars of image and pixel AUROC per category and method, with the papers' image AUROC marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = list(dict.fromkeys(row.category for row in rows))
    methods = list(dict.fromkeys(row.method for row in rows))
    lookup = {(row.category, row.method): row for row in rows}
    width = 0.8 / len(methods)
    figure, axes = plt.subplots(
        2, 1, figsize=(max(6.0, 1.1 * len(categories) * max(1, len(methods)) ** 0.5 + 2), 7), sharex=True
    )
    positions = range(len(categories))
    for axis, (key, title) in zip(
        axes, (("image_auroc", "image AUROC %"), ("pixel_auroc", "pixel AUROC %")), strict=True
    ):
        values_seen = []
        for m, method in enumerate(methods):
            values = [
                100 * lookup[(c, method)].metrics[key] if (c, method) in lookup else math.nan
                for c in categories
            ]
            values_seen += [v for v in values if not math.isnan(v)]
            axis.bar([p - 0.4 + width * (m + 0.5) for p in positions], values, width, label=method)
        if key == "image_auroc":
            for column, marker, label in (
                ("paper_patch_ae", "v", "paper Patch AE"),
                ("paper_patchcore", "_", "paper PatchCore"),
            ):
                points = [
                    (p, paper_columns(rows, Row(c, methods[0], {}))[column])
                    for p, c in zip(positions, categories, strict=True)
                ]
                points = [(p, v) for p, v in points if v is not None]
                if points:
                    values_seen += [v for _, v in points]
                    axis.scatter(
                        *zip(*points, strict=True), marker=marker, s=160, color="black", zorder=3, label=label
                    )
        low = min(values_seen, default=0.0)
        axis.set_ylim(max(0.0, low - 0.1 * (100 - low) - 1), 100.5)
        axis.set_ylabel(title)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[1].set_xticks(list(positions), categories, rotation=30, ha="right")
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def print_table(rows: Sequence[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    header, body = table_cells(rows)
    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < 2 else "right")
    for cells in body:
        table.add_row(*cells, style="bold" if cells[0] == MEAN else None)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def collect(directories: Sequence[Path], out: Path | None = None, quiet: bool = False) -> list[Row]:
    """Find every run under ``directories``, write the table files to ``out`` (default: the first directory)."""
    runs = find_runs(directories)
    if not runs:
        raise PatchAEError(
            f"no results.json under {', '.join(map(str, directories))}; give the directory of finished runs "
            "(a multirun directory, or outputs/<category>/<time>)"
        )
    rows = build_rows(runs)
    out = Path(out or directories[0])
    out.mkdir(parents=True, exist_ok=True)
    write_markdown(rows, out / "benchmark.md", directories)
    write_table_csv(rows, out / "benchmark.csv")
    plot(rows, out / "benchmark.png")
    if not quiet:
        print_table(rows, f"{len(runs)} runs from {', '.join(map(str, directories))}")
        print(f"written: {', '.join(str(out / name) for name in RESULT_FILES)}")
    return rows


def latest_multirun(root: Path = Path("multirun")) -> Path:
    candidates = [path for path in root.glob("*") if path.is_dir()] if root.is_dir() else []
    if not candidates:
        raise PatchAEError(
            f"no runs under {root}/; give the directories to collect, e.g. "
            "python -m patchae.benchmarks.accuracy collect outputs/bottle"
        )
    # By when its runs finished: writing the table files into an older directory must not make it the latest.
    return max(candidates, key=lambda path: max(finished_times(path), default=path.stat().st_mtime))


def finished_times(directory: Path) -> Iterator[float]:
    return (path.stat().st_mtime for path in directory.rglob("results.json"))


# -- running ------------------------------------------------------------------------------------------
def job_commands(
    categories: Sequence[str],
    models: Sequence[str],
    overrides: Sequence[str],
    out: Path,
    python: str = sys.executable,
    seeds: int = 1,
    sweep: str | None = None,
) -> list[tuple[str, Path, list[str]]]:
    """(name, run dir, command) of every job: one process per (model, category, seed), so each reports its
    own time and peak memory and a failure stays in its job. With ``seeds`` > 1 the jobs use seeds 0, 1, ...
    (model initialisation, CutPaste draws, held-out split, coreset projection) and the table averages them.
    ``sweep`` (``key=a,b,c``; ``group=all`` for every option of a conf/ group) multiplies the jobs by its values."""
    root = project_root()
    known = sorted(path.stem for path in (root / "conf" / "model").glob("*.yaml"))
    for model in models:
        if model not in known:
            raise PatchAEError(f"--models: unknown model '{model}'; choose from {', '.join(known)}")
    jobs = []
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise PatchAEError(f"--seeds {seeds!r} must be a positive integer")
    variants = sweep_values(sweep, root)
    for model, category, variant, seed in itertools.product(models, categories, variants, range(seeds)):
        extra = ([variant] if variant else []) + ([f"seed={seed}"] if seeds > 1 else [])
        parts = [model, category, *(part.replace("=", "_") for part in extra)]
        run_dir = out.resolve().joinpath(*parts)
        jobs.append(
            (
                "/".join(parts),
                run_dir,
                train_command(python, root, model, category, overrides, extra, run_dir),
            )
        )
    return jobs


def sweep_values(sweep: str | None, root: Path) -> list[str | None]:
    """``key=a,b`` -> [``key=a``, ``key=b``]; ``group=all`` -> every option of ``conf/group/``; None -> [None]."""
    if sweep is None:
        return [None]
    key, _, values = sweep.partition("=")
    if not key or not values:
        raise PatchAEError(f"--sweep {sweep!r} must look like key=a,b,c (or group=all)")
    if values == "all":
        options = sorted(path.stem for path in (root / "conf" / key).glob("*.yaml"))
        if not options:
            raise PatchAEError(f"--sweep {sweep}: conf/{key}/ has no options")
        return [f"{key}={option}" for option in options]
    return [f"{key}={value.strip()}" for value in values.split(",") if value.strip()]


def train_command(
    python: str,
    root: Path,
    model: str,
    category: str,
    overrides: Sequence[str],
    extra: Sequence[str],
    run_dir: Path,
) -> list[str]:
    own_experiment = model in MODEL_EXPERIMENTS and not any(o.startswith("experiment=") for o in overrides)
    return [
        python,
        str(root / "train.py"),
        f"model={model}",
        *([f"experiment={MODEL_EXPERIMENTS[model]}"] if own_experiment else []),
        f"category={category}",
        *overrides,
        *extra,
        f"hydra.run.dir={run_dir}",
        "hydra.mode=RUN",  # one job each, even with a sweep experiment among the overrides
    ]


def check_overrides(models: Sequence[str], overrides: Sequence[str]) -> None:
    """Compose each model's config once, so that a mistyped override stops the benchmark with Hydra's reason
    before any job starts, instead of failing every job alike."""
    from hydra import compose, initialize_config_dir

    run_settings = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base="1.3"):
        for model in models:
            try:
                compose("train", overrides=[*run_settings, f"model={model}"])
            except (
                Exception
            ) as error:  # Hydra's override and config errors; its first lines say what is wrong
                reason = " ".join(line.strip() for line in str(error).splitlines()[:2])
                raise PatchAEError(f"the overrides do not compose with model={model}: {reason}") from None


def run_job(name: str, run_dir: Path, command: list[str]) -> tuple[int, float]:
    """One job in its own process, its output in ``run_dir/console.log``; (exit code, seconds)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").unlink(missing_ok=True)  # a job that fails now must not show old results
    start = time.perf_counter()
    with (run_dir / "console.log").open("w") as console:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        code = subprocess.run(
            command, stdout=console, stderr=subprocess.STDOUT, env=env, check=False
        ).returncode
    return code, time.perf_counter() - start


def failure_reason(run_dir: Path) -> str:
    lines = (run_dir / "console.log").read_text(errors="replace").splitlines()
    return next(
        (line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else ""
    ).strip()


def run_jobs(jobs: Sequence[tuple[str, Path, list[str]]], parallel: int = 1) -> list[str]:
    """Runs the jobs, ``parallel`` at a time (one after the other by default, so timings are not shared),
    with an overall progress bar; returns the names of failed jobs."""
    from concurrent.futures import ThreadPoolExecutor

    from patchae.callbacks import progress_bar

    failed = []
    with progress_bar() as progress, ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        task = progress.add_task(f"benchmark: {len(jobs)} jobs", total=len(jobs))
        futures = {pool.submit(run_job, *job): job for job in jobs}
        for future, (name, run_dir, _) in futures.items():
            code, elapsed = future.result()
            if code != 0:
                failed.append(name)
                reason = failure_reason(run_dir)
                progress.console.print(f"[red]{name} failed[/red] ({reason}); log: {run_dir / 'console.log'}")
            else:
                progress.console.print(f"{name} done in {elapsed:.0f} s")
            progress.advance(task)
    return failed


def run(
    categories: Sequence[str],
    models: Sequence[str],
    overrides: Sequence[str],
    out: Path,
    dry_run: bool = False,
    seeds: int = 1,
    parallel: int = 1,
    sweep: str | None = None,
    skip_finished: bool = False,
) -> list[Row]:
    jobs = job_commands(categories, models, overrides, out, seeds=seeds, sweep=sweep)
    check_overrides(models, overrides)
    if skip_finished:
        jobs = unfinished_jobs(jobs)
    if dry_run:
        for _, _, command in jobs:
            print(" ".join(command))
        return []
    failed = run_jobs(jobs, parallel)
    if jobs and len(failed) == len(jobs):
        raise PatchAEError(f"every job failed; see the console.log files under {out}")
    rows = collect([out])
    if failed:
        print(f"{len(failed)} of {len(jobs)} jobs failed: {', '.join(failed)}", file=sys.stderr)
    return rows


def unfinished_jobs(jobs: Sequence[tuple[str, Path, list[str]]]) -> list[tuple[str, Path, list[str]]]:
    """The jobs without a complete results.json (:func:`patchae.resume.complete_results`), each with
    ``resume=true`` so that one interrupted during its fit continues from its last checkpoint."""
    pending = [
        (name, run_dir, [*command, "resume=true"])
        for name, run_dir, command in jobs
        if complete_results(run_dir) is None
    ]
    if len(pending) < len(jobs):
        print(f"--skip-finished: {len(jobs) - len(pending)} of {len(jobs)} jobs are complete, not run again")
    return pending


def parse_list(text: str, everything: Sequence[str] = ()) -> list[str]:
    if text.strip() == "all" and everything:
        return list(everything)
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m patchae.benchmarks.accuracy", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="train and test every (model, category), then collect")
    run_parser.add_argument(
        "--categories", default="all", help="comma-separated, or 'all' (the 15 of MVTec AD)"
    )
    run_parser.add_argument("--models", default=ALL_MODELS, help="comma-separated conf/model names")
    run_parser.add_argument("--out", type=Path, default=None, help="default: multirun/benchmark_<time>")
    run_parser.add_argument("--seeds", type=int, default=1, help="runs per cell (seeds 0..N-1): mean ± std")
    run_parser.add_argument(
        "--jobs", type=int, default=1, help="jobs at a time (a GPU machine: several; timings then share it)"
    )
    run_parser.add_argument(
        "--sweep", default=None, help="one more axis of jobs: key=a,b,c, or group=all (e.g. ablation=all)"
    )
    run_parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    run_parser.add_argument(
        "--skip-finished",
        action="store_true",
        help="re-run into the same --out: skip the jobs whose results.json is complete, resume the others",
    )
    run_parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides for every job, e.g. data.root=... backbone=..."
    )
    collect_parser = commands.add_parser("collect", help="tabulate finished runs (results.json files)")
    collect_parser.add_argument(
        "directories", nargs="*", type=Path, help="default: the latest directory under multirun/"
    )
    collect_parser.add_argument(
        "--out", type=Path, default=None, help="where the table files go (default: first directory)"
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            out = args.out or Path("multirun") / f"benchmark_{datetime.now():%Y-%m-%d_%H-%M-%S}"
            run(
                parse_list(args.categories, CATEGORY_ORDER),
                parse_list(args.models),
                args.overrides,
                out,
                args.dry_run,
                args.seeds,
                args.jobs,
                args.sweep,
                args.skip_finished,
            )
        else:
            collect(args.directories or [latest_multirun()], args.out)
    except PatchAEError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
