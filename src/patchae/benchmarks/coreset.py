"""Coreset benchmark: time and coverage of the coreset methods on large banks of patch vectors.

    python -m patchae.benchmarks.coreset                                    # 1M synthetic 128-d vectors
    python -m patchae.benchmarks.coreset features=bottle_8x.pt size=100000  # a random 100k of saved vectors
    python -m patchae.benchmarks.coreset data_root=../shared/data/mvtec_ad category=bottle transforms=8 \\
        features=/tmp/bottle_8x.pt                                         # embed once, then reuse the file

For each method (``bank.coreset_method``) the report gives the wall and process CPU seconds of the selection
and its coverage: the distance from each vector to its nearest coreset vector, in the original feature space
(not the projection the selection uses); ``max`` is the covering radius that greedy k-center minimises.
Coverage is computed over all vectors, or over a random ``coverage_rows`` of them for larger banks (the
exact search costs N x coreset size). Exact greedy is always measured, never extrapolated: on a CPU it skips
the vectors a new center cannot be nearer to, so its cost per step shrinks as the selection grows.

Real vectors: ``data_root`` + ``category`` embed the category's training images with PatchCore's features
(``backbone``), each image also under the ``transforms`` - 1 other rotations / flips of the dihedral group
(8 in all), which makes 1.2M realistic patch vectors of bottle; ``features`` saves them for the next run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from patchae.benchmarks.cli import run_command
from patchae.errors import PatchAEError
from patchae.memory.coreset import CORESET_METHODS, DEFAULT_PART_SIZE, coreset_size, greedy_coreset

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


@torch.no_grad()
def embed_category(data_root: str, category: str, backbone: str, transforms: int) -> torch.Tensor:
    """PatchCore's patch vectors of the category's training images (the memory bank's source)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    config_dir = Path(__file__).resolve().parents[3] / "conf"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        cfg = compose(
            "train",
            overrides=[
                "model=patchcore",
                f"backbone={backbone}",
                f"data.root={data_root}",
                f"category={category}",
            ],
        )
    datamodule = instantiate(cfg.data, augment=None, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = instantiate(cfg.model, _convert_="all").eval()
    chunks = [
        model.model.embed_patches(dihedral(batch["image"], index)).float()
        for index in range(transforms)
        for batch in datamodule.bank_dataloader()
    ]
    return model.model.calibrate_embedding(torch.cat(chunks))


def load_features(cfg: BenchmarkConfig) -> tuple[torch.Tensor, str]:
    """(vectors, where they come from), a random ``cfg.size`` rows of them when there are more."""
    path = Path(cfg.features) if cfg.features else None
    if cfg.data_root is not None and not (path and path.exists()):
        if not 1 <= cfg.transforms <= 8:
            raise PatchAEError(f"transforms={cfg.transforms} must be between 1 and 8 (the dihedral group)")
        features = embed_category(cfg.data_root, cfg.category, cfg.backbone, cfg.transforms)
        source = f"{cfg.category} training patches x {cfg.transforms} transforms ({cfg.backbone})"
        if path is not None:
            torch.save(features, path)
    elif path is not None:
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
        features, source = loaded.float(), str(path)
    else:
        return synthetic_features(cfg.size or 1_000_000, cfg.dim, cfg.seed), "synthetic Gaussian mixture"
    if cfg.size is not None and cfg.size < len(features):
        rows = torch.randperm(len(features), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.size]
        features = features[rows.sort().values]
        source += f", random {cfg.size} rows"
    return features.contiguous(), source


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


def time_selection(
    features: torch.Tensor, cfg: BenchmarkConfig, method: str, part_size: int
) -> dict[str, Any]:
    start, cpu_start = time.perf_counter(), time.process_time()
    indices = greedy_coreset(
        features,
        ratio=cfg.ratio,
        projection_dim=cfg.projection_dim,
        seed=cfg.seed,
        method=method,
        part_size=part_size,
    )
    return {
        "method": method,
        "part_size": part_size if method == "partitioned" else None,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "indices": indices,
    }


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
    methods: list[str] = field(default_factory=lambda: ["partitioned", "greedy"])
    part_sizes: list[int] = field(default_factory=lambda: [DEFAULT_PART_SIZE])  # bank.coreset_part_size
    coverage_rows: int = 200_000  # coverage over all vectors up to this many, else over this many random ones
    threads: int = 2  # torch and faiss CPU threads
    seed: int = 0
    output: str | None = None  # also write the results as JSON


def run_benchmark(cfg: BenchmarkConfig) -> dict[str, Any]:
    for method in cfg.methods:
        if method not in CORESET_METHODS:
            raise PatchAEError(f"methods: {method!r} is unknown; use {' and/or '.join(CORESET_METHODS)}")
    torch.set_num_threads(cfg.threads)
    faiss.omp_set_num_threads(cfg.threads)
    features, source = load_features(cfg)
    num = len(features)
    rows = None
    if num > cfg.coverage_rows:
        rows = torch.randperm(num, generator=torch.Generator().manual_seed(cfg.seed + 1))[: cfg.coverage_rows]
    results: dict[str, Any] = {
        "source": source,
        "vectors": num,
        "dim": features.shape[1],
        "coreset": coreset_size(num, ratio=cfg.ratio),
        "threads": cfg.threads,
        "seed": cfg.seed,
        "coverage_over": num if rows is None else len(rows),
        "rows": [],
    }
    for method in cfg.methods:
        for part_size in cfg.part_sizes if method == "partitioned" else [None]:
            row = time_selection(features, cfg, method, part_size or DEFAULT_PART_SIZE)
            row["coverage"] = coverage(features, row.pop("indices"), rows)
            results["rows"].append(row)
            log.warning("%s", row)
    exact = next((r for r in results["rows"] if r["method"] == "greedy"), None)
    for row in results["rows"]:
        if exact is not None:
            row["max_vs_exact"] = row["coverage"]["max"] / exact["coverage"]["max"]
    return results


def format_results(results: dict[str, Any]) -> str:
    lines = [
        f"{results['vectors']} vectors of dim {results['dim']} ({results['source']}), coreset {results['coreset']}, "
        f"{results['threads']} threads, seed {results['seed']}; coverage over {results['coverage_over']} vectors",
        f"{'method':<24} {'wall s':>9} {'CPU s':>9} {'max dist':>9} {'mean dist':>9} {'max / exact':>11}",
    ]
    for row in results["rows"]:
        name = row["method"] + (f" ({row['part_size']})" if row["part_size"] else "")
        cover = row["coverage"]
        ratio = row.get("max_vs_exact")
        lines.append(
            f"{name:<24} {row['seconds']:>9.1f} {row['cpu_seconds']:>9.1f} {cover['max']:>9.4f} "
            f"{cover['mean']:>9.4f} {'' if ratio is None else f'{ratio:.4f}':>11}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_command(
        "patchae.benchmarks.coreset", __doc__, BenchmarkConfig, run_benchmark, format_results, argv
    )


if __name__ == "__main__":
    main()
