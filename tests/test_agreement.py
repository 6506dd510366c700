"""python -m patchae.benchmarks.agreement: candidate runs paired with the baseline run of their model, category and
seed; counts of validation and test moving together, checked against sums done by hand; runs validated otherwise
are not compared; one-line errors."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from patchae.benchmarks.agreement import AgreementConfig, agreement, main


def write_run(root, name, seed, val, test, category="screw", placement=None):
    folder = root / name / "daad" / category
    folder.mkdir(parents=True)
    results = {"model": "DAADModule", "category": category, "seed": seed, "image_auroc": test}
    results.update(val_image_auroc=val, val_pixel_auroc=val, val_aupro=val)
    (folder / "results.json").write_text(json.dumps(results))
    if placement is not None:
        (folder / ".hydra").mkdir()
        OmegaConf.save(
            {"validation": {"placement": placement, "defects_per_image": 2}},
            folder / ".hydra" / "config.yaml",
        )
    return folder


@pytest.fixture
def runs(tmp_path):
    for seed in (0, 1, 2):
        write_run(tmp_path, f"base_s{seed}", seed, val=0.80, test=0.60)
    # Validation up in all three seeds; the test up in one of them.
    for seed, test in ((0, 0.55), (1, 0.65), (2, 0.50)):
        write_run(tmp_path, f"up_s{seed}", seed, val=0.85, test=test)
    # Validation down; the test down too.
    write_run(tmp_path, "down_s0", 0, val=0.70, test=0.58)
    write_run(tmp_path, "orphan_s7", 7, val=0.90, test=0.90)  # no baseline of seed 7
    return tmp_path


def test_pairs_and_counts_are_those_done_by_hand(runs):
    got = agreement(
        AgreementConfig(
            baseline=[str(runs / "base_*")],
            candidates=[str(runs / "up_*"), str(runs / "down_*"), str(runs / "orphan_*")],
        )
    )
    assert len(got["pairs"]) == 4
    first = got["pairs"][0]
    assert first["seed"] == 0 and first["test_change"] == pytest.approx(-0.05)
    assert first["val_image_auroc_change"] == pytest.approx(0.05)
    (summary,) = got["summaries"]
    assert (summary["model"], summary["category"], summary["pairs"]) == ("DAADModule", "screw", 4)
    # Same direction: seed 1 of "up" (both up) and "down" (both down).
    assert summary["val_image_auroc_same_direction"] == 2 and summary["val_image_auroc_usable"] == 4
    assert summary["test_rose_when_val_rose"] == [1, 3]
    assert summary["test_rose_when_val_fell"] == [0, 1]
    # Changes (val, test): (.05,-.05), (.05,.05), (.05,-.10), (-.10,-.02); ranks (3,2), (3,4), (3,1), (1,3):
    # Pearson's r of the ranks is -1 / sqrt(3 * 5).
    assert summary["val_image_auroc_spearman"] == pytest.approx(-1 / 15**0.5)
    assert [item["run"] for item in got["unpaired"]] == [str(runs / "orphan_s7" / "daad" / "screw")]


def test_runs_validated_otherwise_are_not_compared(tmp_path):
    write_run(tmp_path, "base", 0, val=0.8, test=0.6, placement="uniform")
    write_run(tmp_path, "same", 0, val=0.9, test=0.7, placement="uniform")
    write_run(tmp_path, "other", 0, val=0.9, test=0.7, placement="foreground")
    got = agreement(
        AgreementConfig(
            baseline=[str(tmp_path / "base")], candidates=[str(tmp_path / "same"), str(tmp_path / "other")]
        )
    )
    assert [pair["run"] for pair in got["pairs"]] == [str(tmp_path / "same" / "daad" / "screw")]
    (item,) = got["unpaired"]
    assert "validated otherwise" in item["why"] and "foreground" in item["why"]


def test_the_table_is_printed(runs, capsys):
    main([f"baseline=[{runs / 'base_*'}]", f"candidates=[{runs / 'up_*'}]"])
    printed = capsys.readouterr().out
    assert "| DAADModule | screw | 3 | 1 of 3 / 1 of 3 / 1 of 3 |" in printed
    assert "| 1 of 3 | 0 of 0 |" in printed


def test_two_baselines_of_one_seed_are_a_one_line_error(runs, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([f"baseline=[{runs / 'base_*'},{runs / 'up_*'}]", f"candidates=[{runs / 'down_*'}]"])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: two baseline runs") and error.count("\n") == 1


def test_folders_without_results_are_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([f"baseline=[{tmp_path}]", f"candidates=[{tmp_path}]"])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: no results.json under baseline=") and error.count("\n") == 1


def test_a_bad_argument_names_the_command_to_ask_for_help(capsys):
    # An unquoted glob starting with * is a YAML alias: the line must say which command's --help to read.
    with pytest.raises(SystemExit):
        main(["baseline=[*_s0]"])
    assert "see python -m patchae.benchmarks.agreement --help" in capsys.readouterr().err


def rescore_row(folder, val, test, placement="foreground", kinds=("warp",)):
    row = {"run": str(folder), "val_placement": placement, "val_kinds": list(kinds), "test_image_auroc": test}
    row.update(
        val_image_auroc=val, val_pixel_auroc=val, val_aupro=val, test_pixel_auroc=None, test_aupro=None
    )
    return row


def test_rescored_rows_replace_the_figures_and_the_validation_they_were_made_with(tmp_path):
    base = write_run(tmp_path, "base", 0, val=0.8, test=0.6, placement="uniform")
    same = write_run(tmp_path, "same", 0, val=0.9, test=0.7, placement="uniform")
    other = write_run(tmp_path, "other", 1, val=0.9, test=0.7, placement="uniform")
    write_run(tmp_path, "base1", 1, val=0.8, test=0.6, placement="uniform")
    rescored = tmp_path / "rescore.json"
    rows = [rescore_row(base, 0.70, 0.60), rescore_row(same, 0.60, 0.70), rescore_row(other, 0.95, 0.7)]
    rescored.write_text(json.dumps({"rows": rows, "means": []}))
    got = agreement(
        AgreementConfig(
            baseline=[str(tmp_path / "base*")],
            candidates=[str(tmp_path / "same"), str(tmp_path / "other")],
            rescored=[str(rescored)],
        )
    )
    # "same" and its baseline were both rescored with warps: validation fell 0.1 where results.json said +0.1.
    (pair,) = got["pairs"]
    assert pair["val_image_auroc_change"] == pytest.approx(-0.1) and pair["test_change"] == pytest.approx(0.1)
    # "other" was rescored, its baseline (seed 1) was not: validated otherwise.
    (item,) = got["unpaired"]
    assert item["run"].endswith("other/daad/screw") and "'kinds': ['warp']" in item["why"]


def test_a_file_that_is_no_rescore_output_is_a_one_line_error(tmp_path, capsys):
    write_run(tmp_path, "base", 0, val=0.8, test=0.6)
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(SystemExit):
        main(
            [
                f"baseline=[{tmp_path / 'base'}]",
                f"candidates=[{tmp_path / 'base'}]",
                f"rescored=[{tmp_path / 'x.json'}]",
            ]
        )
    error = capsys.readouterr().err
    assert "is no rescore output" in error and error.count("\n") == 1


def test_two_rescored_rows_of_one_run_are_a_one_line_error(tmp_path, capsys):
    base = write_run(tmp_path, "base", 0, val=0.8, test=0.6)
    rescored = tmp_path / "rescore.json"
    rescored.write_text(json.dumps({"rows": [rescore_row(base, 0.7, 0.6), rescore_row(base, 0.6, 0.6)]}))
    with pytest.raises(SystemExit):
        main([f"baseline=[{base}]", f"candidates=[{base}]", f"rescored=[{rescored}]"])
    error = capsys.readouterr().err
    assert "two rescored rows for" in error and "give one row per run" in error and error.count("\n") == 1
