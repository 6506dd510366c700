"""GPU figures in one prepared run (``make bench-gpu``), printed as they come, for a machine lent for minutes.

    python -m patchae.benchmarks.gpu root=../shared/data/mvtec_ad category=bottle

Without a CUDA GPU it says so in one line and exits 0. With one, in this order (each step prints its figure at
once, so a run cut short still leaves the earlier ones):

1. fit + test of PatchCore and Patch AE (``trainer=gpu``, EfficientNet-Lite0, 256 -> 224 px, 10 % coreset,
   seed 0) on the category: train seconds, image / pixel AUROC, AUPRO;
2. exact greedy coreset on the GPU (a 10 % selection) of the PatchCore run's own training patch vectors and
   of 1M synthetic vectors: wall seconds;
3. model-time images/s at batch 1 and 32 of the PatchCore checkpoint on the GPU: torch, ONNX Runtime on the GPU
   (with onnxruntime-gpu installed; else its row says so) and on CPU, and anomalib 2.7's PatchCore torch model
   on the same card with the same backbone, weights, input size and bank size (its bank rows random: the
   search costs the same; without anomalib its row says how to install it).
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


def model_time(ckpt: str, iterations: int, device: str = "cuda") -> list[dict[str, Any]]:
    """Model-time rows of the checkpoint: torch and ONNX Runtime on ``device``, ONNX Runtime on CPU. A runtime
    this machine lacks gives a row with its reason instead of figures."""
    from patchae.benchmarks.inference import time_scoring
    from patchae.data import ImageTransform
    from patchae.deploy.loading import load_model
    from patchae.deploy.runtime import OnnxScorer, onnx_file

    rows: list[dict[str, Any]] = []
    model = load_model(ckpt, device=device)
    size = ImageTransform.from_preprocessing(model.preprocessing).output_shape
    onnx = onnx_file(Path(ckpt))
    scorers: dict[str, tuple[Any, str]] = {f"torch ({device})": (lambda x: model(x)[1], device)}
    if device != "cpu":
        try:
            on_device = OnnxScorer(onnx, device=device)
            scorers[f"ONNX Runtime ({device})"] = (lambda x: on_device(x)[1], "cpu")  # host inputs, as served
        except PatchAEError as error:
            rows.append({"runtime": f"ONNX Runtime ({device})", "missing": str(error)})
            say(f"model time, ONNX Runtime ({device}): not measured, {error}")
    on_cpu = OnnxScorer(onnx)
    scorers["ONNX Runtime (cpu)"] = (lambda x: on_cpu(x)[1], "cpu")
    with torch.inference_mode():
        for runtime, (score, inputs_on) in scorers.items():
            for batch in (1, 32):
                timing = time_scoring(score, size, batch, iterations, warmup=3, device=inputs_on)
                rows.append({"runtime": runtime, **timing})
                say(f"model time, {runtime}, batch {batch}: {timing['images_per_second']:.1f} images/s")
    hparams = model.hparams
    rows += anomalib_model_time(
        hparams.backbone, list(hparams.layers), model.bank_size, size, iterations, device
    )
    return rows


def anomalib_model_time(
    backbone: str, layers: list[int], bank_size: int, size: tuple[int, int], iterations: int, device: str
) -> list[dict[str, Any]]:
    """anomalib 2.7's PatchCore torch model beside ours on ``device``: our model's ``backbone``, ``layers`` and
    packaged weights, the same input size, and a bank of as many rows (random ones: a nearest-neighbour search
    costs the same whatever the rows hold; its scores are not compared here, ``make bench-speed`` does that)."""
    label = f"anomalib PatchCore, torch ({device})"
    try:
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    except ImportError:
        from patchae.benchmarks.speed import ANOMALIB_HINT

        say(f"model time, {label}: not measured, {ANOMALIB_HINT}")
        return [{"runtime": label, "missing": ANOMALIB_HINT}]
    from patchae.benchmarks.inference import time_scoring
    from patchae.benchmarks.speed import load_packaged_weights

    network = PatchcoreModel(layers=layers, backbone=backbone, pre_trained=False)
    load_packaged_weights(network, backbone)
    with torch.no_grad():
        width = network.train()(torch.zeros(1, 3, *size)).shape[1]  # training mode returns the embedding
    network.memory_bank = torch.randn(bank_size, width, generator=torch.Generator().manual_seed(0))
    network = network.eval().to(device)
    rows = []
    with torch.inference_mode():
        for batch in (1, 32):
            timing = time_scoring(lambda x: network(x).pred_score, size, batch, iterations, 3, device=device)
            rows.append({"runtime": label, "bank_size": bank_size, **timing})
            say(f"model time, {label}, batch {batch}: {timing['images_per_second']:.1f} images/s")
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
    return results


def format_results(results: dict[str, Any]) -> str:
    if results.get("gpu") is None:
        return results["message"]
    missing = [row["runtime"] for row in results.get("model_time", []) if "missing" in row]
    note = f"; not measured here: {', '.join(missing)}" if missing else ""
    return f"GPU figures above ({results['gpu']}){note}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_command("patchae.benchmarks.gpu", __doc__, GpuBenchConfig, run_benchmark, format_results, argv)


if __name__ == "__main__":
    main()
