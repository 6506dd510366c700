"""Inference benchmark: images/s and per-image latency, and nearest-neighbour search on very large banks.

    python -m patchae.benchmarks.inference                        # throughput, untrained EfficientNet-Lite0
    python -m patchae.benchmarks.inference ckpt=<model.ckpt>      # throughput of a trained model
    python -m patchae.benchmarks.inference mode=bank bank_size=1000000   # chunked search memory, IVF/PQ recall
    python -m patchae.benchmarks.inference mode=all output=bench.json

``throughput``: normalised batches of the model's input size go through the full scoring path (embedding,
bank search, maps, scores) for each batch size; the report gives images/s and the p50/p95 latency per
image (batch latency / batch size) and per batch. Image decoding and preprocessing are not included
(predict.py's summary reports end-to-end images/s).

``bank``: a bank of ``bank_size`` vectors (a real checkpoint's bank grown with jitter when ``ckpt`` is
given, else a Gaussian mixture) is searched with (1) the exact chunked torch search, whose extra memory
stays within ``search_memory_mb`` whatever the bank size, (2) exact faiss (flat), (3) faiss IVF and IVF-PQ,
whose recall@1 is measured against the exact neighbours.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchae.benchmarks.cli import run_command
from patchae.data.transforms import ImageTransform
from patchae.deploy.loading import load_model, resolve_device, set_threads
from patchae.errors import PatchAEError
from patchae.memory import MemoryBank, torch_nearest
from patchae.models import AnomalyModule, PatchAEModule
from patchae.scoring.bank import search_chunks

log = logging.getLogger(__name__)


# -- memory ----------------------------------------------------------------------------------------------
def reset_peak_memory() -> bool:
    """Reset the process's peak resident memory (Linux ``clear_refs``); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_resident_mb() -> float:
    """Peak resident memory of this process since the last :func:`reset_peak_memory` (or since it started),
    CPU memory only (results files' ``peak_memory_mb`` is the GPU's peak on a GPU)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_memory_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def extra_peak_mb(function: Any) -> tuple[Any, float]:
    """Run ``function()``; return its result and how far the peak resident memory rose above the start."""
    if not reset_peak_memory():
        return function(), math.nan
    start = resident_memory_mb()
    result = function()
    return result, peak_resident_mb() - start


# -- throughput ------------------------------------------------------------------------------------------
def untrained_model(bank_size: int, seed: int = 0) -> AnomalyModule:
    """EfficientNet-Lite0 Patch AE at 224 px with a random bank: what timing needs, no training."""
    model = PatchAEModule(
        "tf_efficientnet_lite0", (2, 3), pretrained=False, preprocessing={"image_size": 256, "crop_size": 224}
    )
    generator = torch.Generator().manual_seed(seed)
    model.model.scorer.fit(torch.rand(bank_size, model.model.network.c3, generator=generator))
    return model.eval()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else math.nan


@torch.inference_mode()
def time_batches(model: AnomalyModule, batch_size: int, iterations: int, warmup: int) -> dict[str, float]:
    """Timings of ``iterations`` forward passes of a random normalised batch (after ``warmup`` passes)."""
    shape = ImageTransform.from_preprocessing(model.preprocessing).output_shape
    return time_scoring(lambda images: model(images)[1], shape, batch_size, iterations, warmup, model.device)


@torch.inference_mode()
def time_scoring(
    score: Any,
    size: int | tuple[int, int],
    batch_size: int,
    iterations: int,
    warmup: int,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Timings of ``score(images)`` (anything returning the image scores) on a random normalised batch of
    ``batch_size`` x 3 x ``size`` (an int: square, or (height, width)): images/s and p50/p95 latency per image
    and per batch."""
    height, width = (size, size) if isinstance(size, int) else size
    images = torch.randn(batch_size, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device)
    cuda = torch.device(device).type == "cuda"
    latencies = []
    for step in range(warmup + iterations):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        scores = score(images)
        scores.cpu()  # the scores must actually be there
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            latencies.append(time.perf_counter() - start)
    per_image_ms = [1000 * latency / batch_size for latency in latencies]
    return {
        "batch_size": batch_size,
        "images_per_second": batch_size * len(latencies) / sum(latencies),
        "latency_per_image_ms_p50": percentile(per_image_ms, 50),
        "latency_per_image_ms_p95": percentile(per_image_ms, 95),
        "latency_per_batch_ms_p50": percentile([1000 * x for x in latencies], 50),
        "latency_per_batch_ms_p95": percentile([1000 * x for x in latencies], 95),
        "iterations": iterations,
    }


def benchmark_throughput(
    model: AnomalyModule, batch_sizes: list[int], iterations: int, warmup: int
) -> list[dict[str, float]]:
    return [time_batches(model, batch_size, iterations, warmup) for batch_size in batch_sizes]


# -- very large banks ------------------------------------------------------------------------------------
def synthetic_bank(
    size: int, dim: int, base: torch.Tensor | None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(bank, queries): a real bank grown to ``size`` by jittering its rows, or a Gaussian mixture.

    Jitter is a quarter of the typical nearest-neighbour distance inside the base bank, so grown vectors
    form realistic tight clusters around real patch features.
    """
    generator = torch.Generator().manual_seed(seed)
    if base is None:
        base = torch.randn(4096, dim, generator=generator) * 2.0
    base = base.float()
    sample = base[torch.randperm(len(base), generator=generator)[:2048]]
    spread = torch_nearest(sample, base, k=2)[0][:, 1].median().clamp_min(1e-6)
    noise = 0.25 * float(spread) / math.sqrt(base.shape[1])
    bank = torch.empty(size, base.shape[1])
    for start in range(0, size, 1 << 18):  # in slices: the temporary noise stays small
        stop = min(start + (1 << 18), size)
        rows = torch.randint(len(base), (stop - start,), generator=generator)
        bank[start:stop] = base[rows] + noise * torch.randn(stop - start, base.shape[1], generator=generator)
    return bank, base


def make_queries(base: torch.Tensor, count: int, seed: int = 1) -> torch.Tensor:
    """Queries near the base vectors, a little farther than the bank's own jitter (like test patches)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(len(base), (count,), generator=generator)
    spread = base.std(dim=0).mean()
    return base[rows] + 0.1 * spread * torch.randn(count, base.shape[1], generator=generator)


def recall_at_1(found: torch.Tensor, exact: torch.Tensor, bank: torch.Tensor, queries: torch.Tensor) -> float:
    """Fraction of queries whose returned neighbour is an exact nearest one (ties count as found)."""
    found_d = (bank[found[:, 0]] - queries).pow(2).sum(dim=1)
    exact_d = (bank[exact[:, 0]] - queries).pow(2).sum(dim=1)
    return float((found_d <= exact_d * (1 + 1e-5) + 1e-8).double().mean())


def benchmark_bank(
    bank_size: int,
    dim: int,
    num_queries: int,
    search_memory_mb: float,
    base: torch.Tensor | None,
    nlist: int,
    nprobes: list[int],
    pq_m: int,
) -> dict[str, Any]:
    bank, base = synthetic_bank(bank_size, dim, base)
    queries = make_queries(base, num_queries)
    chunk, bank_chunk = search_chunks(search_memory_mb, bank_size)
    result: dict[str, Any] = {
        "bank_size": bank_size,
        "dim": bank.shape[1],
        "queries": num_queries,
        "bank_mb": bank.numel() * 4 / 2**20,
        "naive_distance_matrix_mb": num_queries * bank_size * 4 / 2**20,
        "search_memory_mb": search_memory_mb,
    }

    start = time.perf_counter()
    (exact_d, exact_i), extra = extra_peak_mb(
        lambda: torch_nearest(queries, bank, k=1, chunk_size=chunk, bank_chunk_size=bank_chunk)
    )
    result["torch_chunked"] = {
        "seconds": time.perf_counter() - start,
        "extra_peak_mb": extra,
        "query_chunk": chunk,
        "bank_chunk": bank_chunk,
    }
    rows: dict[str, Any] = {}
    configs = (
        [("flat", {}, [1])]
        + [("ivf", {"nlist": nlist}, nprobes)]
        + [("ivfpq", {"nlist": nlist, "m": pq_m}, nprobes)]
    )
    for kind, options, probes in configs:
        build_start = time.perf_counter()
        index = MemoryBank(bank, device="cpu", index=kind, **options).build()
        build_seconds = time.perf_counter() - build_start
        for nprobe in probes:
            index.nprobe = nprobe
            if index.index_kind != "flat":
                index._index.nprobe = nprobe
            search_start = time.perf_counter()
            distances, found = index.search(queries, k=1)
            seconds = time.perf_counter() - search_start
            name = kind if kind == "flat" else f"{kind}_nprobe{nprobe}"
            rows[name] = {
                "index": index.index_kind,
                "build_seconds": build_seconds,
                "search_seconds": seconds,
                "queries_per_second": num_queries / seconds,
                "recall_at_1": recall_at_1(found, exact_i, bank, queries),
                "mean_score_error": float((distances[:, 0] - exact_d[:, 0]).abs().mean()),
                "max_score_error": float((distances[:, 0] - exact_d[:, 0]).abs().max()),
            }
        del index
    result["faiss"] = rows
    return result


# -- command line ----------------------------------------------------------------------------------------
@dataclass
class BenchmarkConfig:
    """``python -m patchae.benchmarks.inference key=value ...``"""

    mode: str = "throughput"  # throughput | bank | all
    ckpt: str | None = None  # a trained model; default: untrained EfficientNet-Lite0 with a random bank
    device: str = "auto"
    search: str | None = None  # faiss | torch: override the model's nearest-neighbour search
    threads: int | None = None  # torch CPU threads (null = torch's default, one per core)
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    iterations: int = 10
    warmup: int = 2
    model_bank_size: int = 16384  # random bank of the untrained model (MVTec-sized)
    bank_size: int = 1_000_000
    bank_dim: int = 76  # without ckpt: EfficientNet-Lite0's representation size
    bank_queries: int = 2000
    search_memory_mb: float = 256
    nlist: int = 1024
    nprobes: list[int] = field(default_factory=lambda: [8, 32])
    pq_m: int = 19  # product-quantizer sub-vectors; must divide the dimension (76 = 4 x 19)
    output: str | None = None  # also write the results as JSON


def run_benchmark(cfg: BenchmarkConfig) -> dict[str, Any]:
    if cfg.mode not in ("throughput", "bank", "all"):
        raise PatchAEError(f"mode={cfg.mode} is unknown; use throughput, bank or all")
    device = resolve_device(cfg.device)
    torch.set_grad_enabled(False)
    if cfg.threads is not None:
        set_threads(cfg.threads)
    model = None
    if cfg.ckpt:
        overrides = {"faiss_device": "cpu"} if device.type == "cpu" else {}
        model = load_model(cfg.ckpt, device=str(device), search=cfg.search, **overrides)
    results: dict[str, Any] = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    if cfg.mode in ("throughput", "all"):
        subject = model if model is not None else untrained_model(cfg.model_bank_size).to(device)
        if cfg.search is not None:
            subject.model.scorer.set_search(cfg.search)
        results["model"] = {
            "checkpoint": cfg.ckpt,
            "backbone": subject.hparams.backbone,
            "input_size": "x".join(
                map(str, ImageTransform.from_preprocessing(subject.preprocessing).output_shape)
            ),
            "bank_size": subject.bank_size,
            "search": subject.model.scorer.settings.search,
        }
        results["throughput"] = benchmark_throughput(
            subject, list(cfg.batch_sizes), cfg.iterations, cfg.warmup
        )
    if cfg.mode in ("bank", "all"):
        base = model.model.scorer.bank.cpu() if model is not None else None
        dim = base.shape[1] if base is not None else cfg.bank_dim
        pq_m = cfg.pq_m if dim % cfg.pq_m == 0 else next(m for m in (16, 8, 4, 2, 1) if dim % m == 0)
        results["bank"] = benchmark_bank(
            cfg.bank_size,
            dim,
            cfg.bank_queries,
            cfg.search_memory_mb,
            base,
            cfg.nlist,
            list(cfg.nprobes),
            pq_m,
        )
    return results


def format_results(results: dict[str, Any]) -> str:
    lines = [f"device: {results['cuda'] or results['device']} ({results['torch_threads']} torch threads)"]
    if "throughput" in results:
        model = results["model"]
        lines.append(
            f"model: {model['backbone']} at {model['input_size']} px, bank {model['bank_size']} vectors, "
            f"{model['search']} search ({model['checkpoint'] or 'untrained, random bank'})"
        )
        lines.append(
            f"{'batch':>5} {'images/s':>9} {'ms/image p50':>13} {'p95':>8} {'ms/batch p50':>13} {'p95':>8}"
        )
        for row in results["throughput"]:
            lines.append(
                f"{row['batch_size']:>5} {row['images_per_second']:>9.2f} {row['latency_per_image_ms_p50']:>13.1f} "
                f"{row['latency_per_image_ms_p95']:>8.1f} {row['latency_per_batch_ms_p50']:>13.1f} "
                f"{row['latency_per_batch_ms_p95']:>8.1f}"
            )
    if "bank" in results:
        bank = results["bank"]
        chunked = bank["torch_chunked"]
        lines.append(
            f"bank: {bank['bank_size']} x {bank['dim']} ({bank['bank_mb']:.0f} MB), {bank['queries']} queries; "
            f"a full distance matrix would take {bank['naive_distance_matrix_mb']:.0f} MB"
        )
        lines.append(
            f"exact torch search in blocks of {chunked['query_chunk']} x {chunked['bank_chunk']} "
            f"(budget {bank['search_memory_mb']:.0f} MB): {chunked['seconds']:.2f} s, "
            f"extra peak memory {chunked['extra_peak_mb']:.0f} MB"
        )
        lines.append(
            f"{'faiss index':<18} {'build s':>8} {'search s':>9} {'queries/s':>10} {'recall@1':>9} "
            f"{'mean score err':>15} {'max score err':>14}"
        )
        for name, row in bank["faiss"].items():
            lines.append(
                f"{name:<18} {row['build_seconds']:>8.2f} {row['search_seconds']:>9.3f} "
                f"{row['queries_per_second']:>10.0f} {row['recall_at_1']:>9.4f} {row['mean_score_error']:>15.2e} "
                f"{row['max_score_error']:>14.2e}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_command(
        "patchae.benchmarks.inference", __doc__, BenchmarkConfig, run_benchmark, format_results, argv
    )


if __name__ == "__main__":
    main()
