"""The coreset methods (``bank.coreset_method``: exact greedy, k-means-partitioned greedy) and their benchmark."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from patchae.benchmarks.coreset import BenchmarkConfig, format_results, main, run_benchmark, texture_images
from patchae.callbacks import MemoryBankCallback
from patchae.errors import PatchAEError
from patchae.memory import greedy_coreset
from patchae.memory.coreset import choose_method

CONF = Path(__file__).resolve().parents[1] / "conf"


def clustered(num: int, dim: int, seed: int, clusters: int = 50) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, dim, generator=generator) * 3
    assignment = torch.randint(clusters, (num,), generator=generator)
    return centers[assignment] + 0.5 * torch.randn(num, dim, generator=generator)


def covering_radius(points: torch.Tensor, subset: torch.Tensor) -> float:
    return float(torch.cdist(points, points[subset]).min(dim=1).values.max())


def partitioned(features: torch.Tensor, **kwargs) -> torch.Tensor:
    return greedy_coreset(features, method="partitioned", **kwargs)


class TestPartitioned:
    @pytest.mark.parametrize(("dim", "seed"), [(8, 0), (16, 1), (64, 2)])
    def test_coverage_within_five_percent_of_exact_greedy(self, dim: int, seed: int) -> None:
        points = clustered(4000, dim, seed)
        exact = covering_radius(points, greedy_coreset(points, size=400, projection_dim=None, seed=seed))
        fast = covering_radius(
            points, partitioned(points, size=400, projection_dim=None, seed=seed, part_size=500)
        )
        rows = torch.randperm(4000, generator=torch.Generator().manual_seed(seed))[:400]
        assert fast <= 1.05 * exact
        assert fast < covering_radius(points, rows)  # and better than a random subset

    def test_a_bank_of_one_part_is_exact_greedy(self) -> None:
        features = torch.randn(800, 200)
        expected = greedy_coreset(features, size=80, seed=5)
        assert torch.equal(partitioned(features, size=80, seed=5, part_size=1000), expected)

    def test_deterministic_under_seed(self) -> None:
        features = clustered(4000, 16, seed=0)
        first = partitioned(features, ratio=0.1, seed=3, part_size=500)
        assert torch.equal(first, partitioned(features, ratio=0.1, seed=3, part_size=500))
        assert not torch.equal(first, partitioned(features, ratio=0.1, seed=4, part_size=500))

    def test_exact_size_unique_rows_and_progress(self) -> None:
        features = torch.randn(100, 12).repeat(30, 1)  # 3000 rows, only 100 distinct
        calls: list[tuple[int, int]] = []
        indices = partitioned(features, size=250, part_size=300, progress=lambda *call: calls.append(call))
        assert indices.shape == (250,) and indices.unique().numel() == 250
        assert 0 <= int(indices.min()) and int(indices.max()) < 3000
        assert torch.unique(features[indices], dim=0).shape[0] == 100  # every distinct row is covered
        assert calls[-1] == (250, 250) and 90 <= len(calls) <= 130

    def test_unknown_method_is_a_user_error(self) -> None:
        message = (
            "bank.coreset_method must be one of auto, greedy, partitioned, got 'fast'; "
            "use auto (the default), greedy (exact) or partitioned (fast on millions of vectors)"
        )
        with pytest.raises(PatchAEError) as error:
            greedy_coreset(torch.randn(10, 4), ratio=0.5, method="fast")
        assert str(error.value) == message
        with pytest.raises(PatchAEError, match="^bank.coreset_method must be one of"):
            MemoryBankCallback(coreset_method="fast")  # before training, not after

    @pytest.mark.parametrize("part_size", [0, -3, 2.5])
    def test_bad_part_size_is_a_user_error(self, part_size: object) -> None:
        with pytest.raises(
            PatchAEError, match=f"^bank.coreset_part_size must be a positive integer, got {part_size}$"
        ):
            MemoryBankCallback(coreset_method="partitioned", coreset_part_size=part_size)  # type: ignore[arg-type]

    def test_config_keys_reach_the_callback(self) -> None:
        overrides = ["bank.coreset_method=partitioned", "bank.coreset_part_size=4096"]
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        callback = instantiate(cfg.callbacks.memory_bank)
        assert (callback.coreset_method, callback.coreset_part_size) == ("partitioned", 4096)


class TestAuto:
    """bank.coreset_method=auto: exact greedy where its pruning makes it cheap, partitioned where it does not."""

    def test_picks_partitioned_where_pruning_fails(self) -> None:
        fine_noise = torch.randn(
            40_000, 128, generator=torch.Generator().manual_seed(0)
        )  # no structure to prune
        method, why = choose_method(fine_noise, 4000, greedy_seconds=1.0)
        assert method == "partitioned" and "over bank.coreset_greedy_seconds=1" in why
        assert float(why.split("measure ~")[1].split(" %")[0]) > 50  # it measured most rows every step

    def test_picks_exact_greedy_where_pruning_works(self) -> None:
        generator = torch.Generator().manual_seed(0)
        surface = torch.randn(40_000, 3, generator=generator) @ torch.randn(3, 128, generator=generator)
        method, why = choose_method(
            surface, 4000, greedy_seconds=20.0
        )  # a 3-d family: pruning skips most rows
        assert method == "greedy" and float(why.split("measure ~")[1].split(" %")[0]) < 10

    def test_small_banks_take_exact_greedy(self) -> None:
        assert choose_method(torch.randn(5000, 16), 500)[0] == "greedy"

    def test_auto_selects_the_chosen_methods_rows(self, caplog: pytest.LogCaptureFixture) -> None:
        features = torch.randn(40_000, 64, generator=torch.Generator().manual_seed(1))
        with caplog.at_level("INFO", logger="patchae.memory.coreset"):
            auto = greedy_coreset(features, ratio=0.01, seed=2, method="auto", greedy_seconds=0.0)
        assert torch.equal(auto, partitioned(features, ratio=0.01, seed=2))
        assert "coreset: partitioned (bank.coreset_method=auto)" in caplog.text

    @pytest.mark.parametrize("seconds", [-1, "soon"])
    def test_bad_budget_is_one_line(self, seconds: object) -> None:
        with pytest.raises(
            PatchAEError, match="^bank.coreset_greedy_seconds must be a number of seconds >= 0"
        ):
            MemoryBankCallback(coreset_greedy_seconds=seconds)  # type: ignore[arg-type]

    def test_auto_is_the_default(self) -> None:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train")
        callback = instantiate(cfg.callbacks.memory_bank)
        assert (callback.coreset_method, callback.coreset_greedy_seconds) == ("auto", 20.0)


class TestCoresetBenchmark:
    def test_rows_time_and_coverage_against_exact(self) -> None:
        cfg = BenchmarkConfig(size=4000, dim=8, part_sizes=[500], threads=1)
        (bank,) = run_benchmark(cfg)["banks"]
        assert (bank["vectors"], bank["coreset"], bank["coverage_over"]) == (4000, 400, 4000)
        auto, fast, exact = bank["rows"]
        assert (fast["method"], fast["part_size"], exact["method"]) == ("partitioned", 500, "greedy")
        assert exact["max_vs_exact"] == 1.0 and auto["max_vs_exact"] == 1.0  # 4000 vectors: auto is exact
        assert auto["note"].startswith("picked greedy (bank.coreset_method=auto)")
        assert fast["max_vs_exact"] == pytest.approx(fast["coverage"]["max"] / exact["coverage"]["max"])
        assert 0 < exact["coverage"]["mean"] < exact["coverage"]["max"]
        assert fast["seconds"] > 0 and exact["seconds"] > 0 and exact["forecast_seconds"] > 0
        table = format_results(run_benchmark(cfg)).splitlines()
        assert table[4].startswith("auto ") and table[5].startswith("partitioned (500)")
        assert table[6].startswith("greedy ") and "greedy forecast" in table[6]

    def test_greedy_over_its_limit_is_forecast_not_run(self) -> None:
        cfg = BenchmarkConfig(
            sources=["40000"], dim=64, methods=["greedy"], greedy_limit_seconds=0.0, threads=1
        )
        results = run_benchmark(cfg)
        (row,) = results["banks"][0]["rows"]
        assert "coverage" not in row and row["forecast_seconds"] > 0
        assert "not run: over greedy_limit_seconds" in format_results(results)

    def test_textures_are_uniform_surfaces(self) -> None:
        images = texture_images(4, size=64)
        assert images.shape == (4, 3, 64, 64) and 0 <= float(images.min()) and float(images.max()) <= 1
        assert float(images.std(dim=(1, 2, 3)).max()) < 0.06  # low contrast: no patch stands out

    def test_a_missing_category_is_skipped_and_said(self) -> None:
        results = run_benchmark(BenchmarkConfig(sources=["category", "3000"], dim=8, threads=1))
        assert results["banks"][0] == {
            "source": "category",
            "skipped": "category: no data_root or features given",
        }
        assert results["banks"][1]["vectors"] == 3000

    def test_missing_features_file_is_one_line(self, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
        with pytest.raises(SystemExit):
            main([f"features={tmp_path / 'none.pt'}"])
        assert capsys.readouterr().err == (
            f"error: features={tmp_path / 'none.pt'} does not exist; give a saved (N, D) tensor, "
            "or data_root to embed one\n"
        )
