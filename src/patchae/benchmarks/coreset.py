"""Coreset benchmark: time, memory and coverage of the coreset methods on banks of patch vectors.

    python -m patchae.benchmarks.coreset                                    # 1M synthetic 128-d vectors
    python -m patchae.benchmarks.coreset sources=[category,texture,1000000,5000000] \
        data_root=../shared/data/mvtec_ad                                  # make bench-coreset: the shapes that matter
    python -m patchae.benchmarks.coreset features=bottle_8x.pt size=100000  # a random 100k of saved vectors
    python -m patchae.benchmarks.coreset data_root=../shared/data/mvtec_ad category=bottle transforms=8 \\
        features=/tmp/bottle_8x.pt                                         # embed once, then reuse the file

``sources`` lists the banks, one table block each: ``category`` (the category's real patch vectors, below),
``texture`` (PatchCore's vectors of generated uniform surfaces, half fine noise, half low-contrast stripes:
the case where exact greedy's pruning fails), or a number of synthetic vectors. For each method
(``bank.coreset_method``; ``auto`` says what it picked) the report gives the wall and process CPU seconds of
the selection, the peak extra memory while it ran (resident set, sampled every 10 ms), and its coverage: the distance from each vector to its nearest coreset vector, in the original feature space
(not the projection the selection uses); ``max`` is the covering radius that greedy k-center minimises.
Coverage is computed over all vectors, or over a random ``coverage_rows`` of them for larger banks (the
exact search costs N x coreset size). Exact greedy is measured where ``auto``'s forecast of its time is
within ``greedy_limit_seconds``; elsewhere its row gives that forecast and the ratios to it are left out.

Real vectors: ``data_root`` + ``category`` embed the category's training images with PatchCore's features
(``backbone``), each image also under the ``transforms`` - 1 other rotations / flips of the dihedral group
(8 in all), which makes 1.2M realistic patch vectors of bottle; ``features`` saves them for the next run.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from patchae.benchmarks.cli import project_root, run_command
from patchae.errors import PatchAEError
from patchae.memory.coreset import (
    CORESET_METHODS,
    DEFAULT_PART_SIZE,
    coreset_size,
    forecast_greedy,
    greedy_coreset,
    project_features,
)

log = logging.getLogger(__name__)


# -- vectors ---------------------------------------------------------------------------------------------
def synthetic_features(size: int, dim: int, seed: int = 0, clusters: int = 1000) -> torch.Tensor:
    """A Gaussian mixture with clusters of different spreads (like patch features of different textures)."""
    generator = torch.Generator().manual_seed(seed)
    centers = 4.0 * torch.randn(clusters, dim, generator=generator)
    spreads = torch.exp(0.5 * torch.randn(clusters, generator=generator))
    features = torch.empty(size, dim)
    for start in range(0, size, 1 << 18):  # in slices: the temporary noise stays small
        stop = min(start + (1 << 18), size)
        cluster = torch.randint(clusters, (stop - start,), generator=generator)
        noise = torch.randn(stop - start, dim, generator=generator)
        features[start:stop] = centers[cluster] + spreads[cluster, None] * noise
    return features


def dihedral(images: torch.Tensor, index: int) -> torch.Tensor:
    """The ``index``-th (0-7) rotation / flip of a (B, C, H, W) batch; 0 is the identity."""
    flipped = images.flip(3) if index >= 4 else images
    return flipped.rot90(index % 4, (2, 3))


def patchcore_model(backbone: str, overrides: tuple[str, ...] = ()) -> tuple[Any, Any]:
    """(PatchCore model in eval mode, its composed config) with ``backbone``, as train.py builds it."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base=None):
        cfg = compose("train", overrides=["model=patchcore", f"backbone={backbone}", *overrides])
    return instantiate(cfg.model, _convert_="all").eval(), cfg


@torch.no_grad()
def embed(model: Any, batches: Any, transforms: int = 1) -> torch.Tensor:
    """The model's (calibrated) patch vectors of normalised image ``batches``, each also under the first
    ``transforms`` rotations / flips."""
    batches = list(batches)
    chunks = [
        model.model.embed_patches(dihedral(images, index)).float()
        for index in range(transforms)
        for images in batches
    ]
    return model.model.calibrate_embedding(torch.cat(chunks))


def embed_category(data_root: str, category: str, backbone: str, transforms: int) -> torch.Tensor:
    """PatchCore's patch vectors of the category's training images (the memory bank's source)."""
    from hydra.utils import instantiate

    model, cfg = patchcore_model(backbone, (f"data.root={data_root}", f"category={category}"))
    datamodule = instantiate(cfg.data, augment=None, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    return embed(model, (batch["image"] for batch in datamodule.bank_dataloader()), transforms)


def texture_images(count: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """``count`` uniform surfaces in [0, 1], (count, 3, size, size): even ones fine grey noise (sigma 8 of
    255, over a random grey level), odd ones low-contrast stripes (amplitude 6 of 255, period 4-16 px, random
    angle and phase, the same noise on top): the patches of steel, paper or brushed metal, where no patch
    stands out from the others."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.empty(count, 3, size, size)
    for index in range(count):
        level = 0.35 + 0.3 * torch.rand((), generator=generator)
        image = level + (8 / 255) * torch.randn(size, size, generator=generator)
        if index % 2:
            angle, phase = torch.rand(2, generator=generator) * torch.tensor([torch.pi, 2 * torch.pi])
            period = 4 + 12 * torch.rand((), generator=generator)
            along = rows * torch.cos(angle) + cols * torch.sin(angle)
            image += (6 / 255) * torch.sin(2 * torch.pi * along / period + phase)
        images[index] = image.clamp(0, 1)
    return images


def embed_textures(count: int, backbone: str, seed: int) -> torch.Tensor:
    """PatchCore's patch vectors of :func:`texture_images` (normalised as the backbone expects)."""
    model, cfg = patchcore_model(backbone)
    mean = torch.tensor(list(cfg.backbone.mean)).view(1, 3, 1, 1)
    std = torch.tensor(list(cfg.backbone.std)).view(1, 3, 1, 1)
    images = (texture_images(count, seed=seed) - mean) / std
    return embed(model, images.split(16))


def load_features(cfg: BenchmarkConfig, source: str | None = None) -> tuple[torch.Tensor, str]:
    """(vectors, where they come from) of one of ``cfg.sources`` (None: ``features`` / ``data_root`` when
    given, else ``size`` synthetic vectors), a random ``cfg.size`` rows of real ones when there are more."""
    if source is not None and str(source).isdigit():
        return synthetic_features(int(source), cfg.dim, cfg.seed), "synthetic Gaussian mixture"
    if source == "texture":
        features = embed_textures(cfg.texture_images, cfg.backbone, cfg.seed)
        description = (
            f"{cfg.texture_images} generated textures, fine noise and low-contrast stripes ({cfg.backbone})"
        )
        return subset(features, description, cfg)
    if source not in (None, "category", "synthetic"):
        raise PatchAEError(
            f"sources: {source!r} is unknown; use category, texture, synthetic or a number of vectors"
        )
    path = Path(cfg.features) if cfg.features else None
    if source != "synthetic" and cfg.data_root is not None and not (path and path.exists()):
        if not 1 <= cfg.transforms <= 8:
            raise PatchAEError(f"transforms={cfg.transforms} must be between 1 and 8 (the dihedral group)")
        features = embed_category(cfg.data_root, cfg.category, cfg.backbone, cfg.transforms)
        description = f"{cfg.category} training patches x {cfg.transforms} transforms ({cfg.backbone})"
        if path is not None:
            torch.save(features, path)
    elif source != "synthetic" and path is not None:
        if not path.exists():
            raise PatchAEError(
                f"features={path} does not exist; give a saved (N, D) tensor, or data_root to embed one"
            )
        try:
            loaded = torch.load(path) if path.suffix == ".pt" else torch.from_numpy(np.load(path))
        except Exception as error:
            raise PatchAEError(
                f"could not read features={path} ({error}); save an (N, D) tensor with torch.save"
            ) from None
        if not isinstance(loaded, torch.Tensor) or loaded.ndim != 2:
            raise PatchAEError(f"features={path} must hold one (N, D) tensor")
        features, description = loaded.float(), str(path)
    elif source == "category":
        raise SkippedSource("category: no data_root or features given")
    else:
        return synthetic_features(cfg.size or 1_000_000, cfg.dim, cfg.seed), "synthetic Gaussian mixture"
    return subset(features, description, cfg)


class SkippedSource(Exception):
    """A source the machine lacks (no data): its block says so and the others run."""


def subset(features: torch.Tensor, description: str, cfg: BenchmarkConfig) -> tuple[torch.Tensor, str]:
    if cfg.size is not None and cfg.size < len(features):
        rows = torch.randperm(len(features), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.size]
        features = features[rows.sort().values]
        description += f", random {cfg.size} rows"
    return features.contiguous(), description


# -- measures --------------------------------------------------------------------------------------------
def coverage(features: torch.Tensor, coreset: torch.Tensor, rows: torch.Tensor | None) -> dict[str, float]:
    """Distance of each vector (or of ``rows``) to its nearest coreset vector: max (covering radius) and mean."""
    index = faiss.IndexFlatL2(features.shape[1])
    index.add(features[coreset].numpy())
    queries = features if rows is None else features[rows]
    distances = []
    for start in range(0, len(queries), 65536):
        chunk = queries[start : start + 65536].numpy()
        distances.append(torch.from_numpy(index.search(chunk, 1)[0][:, 0]).clamp_min(0).sqrt())
    found = torch.cat(distances)
    return {"max": float(found.max()), "mean": float(found.mean())}


class PeakMemory:
    """Peak resident memory above the start, sampled every 10 ms by a thread (Linux /proc; None elsewhere)."""

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = _resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak or 0, _resident_bytes() or 0)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak or 0, _resident_bytes() or 0)

    @property
    def megabytes(self) -> float | None:
        return None if self.start is None else (self.peak - self.start) / 2**20


def _resident_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


_PAGE_SIZE = 4096


def time_selection(
    features: torch.Tensor, cfg: BenchmarkConfig, method: str, part_size: int
) -> dict[str, Any]:
    picked = _Picked()
    logging.getLogger("patchae.memory.coreset").addHandler(picked)
    try:
        with PeakMemory() as memory:
            start, cpu_start = time.perf_counter(), time.process_time()
            indices = greedy_coreset(
                features,
                ratio=cfg.ratio,
                projection_dim=cfg.projection_dim,
                seed=cfg.seed,
                method=method,
                part_size=part_size,
            )
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        logging.getLogger("patchae.memory.coreset").removeHandler(picked)
    return {
        "method": method,
        "part_size": part_size if method == "partitioned" else None,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_mb": memory.megabytes,
        "note": picked.message,
        "indices": indices,
    }


class _Picked(logging.Handler):
    """Keeps what ``auto`` logged it picked (and why), for the table."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.message = ""

    def emit(self, record: logging.LogRecord) -> None:
        if "coreset_method=auto" in record.getMessage():
            self.message = "picked " + record.getMessage().removeprefix("coreset: ")


def measure_bank(features: torch.Tensor, source: str, cfg: BenchmarkConfig) -> dict[str, Any]:
    """Every method of ``cfg.methods`` on one bank; exact greedy only where its forecast is within the limit."""
    num = len(features)
    target = coreset_size(num, ratio=cfg.ratio)
    rows = None
    if num > cfg.coverage_rows:
        rows = torch.randperm(num, generator=torch.Generator().manual_seed(cfg.seed + 1))[: cfg.coverage_rows]
    bank: dict[str, Any] = {
        "source": source,
        "vectors": num,
        "dim": features.shape[1],
        "coreset": target,
        "coverage_over": num if rows is None else len(rows),
        "rows": [],
    }
    logger = logging.getLogger("patchae.memory.coreset")
    level = logger.level
    logger.setLevel(logging.INFO)  # auto's choice is logged at INFO
    try:
        for method in cfg.methods:
            for part_size in cfg.part_sizes if method == "partitioned" else [None]:
                forecast = None
                if method == "greedy":
                    points = project_features(features, cfg.projection_dim, cfg.seed)
                    forecast = forecast_greedy(points, target, cfg.seed).seconds
                    del points
                    if forecast > cfg.greedy_limit_seconds:
                        bank["rows"].append(
                            {"method": method, "part_size": None, "forecast_seconds": forecast}
                        )
                        continue
                row = time_selection(features, cfg, method, part_size or DEFAULT_PART_SIZE)
                row["coverage"] = coverage(features, row.pop("indices"), rows)
                row["forecast_seconds"] = forecast
                bank["rows"].append(row)
                log.warning("%s: %s", source, row)
    finally:
        logger.setLevel(level)
    exact = next((r for r in bank["rows"] if r["method"] == "greedy" and "coverage" in r), None)
    for row in bank["rows"]:
        if exact is not None and "coverage" in row:
            row["max_vs_exact"] = row["coverage"]["max"] / exact["coverage"]["max"]
    return bank


# -- command line ----------------------------------------------------------------------------------------
@dataclass
class BenchmarkConfig:
    """``python -m patchae.benchmarks.coreset key=value ...``"""

    features: str | None = None  # a saved (N, D) tensor (.pt or .npy); with data_root: where to save it
    data_root: str | None = None  # embed this dataset's training images (category, backbone, transforms)
    category: str = "bottle"
    backbone: str = "efficientnet_lite0"
    transforms: int = 8  # rotations / flips per image (1 = the images only)
    size: int | None = None  # vectors to use (a random subset of the features); synthetic: 1M
    dim: int = 128  # synthetic vectors' dimension
    ratio: float = 0.1  # bank.coreset_ratio
    projection_dim: int | None = 128  # bank.projection_dim
    methods: list[str] = field(default_factory=lambda: ["auto", "partitioned", "greedy"])
    part_sizes: list[int] = field(default_factory=lambda: [DEFAULT_PART_SIZE])  # bank.coreset_part_size
    sources: list[str] = field(
        default_factory=list
    )  # category | texture | synthetic | a vector count; [] = one bank
    texture_images: int = 200  # texture: generated 224 px images (784 patch vectors each)
    greedy_limit_seconds: float = 1800.0  # exact greedy is run where its forecast is at most this
    coverage_rows: int = 100_000  # coverage over all vectors up to this many, else over this many random ones
    threads: int = 2  # torch and faiss CPU threads
    seed: int = 0
    output: str | None = None  # also write the results as JSON


def run_benchmark(cfg: BenchmarkConfig) -> dict[str, Any]:
    for method in cfg.methods:
        if method not in CORESET_METHODS:
            raise PatchAEError(f"methods: {method!r} is unknown; use {' and/or '.join(CORESET_METHODS)}")
    torch.set_num_threads(cfg.threads)
    faiss.omp_set_num_threads(cfg.threads)
    results: dict[str, Any] = {"ratio": cfg.ratio, "threads": cfg.threads, "seed": cfg.seed, "banks": []}
    for source in cfg.sources or [None]:
        try:
            features, description = load_features(cfg, source)
        except SkippedSource as skipped:
            results["banks"].append({"source": str(source), "skipped": str(skipped)})
            continue
        results["banks"].append(measure_bank(features, description, cfg))
        del features
    return results


def format_results(results: dict[str, Any]) -> str:
    lines = [
        f"coreset ratio {results['ratio']}, {results['threads']} threads, seed {results['seed']}; peak MB = "
        "resident memory above the start; greedy forecast = auto's prediction of exact greedy's wall seconds",
    ]
    header = (
        f"{'method':<18} {'wall s':>8} {'CPU s':>8} {'peak MB':>8} {'max dist':>9} {'mean dist':>9} "
        f"{'max / exact':>11}  note"
    )
    for bank in results["banks"]:
        if "skipped" in bank:
            lines += ["", f"{bank['source']}: skipped ({bank['skipped']})"]
            continue
        lines += [
            "",
            f"{bank['vectors']} vectors of dim {bank['dim']} ({bank['source']}), coreset {bank['coreset']}; "
            f"coverage over {bank['coverage_over']} vectors",
            header,
        ]
        for row in bank["rows"]:
            name = row["method"] + (f" ({row['part_size']})" if row["part_size"] else "")
            forecast = row.get("forecast_seconds")
            note = row.get("note") or ("" if forecast is None else f"greedy forecast {forecast:.0f} s")
            if "coverage" not in row:
                lines.append(f"{name:<18} {'not run: over greedy_limit_seconds':>46}  {note}")
                continue
            cover, ratio, peak = row["coverage"], row.get("max_vs_exact"), row.get("peak_mb")
            lines.append(
                f"{name:<18} {row['seconds']:>8.1f} {row['cpu_seconds']:>8.1f} "
                f"{'' if peak is None else f'{peak:.0f}':>8} {cover['max']:>9.4f} {cover['mean']:>9.4f} "
                f"{'' if ratio is None else f'{ratio:.4f}':>11}  {note}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_command(
        "patchae.benchmarks.coreset", __doc__, BenchmarkConfig, run_benchmark, format_results, argv
    )


if __name__ == "__main__":
    main()
