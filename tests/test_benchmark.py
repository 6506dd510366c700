import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_tiny_sweep
from patchae.benchmarks import accuracy as benchmark
from patchae.benchmarks.accuracy import (
    MEAN,
    PAPER_PATCHCORE,
    build_rows,
    check_overrides,
    collect,
    find_runs,
    job_commands,
    latest_multirun,
    main,
    method_names,
    run_jobs,
)
from patchae.data import MVTEC_CATEGORIES
from patchae.errors import PatchAEError

ROOT = Path(__file__).resolve().parents[1]


def fake_run(directory: Path, overrides: list[str] | None = None, **results) -> Path:
    directory.mkdir(parents=True)
    base = {
        "category": "bottle",
        "model": "PatchAEModule",
        "backbone": "tf_efficientnet_lite0",
        "layers": "2+3",
        "alpha": 0.5,
        "experiment": "default",
        "seed": 42,
        "image_auroc": 0.9,
        "pixel_auroc": 0.95,
        "aupro": 0.8,
        "image_f1_max": 0.85,
        "train_seconds": 10.0,
        "test_images_per_second": 20.0,
        "peak_memory_mb": 1000.0,
    }
    (directory / "results.json").write_text(json.dumps({**base, **results}))
    if overrides is not None:
        (directory / ".hydra").mkdir()
        (directory / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return directory


def test_paper_tables_cover_the_mvtec_categories_in_order():
    assert tuple(PAPER_PATCHCORE) == MVTEC_CATEGORIES
    assert tuple(benchmark.PAPER_PATCH_AE) == MVTEC_CATEGORIES
    # Table 1 of the Patch AE paper prints these means: the per-category values must agree with them.
    assert sum(PAPER_PATCHCORE.values()) / 15 == pytest.approx(benchmark.PAPER_PATCHCORE_MEAN, abs=0.01)
    assert sum(benchmark.PAPER_PATCH_AE.values()) / 15 == pytest.approx(
        benchmark.PAPER_PATCH_AE_MEAN, abs=0.01
    )
    assert benchmark.PAPER_PATCH_AE["screw"] == 97.7 and PAPER_PATCHCORE["screw"] == 98.9


TABLE1_CSV = ROOT.parent / "shared" / "reference" / "patch_ae_table1.csv"


@pytest.mark.skipif(not TABLE1_CSV.exists(), reason="the shared copy of the paper's Table 1 is not here")
def test_paper_columns_are_the_shared_table_1():
    lines = [line for line in TABLE1_CSV.read_text().splitlines() if line and not line.startswith("#")]
    rows = {row["category"].lower().replace(" ", "_"): row for row in csv.DictReader(lines)}
    for category in MVTEC_CATEGORIES:
        assert float(rows[category]["Patch AE"]) == benchmark.PAPER_PATCH_AE[category], category
        assert float(rows[category]["Patchcore-single [22]"]) == PAPER_PATCHCORE[category], category


def test_rows_per_category_and_method_with_means_and_paper_columns(tmp_path):
    for model, category, auroc, seconds in [
        ("PatchAEModule", "bottle", 1.0, 10.0),
        ("PatchCoreModule", "bottle", 0.98, 2.0),
        ("PatchAEModule", "screw", 0.80, 30.0),
        ("PatchCoreModule", "screw", 0.90, 4.0),
    ]:
        fake_run(
            tmp_path / f"{model}_{category}",
            [f"model={model}", f"category={category}", "backbone=efficientnet_lite0"],
            model=model,
            category=category,
            image_auroc=auroc,
            train_seconds=seconds,
        )
    rows = build_rows(find_runs([tmp_path]))
    assert [(r.category, r.method) for r in rows] == [
        ("bottle", "Patch AE"),
        ("bottle", "PatchCore"),
        ("screw", "Patch AE"),
        ("screw", "PatchCore"),
        (MEAN, "Patch AE"),
        (MEAN, "PatchCore"),
    ]
    mean_patch_ae = rows[4]
    assert mean_patch_ae.metrics["image_auroc"] == pytest.approx(0.90)
    assert mean_patch_ae.metrics["train_seconds"] == pytest.approx(20.0)
    assert rows[1].paper["paper_patchcore"] == 100.0
    assert rows[3].paper["paper_patchcore"] == 98.9
    assert rows[2].paper["paper_patch_ae"] == 97.7
    paper = benchmark.paper_columns(rows, rows[5])
    assert paper["paper_patchcore"] == pytest.approx((100.0 + 98.9) / 2)
    assert paper["paper_patch_ae"] == pytest.approx((100.0 + 97.7) / 2)


def test_methods_are_named_after_what_differs(tmp_path):
    for i, alpha in enumerate(["0.0", "0.5", "1.0"]):
        fake_run(
            tmp_path / str(i),
            ["experiment=sweep_alpha", "category=screw", f"loss.alpha={alpha}"],
            category="screw",
        )
    names = method_names(find_runs([tmp_path]))
    assert names == ["Patch AE (loss.alpha=0.0)", "Patch AE (loss.alpha=0.5)", "Patch AE (loss.alpha=1.0)"]


def test_settings_that_only_follow_the_category_name_no_method(tmp_path):
    for category, root in (("bottle", "mvtec_ad"), ("screw", "mvtec_ad_image_level")):
        for model in ("patch_ae", "patchcore"):
            fake_run(
                tmp_path / f"{category}_{model}",
                [f"model={model}", f"category={category}", f"data.root={root}"],
                category=category,
                model={"patch_ae": "PatchAEModule", "patchcore": "PatchCoreModule"}[model],
            )
    assert sorted(set(method_names(find_runs([tmp_path])))) == ["Patch AE", "PatchCore"]


def test_without_hydra_overrides_metadata_tells_runs_apart(tmp_path):
    fake_run(tmp_path / "a", None, layers="2+3")
    fake_run(tmp_path / "b", None, layers="1+2")
    assert sorted(method_names(find_runs([tmp_path]))) == ["Patch AE (layers=1+2)", "Patch AE (layers=2+3)"]


def test_settings_that_only_tell_models_apart_name_no_method(tmp_path):
    # SSL-AE from the benchmark (overrides) beside DRAEM's results.json (none, other metadata): each model is its
    # name, and DRAEM's variant (its time budget) is kept.
    fake_run(
        tmp_path / "ssl",
        ["model=ssl_ae", "experiment=ssl_ae_cpu"],
        model="SSLAEModule",
        experiment="ssl_ae_cpu",
    )
    fake_run(
        tmp_path / "draem", None, model="DRAEM (anomalib 2.7)", variant="3 min", layers=None, experiment=None
    )
    fake_run(tmp_path / "p1", ["loss.alpha=0.5"], alpha=0.5)
    fake_run(tmp_path / "p2", ["loss.alpha=1.0"], alpha=1.0)
    assert sorted(method_names(find_runs([tmp_path]))) == [
        "DRAEM (anomalib 2.7) (3 min)",
        "Patch AE (alpha=0.5)",
        "Patch AE (alpha=1.0)",
        "SSL-AE",
    ]


def test_repeated_runs_are_averaged(tmp_path):
    fake_run(tmp_path / "a", ["category=bottle"], image_auroc=0.9)
    fake_run(tmp_path / "b", ["category=bottle"], image_auroc=0.8)
    (row,) = build_rows(find_runs([tmp_path]))  # one category: no mean row
    assert row.metrics["image_auroc"] == pytest.approx(0.85)
    assert len(row.runs) == 2


def test_seeds_are_averaged_with_their_spread_not_named_as_methods(tmp_path):
    for seed, auroc in enumerate([0.90, 0.94, 0.98]):
        fake_run(
            tmp_path / str(seed), ["category=screw", f"seed={seed}"], category="screw", image_auroc=auroc
        )
    (row,) = build_rows(find_runs([tmp_path]))
    assert row.method == "Patch AE"
    assert row.metrics["image_auroc"] == pytest.approx(0.94)
    assert row.std["image_auroc"] == pytest.approx(0.04)  # sample standard deviation
    _, body = benchmark.table_cells([row])
    assert body[0][2] == "94.00 ± 4.00"


def test_seed_and_sweep_jobs(tmp_path):
    jobs = benchmark.job_commands(
        ["screw"], ["patch_ae"], ["trainer.max_epochs=1"], tmp_path, seeds=2, sweep="loss.alpha=0,1"
    )
    assert [name for name, _, _ in jobs] == [
        "patch_ae/screw/loss.alpha_0/seed_0",
        "patch_ae/screw/loss.alpha_0/seed_1",
        "patch_ae/screw/loss.alpha_1/seed_0",
        "patch_ae/screw/loss.alpha_1/seed_1",
    ]
    assert jobs[1][2][-4:-2] == ["loss.alpha=0", "seed=1"]
    ablations = benchmark.job_commands(["screw"], ["patch_ae"], [], tmp_path, sweep="ablation=all")
    assert "ablation=defaults" in {command[-3] for _, _, command in ablations}
    with pytest.raises(PatchAEError, match="--seeds"):
        benchmark.job_commands(["screw"], ["patch_ae"], [], tmp_path, seeds=0)


def test_models_trained_from_scratch_get_their_cpu_schedule_unless_one_is_given(tmp_path) -> None:
    jobs = benchmark.job_commands(["bottle"], ["patchcore", "ssl_ae", "daad"], [], tmp_path)
    experiments = [[part for part in command if part.startswith("experiment=")] for _, _, command in jobs]
    assert experiments == [[], ["experiment=ssl_ae_cpu"], ["experiment=daad_cpu"]]
    jobs = benchmark.job_commands(["bottle"], ["daad"], ["experiment=daad_paper"], tmp_path)
    assert [part for part in jobs[0][2] if part.startswith("experiment=")] == ["experiment=daad_paper"]


def test_collect_writes_markdown_csv_and_plot(tmp_path):
    fake_run(tmp_path / "runs" / "a", ["model=patch_ae", "category=bottle"], image_auroc=0.995)
    fake_run(
        tmp_path / "runs" / "b",
        ["model=patchcore", "category=bottle"],
        model="PatchCoreModule",
        aupro=float("nan"),
    )
    collect([tmp_path / "runs"], tmp_path / "table", quiet=True)
    markdown = (tmp_path / "table" / "benchmark.md").read_text()
    assert (
        "| bottle | Patch AE | 99.50 | 95.00 | 80.00 | 85.00 | 10.0 | 20.0 | 1000 | 100.00 | 100.00 |"
        in markdown
    )
    assert "| bottle | PatchCore | 90.00 | 95.00 | nan |" in markdown
    rows = list(csv.DictReader((tmp_path / "table" / "benchmark.csv").open()))
    assert [r["method"] for r in rows] == ["Patch AE", "PatchCore"]
    assert float(rows[0]["image_auroc"]) == pytest.approx(0.995)
    assert float(rows[0]["paper_patchcore_image_auroc"]) == pytest.approx(1.0)
    assert float(rows[0]["paper_patch_ae_image_auroc"]) == pytest.approx(1.0)
    with Image.open(tmp_path / "table" / "benchmark.png") as plot:
        assert plot.width > 300 and plot.height > 300


def test_collect_without_results_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["collect", str(tmp_path / "empty")]) == 1
    assert "error: no results.json under" in capsys.readouterr().err


def test_run_builds_one_job_per_model_and_category(tmp_path):
    jobs = job_commands(
        ["bottle", "screw"], ["patch_ae", "patchcore"], ["backbone=efficientnet_lite0"], tmp_path
    )
    assert [name for name, _, _ in jobs] == [
        "patch_ae/bottle",
        "patch_ae/screw",
        "patchcore/bottle",
        "patchcore/screw",
    ]
    name, run_dir, command = jobs[3]
    assert run_dir == tmp_path.resolve() / "patchcore" / "screw"
    assert command[1] == str(ROOT / "train.py")
    assert command[2:] == [
        "model=patchcore",
        "category=screw",
        "backbone=efficientnet_lite0",
        f"hydra.run.dir={run_dir}",
        "hydra.mode=RUN",
    ]
    with pytest.raises(PatchAEError, match="unknown model 'padim'"):
        job_commands(["bottle"], ["padim"], [], tmp_path)


def test_run_jobs_continues_past_a_failed_job(tmp_path, capsys):
    ok = f"import json, pathlib; pathlib.Path(r'{tmp_path / 'ok'}/results.json').write_text(json.dumps({{'category': 'bottle'}}))"
    jobs = [
        (
            "bad",
            tmp_path / "bad",
            [sys.executable, "-c", "import sys; print('error: no such folder'); sys.exit(1)"],
        ),
        ("ok", tmp_path / "ok", [sys.executable, "-c", ok]),
    ]
    fake_run(tmp_path / "bad", category="from an earlier benchmark")  # left in a reused --out
    assert run_jobs(jobs) == ["bad"]
    assert not (tmp_path / "bad" / "results.json").exists()  # so its old results are not collected
    assert "error: no such folder" in (tmp_path / "bad" / "console.log").read_text()
    assert (tmp_path / "ok" / "results.json").is_file()
    assert "bad failed" in capsys.readouterr().out


@pytest.mark.slow
def test_alpha_sweep_then_benchmark_table(tmp_path):
    """The acceptance path: a 5-job multirun on synthetic data, then the benchmark's table of it."""
    sweep = tmp_path / "sweep"
    done = run_tiny_sweep(tmp_path, sweep, "-m", "experiment=sweep_alpha", "bank.coreset_ratio=0.5")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(sweep.glob("*/results.json"))) == 5
    table = subprocess.run(
        [sys.executable, "-m", "patchae.benchmarks.accuracy", "collect", str(sweep)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert table.returncode == 0, table.stderr[-2000:]
    for alpha in ("0.0", "0.25", "0.5", "0.75", "1.0"):
        assert f"Patch AE (feature bank, loss.alpha={alpha})" in table.stdout
    rows = list(csv.DictReader((sweep / "benchmark.csv").open()))
    assert len(rows) == 5
    assert all(0.0 <= float(row["image_auroc"]) <= 1.0 for row in rows)


def test_mean_rows_compare_methods_over_the_same_categories(tmp_path, capsys):
    fake_run(tmp_path / "ae_bottle", ["model=patch_ae", "category=bottle"], image_auroc=0.9)
    fake_run(tmp_path / "ae_screw", ["model=patch_ae", "category=screw"], category="screw", image_auroc=0.5)
    fake_run(
        tmp_path / "pc_bottle",
        ["model=patchcore", "category=bottle"],
        model="PatchCoreModule",
        image_auroc=0.8,
    )
    means = {
        row.method: row.metrics["image_auroc"]
        for row in build_rows(find_runs([tmp_path]))
        if row.category == MEAN
    }
    assert means == {
        "Patch AE": pytest.approx(0.9),
        "PatchCore": pytest.approx(0.8),
    }  # screw: PatchCore failed
    assert "left out: screw" in capsys.readouterr().err


def test_latest_multirun_is_the_one_whose_runs_finished_last(tmp_path):
    older, newer = fake_run(tmp_path / "a" / "job"), fake_run(tmp_path / "b" / "job")
    os.utime(older / "results.json", (1_000, 1_000))
    os.utime(newer / "results.json", (2_000, 2_000))
    collect([tmp_path / "a"], quiet=True)  # writing the table into the older directory changes nothing
    assert latest_multirun(tmp_path) == tmp_path / "b"


def test_a_mistyped_override_stops_the_benchmark_before_any_job(tmp_path):
    with pytest.raises(PatchAEError, match="Could not override 'data.rot'"):
        check_overrides(["patch_ae"], ["data.rot=1"])
    check_overrides(["patch_ae", "patchcore"], ["backbone=efficientnet_lite0", "hydra.job.chdir=false"])
