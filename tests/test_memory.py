"""Tests for patchae.memory: greedy coreset, MemoryBank (faiss) and torch_nearest."""

from __future__ import annotations

import logging

import pytest
import torch

from patchae.errors import PatchAEError
from patchae.memory import MemoryBank, coreset, greedy_coreset, torch_nearest


def clustered(num: int, dim: int, clusters: int = 50, spread: float = 0.3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, dim, generator=generator) * 3
    assignment = torch.randint(clusters, (num,), generator=generator)
    return centers[assignment] + spread * torch.randn(num, dim, generator=generator)


def covering_radius(points: torch.Tensor, subset: torch.Tensor) -> float:
    return float(torch.cdist(points, points[subset]).min(dim=1).values.max())


class TestGreedyCoreset:
    def test_size_uniqueness_and_projection(self) -> None:
        features = torch.randn(2000, 256)  # D > 128: the random projection is used
        indices = greedy_coreset(features, ratio=0.1)
        assert indices.dtype == torch.long and indices.shape == (200,)
        assert indices.unique().numel() == 200
        assert 0 <= int(indices.min()) and int(indices.max()) < 2000
        assert greedy_coreset(features, size=37).shape == (37,)

    def test_deterministic_under_seed(self) -> None:
        features = torch.randn(1000, 64)
        first = greedy_coreset(features, size=50, seed=3)
        assert torch.equal(first, greedy_coreset(features, size=50, seed=3))
        assert not torch.equal(first, greedy_coreset(features, size=50, seed=4))

    @pytest.mark.parametrize("dim", [32, 512])
    def test_far_outliers_are_always_selected(self, dim: int) -> None:
        features = torch.randn(1000, dim, generator=torch.Generator().manual_seed(0))
        outliers = torch.arange(995, 1000)
        features[outliers] = 60.0 * torch.eye(dim)[:5]
        for seed in range(3):
            selected = set(greedy_coreset(features, size=20, seed=seed).tolist())
            assert set(outliers.tolist()) <= selected

    def test_covering_radius_beats_random_subset(self) -> None:
        points = clustered(3000, 8, spread=0.5)
        coreset = greedy_coreset(points, size=150, projection_dim=None)
        random_subset = torch.randperm(3000, generator=torch.Generator().manual_seed(0))[:150]
        assert covering_radius(points, coreset) < 0.6 * covering_radius(points, random_subset)

    def test_keep_everything_shortcuts(self) -> None:
        features = torch.randn(50, 8)
        assert torch.equal(greedy_coreset(features, ratio=1.0), torch.arange(50))
        assert torch.equal(greedy_coreset(features, size=80), torch.arange(50))

    def test_duplicates_never_repeat_an_index(self) -> None:
        features = torch.randn(10, 16).repeat(10, 1)  # only 10 distinct rows
        indices = greedy_coreset(features, size=30)
        assert indices.unique().numel() == 30
        assert torch.unique(features[indices[:10]], dim=0).shape[0] == 10  # distinct rows come first

    def test_progress_is_reported_about_every_percent(self) -> None:
        calls: list[tuple[int, int]] = []
        greedy_coreset(
            torch.randn(3000, 16), size=500, progress=lambda done, total: calls.append((done, total))
        )
        assert calls[-1] == (500, 500)
        assert 90 <= len(calls) <= 110
        assert all(a[0] < b[0] for a, b in zip(calls, calls[1:], strict=False))

    @pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
    def test_invalid_ratio_is_a_user_error(self, ratio: float) -> None:
        with pytest.raises(PatchAEError, match=r"bank.coreset_ratio must be in \(0, 1\]"):
            greedy_coreset(torch.randn(10, 4), ratio=ratio)

    def test_empty_features_is_a_user_error(self) -> None:
        with pytest.raises(PatchAEError, match="0 feature vectors"):
            greedy_coreset(torch.empty(0, 4), ratio=0.1)

    @pytest.mark.parametrize(("dim", "scale"), [(8, 1.0), (64, 3.0)])
    def test_pruned_selection_equals_updating_every_row(self, dim: int, scale: float) -> None:
        # Banks of >= 10k rows on a CPU skip rows by the triangle inequality; the result must not change.
        points = clustered(12_000, dim, spread=scale) * torch.rand(
            12_000, 1, generator=torch.Generator().manual_seed(1)
        )
        points -= points.mean(dim=0)
        first, target = 5, 600
        dense = coreset._dense_greedy(points.clone(), target, first, coreset._ProgressCounter(target, None))
        pruned = coreset._pruned_greedy(
            points.clone().numpy(), target, first, coreset._ProgressCounter(target, None)
        )
        pruned = torch.from_numpy(pruned)
        # Equal up to float rounding: the distances are summed in another order, so a near-tie may swap order.
        assert len(set(pruned.tolist()) & set(dense.tolist())) >= 0.99 * target
        assert covering_radius(points, pruned) == pytest.approx(covering_radius(points, dense), rel=1e-5)
        assert torch.equal(pruned[:100], dense[:100])

    def test_pruned_selection_with_duplicates_never_repeats_an_index(self) -> None:
        features = torch.randn(40, 16).repeat(300, 1)  # 12,000 rows, only 40 distinct: the pruned path
        indices = greedy_coreset(features, size=100)
        assert indices.unique().numel() == 100
        assert torch.unique(features[indices[:40]], dim=0).shape[0] == 40  # distinct rows come first

    def test_half_precision_input(self) -> None:
        features = torch.randn(500, 200).half()
        assert greedy_coreset(features, size=25).unique().numel() == 25


def brute_force(queries: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    distances = torch.cdist(queries.double(), bank.double())
    values, indices = distances.topk(k, dim=1, largest=False)
    return values.float(), indices


class TestTorchNearest:
    @pytest.mark.parametrize("k", [1, 3])
    def test_matches_brute_force(self, k: int) -> None:
        bank, queries = torch.randn(3000, 48), torch.randn(700, 48)
        distances, indices = torch_nearest(queries, bank, k=k)
        expected_d, expected_i = brute_force(queries, bank, k)
        assert distances.dtype == torch.float32 and indices.dtype == torch.long
        assert torch.allclose(distances, expected_d, rtol=1e-5)
        assert (indices == expected_i).float().mean() > 0.999

    def test_chunking_does_not_change_results(self) -> None:
        bank, queries = torch.randn(5000, 32), torch.randn(1000, 32)
        whole_d, whole_i = torch_nearest(queries, bank, k=3, chunk_size=10_000, bank_chunk_size=None)
        chunked_d, chunked_i = torch_nearest(queries, bank, k=3, chunk_size=97, bank_chunk_size=333)
        assert torch.equal(whole_i, chunked_i)
        assert torch.allclose(whole_d, chunked_d, rtol=1e-6)

    def test_bank_chunk_smaller_than_k(self) -> None:
        bank, queries = torch.randn(20, 8), torch.randn(5, 8)
        distances, indices = torch_nearest(queries, bank, k=5, bank_chunk_size=2)
        expected_d, expected_i = brute_force(queries, bank, 5)
        assert torch.equal(indices, expected_i)
        assert torch.allclose(distances, expected_d, rtol=1e-5)

    def test_exact_distance_despite_large_norms(self) -> None:
        bank = torch.randn(100, 16) + 1000.0  # norm identity alone would lose ~all precision here
        queries = bank[:10] + 0.01
        distances, indices = torch_nearest(queries, bank)
        assert torch.equal(indices[:, 0], torch.arange(10))
        assert torch.allclose(distances[:, 0], torch.full((10,), 0.04), rtol=1e-3)

    @pytest.mark.filterwarnings("ignore::FutureWarning")
    def test_torchscript_and_empty_queries(self) -> None:
        bank, queries = torch.randn(300, 16), torch.randn(50, 16)
        scripted = torch.jit.script(torch_nearest)
        assert torch.equal(scripted(queries, bank, 2, 16, 64)[1], torch_nearest(queries, bank, k=2)[1])
        distances, indices = torch_nearest(torch.empty(0, 16), bank, k=2)
        assert distances.shape == (0, 2) and indices.shape == (0, 2)


class TestMemoryBank:
    @pytest.mark.parametrize("k", [1, 3])
    def test_flat_search_equals_torch_nearest(self, k: int) -> None:
        vectors, queries = torch.randn(5000, 64), torch.randn(1000, 64)
        bank = MemoryBank(vectors, device="cpu")
        distances, indices = bank.search(queries, k=k)
        expected_d, expected_i = torch_nearest(queries, vectors, k=k)
        assert distances.shape == (1000, k) and distances.device.type == "cpu"
        assert torch.allclose(distances, expected_d, rtol=1e-4)
        assert (indices == expected_i).float().mean() > 0.999

    def test_search_chunking_and_input_conversion(self) -> None:
        vectors = torch.randn(2000, 32)
        queries = torch.randn(32, 900).double().t()  # float64, non-contiguous
        bank = MemoryBank(vectors, device="cpu")
        whole = bank.search(queries, k=2)
        chunked = bank.search(queries, k=2, chunk_size=64)
        assert torch.equal(whole[1], chunked[1]) and torch.equal(whole[0], chunked[0])

    def test_ivfpq_recall_and_exact_returned_distances(self) -> None:
        vectors = clustered(20_000, 64, clusters=200, spread=0.5)
        noise = 0.1 * torch.randn(500, 64, generator=torch.Generator().manual_seed(1))
        queries = vectors[:500] + noise  # normal test patches lie close to training patches
        _, true_indices = torch_nearest(queries, vectors)
        recalls = {}
        for rerank in (1, 8):
            bank = MemoryBank(vectors, device="cpu", index="ivfpq", nlist=64, m=8, nprobe=8, rerank=rerank)
            assert bank.index_kind == "ivfpq"
            distances, indices = bank.search(queries)
            recalls[rerank] = float((indices[:, 0] == true_indices[:, 0]).float().mean())
            direct = (queries - vectors[indices[:, 0]]).norm(dim=1)
            assert torch.allclose(distances[:, 0], direct, rtol=1e-4)
        assert recalls[1] > 0.5
        assert recalls[8] > 0.95

    def test_ivf_recall(self) -> None:
        points = clustered(10_300, 32, clusters=100)
        vectors, queries = points[:10_000], points[10_000:]
        bank = MemoryBank(vectors, device="cpu", index="ivf", nlist=32, nprobe=4)
        distances, indices = bank.search(queries, k=3)
        true_distances, true_indices = torch_nearest(queries, vectors, k=3)
        assert bank.index_kind == "ivf"
        assert float((indices == true_indices).float().mean()) > 0.9
        assert bool((distances >= true_distances - 1e-5).all())  # never closer than the true neighbours

    def test_probed_lists_with_too_few_vectors(self) -> None:
        points = clustered(10_300, 32, clusters=100)
        vectors, queries = points[:10_000], points[10_000:]
        ivf = MemoryBank(vectors, device="cpu", index="ivf", nlist=32, nprobe=1)
        distances, indices = ivf.search(queries, k=2000)  # more than a list holds: redone exactly
        true_distances, _ = torch_nearest(queries, vectors, k=2000)
        assert torch.allclose(distances, true_distances, rtol=1e-4)
        ivfpq = MemoryBank(vectors, device="cpu", index="ivfpq", nlist=32, m=8, nprobe=1, rerank=8)
        distances, indices = ivfpq.search(queries, k=100)  # 800 candidates: some missing, enough valid
        assert bool(torch.isfinite(distances).all()) and bool((indices >= 0).all())
        assert bool((distances[:, 1:] >= distances[:, :-1]).all())
        for row in range(0, 300, 50):
            assert indices[row].unique().numel() == 100

    def test_small_bank_falls_back_to_flat(self, caplog: pytest.LogCaptureFixture) -> None:
        vectors, queries = torch.randn(500, 32), torch.randn(50, 32)
        with caplog.at_level(logging.WARNING, logger="patchae.memory.bank"):
            bank = MemoryBank(vectors, device="cpu", index="ivfpq", nlist=64, m=8)
        assert bank.index_kind == "flat"
        assert "using an exact flat index" in caplog.text
        assert torch.equal(bank.search(queries)[1], torch_nearest(queries, vectors)[1])

    def test_large_bank_small_chunks(self) -> None:
        vectors = torch.randn(200_000, 64, generator=torch.Generator().manual_seed(0))
        queries = torch.randn(2000, 64, generator=torch.Generator().manual_seed(1))
        bank = MemoryBank(vectors, device="cpu")
        distances, indices = bank.search(queries, chunk_size=256)
        assert distances.shape == (2000, 1) and len(bank) == 200_000 and bank.dim == 64
        sample = torch.arange(0, 2000, 40)
        expected_d, expected_i = torch_nearest(queries[sample], vectors)
        assert torch.equal(indices[sample], expected_i)
        assert torch.allclose(distances[sample], expected_d, rtol=1e-5)

    def test_state_dict_round_trip(self) -> None:
        vectors, queries = torch.randn(400, 16), torch.randn(30, 16)
        bank = MemoryBank(vectors, device="cpu")
        restored = MemoryBank.from_state_dict(bank.state_dict(), device="cpu")
        assert torch.equal(restored.vectors, bank.vectors)
        assert torch.equal(restored.search(queries, k=2)[1], bank.search(queries, k=2)[1])

    def test_user_errors(self) -> None:
        with pytest.raises(PatchAEError, match="bank.index"):
            MemoryBank(torch.randn(10, 4), index="hnsw")
        with pytest.raises(PatchAEError, match="bank.device"):
            MemoryBank(torch.randn(10, 4), device="tpu")
        with pytest.raises(PatchAEError, match="must divide"):
            MemoryBank(torch.randn(20_000, 30), index="ivfpq", nlist=16, m=16)
        with pytest.raises(PatchAEError, match="non-empty"):
            MemoryBank(torch.empty(0, 8))

    def test_ivfpq_fits_any_feature_size_by_default(self) -> None:
        # EfficientNet-Lite0's representation has 76 dimensions: a fixed 16 sub-vectors would not divide it.
        bank = MemoryBank(torch.randn(20_000, 76), device="cpu", index="ivfpq", nlist=16)
        assert bank.index_kind == "ivfpq" and bank.m == 19
        assert MemoryBank(torch.randn(10, 768), index="ivfpq").m == 192

    @pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
    def test_cuda_without_gpu_is_a_user_error(self) -> None:
        import faiss

        if faiss.get_num_gpus() > 0:
            pytest.skip("faiss sees a GPU")
        with pytest.raises(PatchAEError, match="faiss sees 0 GPU"):
            MemoryBank(torch.randn(10, 4), device="cuda")
