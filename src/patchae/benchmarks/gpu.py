"""GPU figures in one prepared run (``make bench-gpu``), printed as they come, for a machine lent for minutes.

    python -m patchae.benchmarks.gpu root=../shared/data/mvtec_ad category=bottle

Without a CUDA GPU it says so in one line and exits 0. With one, in this order (each step prints its figure at
once, so a run cut short still leaves the earlier ones):

1. fit + test of PatchCore and Patch AE (``trainer=gpu``, EfficientNet-Lite0, 256 -> 224 px, 10 % coreset,
   seed 0) on the category: train seconds, image / pixel AUROC, AUPRO;
2. exact greedy coreset on the GPU (a 10 % selection) of the PatchCore run's own training patch vectors and
   of 1M synthetic vectors: wall seconds;
3. model-time images/s at batch 1 and 32 of the PatchCore checkpoint on the GPU (torch), beside the same
   checkpoint on CPU with ONNX Runtime (ONNX Runtime here has no GPU provider).

Not covered yet: anomalib's PatchCore on the same card (``make bench-speed`` compares on CPU) and ONNX Runtime
on the GPU; the output says so rather than leaving the rows out silently.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from patchae.benchmarks.cli import project_root, run_command
from patchae.errors import PatchAEError

NO_GPU = "no CUDA GPU visible: bench-gpu has nothing to measure here (it runs where a GPU is lent)"


@dataclass
class GpuBenchConfig:
    """``python -m patchae.benchmarks.gpu key=value ...``"""

    root: str = "data/mvtec_ad"  # MVTec AD layout
    category: str = "bottle"
    models: list[str] = field(default_factory=lambda: ["patchcore", "patch_ae"])
    coreset_vectors: int = 1_000_000  # the synthetic bank of step 2, beside the run's own
    iterations: int = 20  # timed batches per batch size
    folder: str = "outputs/bench_gpu"
    output: str | None = None  # also write the results as JSON


def say(line: str) -> None:
    print(line, flush=True)


def fit_and_test(cfg: GpuBenchConfig, model: str) -> dict[str, Any]:
    run_dir = Path(cfg.folder).resolve() / model
    command = [
        sys.executable,
        str(project_root() / "train.py"),
        f"model={model}",
        "backbone=efficientnet_lite0",
        "trainer=gpu",
        f"data.root={cfg.root}",
        f"category={cfg.category}",
        "seed=0",
        "logger=none",
        f"hydra.run.dir={run_dir}",
    ]
    start = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        last = (finished.stderr.strip().splitlines() or ["no output"])[-1]
        raise PatchAEError(f"{model} did not train on the GPU ({last}); command: {' '.join(command)}")
    results = json.loads((run_dir / "results.json").read_text())
    row = {
        "model": model,
        "wall_seconds": time.perf_counter() - start,
        **{key: results.get(key) for key in ("train_seconds", "image_auroc", "pixel_auroc", "aupro")},
        "ckpt": str(run_dir / "model.ckpt"),
    }
    say(
        f"{model}: train {row['train_seconds']:.1f} s, image / pixel AUROC {100 * row['image_auroc']:.2f} / "
        f"{100 * row['pixel_auroc']:.2f}, AUPRO {100 * row['aupro']:.2f} (whole run {row['wall_seconds']:.0f} s)"
    )
    return row


def time_coreset(vectors: torch.Tensor, name: str) -> dict[str, Any]:
    from patchae.memory import greedy_coreset

    vectors = vectors.cuda()
    torch.cuda.synchronize()
    start = time.perf_counter()
    indices = greedy_coreset(vectors, ratio=0.1, method="greedy")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    say(
        f"coreset on the GPU, {name}: {len(vectors)} vectors -> {len(indices)} in {seconds:.1f} s (exact greedy)"
    )
    return {"bank": name, "vectors": len(vectors), "seconds": seconds}


def model_time(ckpt: str, iterations: int) -> list[dict[str, Any]]:
    from patchae.benchmarks.inference import time_scoring
    from patchae.deploy.loading import load_model
    from patchae.deploy.runtime import OnnxScorer, onnx_file

    rows = []
    model = load_model(ckpt, device="cuda")
    size = int(model.preprocessing.crop_size or model.preprocessing.image_size)
    onnx = OnnxScorer(onnx_file(Path(ckpt)))
    scorers = {
        "torch (GPU)": (lambda x: model(x)[1], "cuda"),
        "ONNX Runtime (CPU)": (lambda x: onnx(x)[1], "cpu"),
    }
    with torch.inference_mode():
        for runtime, (score, device) in scorers.items():
            for batch in (1, 32):
                timing = time_scoring(score, size, batch, iterations, warmup=3, device=device)
                rows.append({"runtime": runtime, **timing})
                say(f"model time, {runtime}, batch {batch}: {timing['images_per_second']:.1f} images/s")
    return rows


def run_benchmark(cfg: GpuBenchConfig) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"gpu": None, "message": NO_GPU}
    from patchae.benchmarks.coreset import synthetic_features

    gpu = torch.cuda.get_device_name(0)
    say(f"GPU: {gpu}, torch {torch.__version__}")
    results: dict[str, Any] = {"gpu": gpu, "runs": [], "coresets": [], "model_time": []}
    for model in cfg.models:
        results["runs"].append(fit_and_test(cfg, model))
    patchcore = next((run for run in results["runs"] if run["model"] == "patchcore"), None)
    if patchcore is not None:
        from patchae.benchmarks.coreset import embed_category

        own = embed_category(cfg.root, cfg.category, "efficientnet_lite0", 1)
        results["coresets"].append(time_coreset(own, f"{cfg.category} training patches"))
    results["coresets"].append(time_coreset(synthetic_features(cfg.coreset_vectors, 128), "synthetic"))
    if patchcore is not None:
        results["model_time"] = model_time(patchcore["ckpt"], cfg.iterations)
    results["not_covered"] = "anomalib's PatchCore on this card; ONNX Runtime on the GPU"
    return results


def format_results(results: dict[str, Any]) -> str:
    if results.get("gpu") is None:
        return results["message"]
    return f"GPU figures above ({results['gpu']}); not covered: {results['not_covered']}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_command("patchae.benchmarks.gpu", __doc__, GpuBenchConfig, run_benchmark, format_results, argv)


if __name__ == "__main__":
    main()
