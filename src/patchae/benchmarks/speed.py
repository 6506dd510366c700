"""Speed against anomalib: patchae's Patch AE and PatchCore beside anomalib's PatchCore on the same machine.

    make bench-speed                                   # installs the bench extra (anomalib), bottle, 10 % coreset
    python -m patchae.benchmarks.speed root=data/mvtec_ad category=bottle coreset_ratio=0.1

Every system runs in a process of its own (``isolate=true``), so each reports its own peak memory, with the
same data, image size (256 -> 224 px), backbone (EfficientNet-Lite0 stages 2 + 3, the ImageNet weights that
ship with pip) and bank size (anomalib's coreset ratio is set so that its bank has as many vectors as
patchae's PatchCore bank; anomalib keeps no held-out images, so it has more to choose from). Measured:

- coreset seconds (the greedy k-center selection alone) and train + bank seconds (fit),
- model-time images/s at batch 1 and 32, with p50/p95 latency per image: a normalised batch in, maps and
  image scores out (``runtimes``: patchae with torch and with ONNX Runtime; anomalib's torch model),
- end-to-end images/s: predict.py (patchae, overlays off) and ``Engine.predict`` (anomalib, visualizer off)
  on the category's test images, from files to scores and maps,
- the test loop's images/s, image and pixel AUROC, and the process's peak resident memory.

The table's last column compares patchae's PatchCore with anomalib's: how many times faster (or smaller in
memory) it is, and the AUROC difference in points. Without anomalib its column says so, with the install hint.
``anomalib_coreset=random`` skips anomalib's slow greedy selection (~20 min for a 10 % bottle bank on 2 cores)
with a random bank of the same size: its speed rows still compare, its coreset, fit and AUROC rows do not.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from patchae.benchmarks.cli import project_root
from patchae.benchmarks.inference import peak_resident_mb, reset_peak_memory, time_scoring
from patchae.errors import PatchAEError

log = logging.getLogger(__name__)

SYSTEMS = ("patch_ae", "patchcore", "anomalib")
LABELS = {"patch_ae": "Patch AE", "patchcore": "PatchCore", "anomalib": "anomalib PatchCore"}
ANOMALIB_HINT = "anomalib is not installed: pip install -e '.[bench]' (or run make bench-speed)"


@dataclass
class SpeedConfig:
    """``python -m patchae.benchmarks.speed key=value ...``"""

    root: str = "data/mvtec_ad"  # MVTec AD layout: <root>/<category>/{train,test,ground_truth}
    category: str = "bottle"
    coreset_ratio: float = 0.1  # patchae's; anomalib's is set to give the same bank size
    # anomalib's bank: its greedy coreset ("exact"), or a seeded random subset of the same size ("random": its
    # greedy selection of a 10 % bank takes ~20 min on 2 cores; inference speed depends only on the bank size)
    anomalib_coreset: str = "exact"
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    runtimes: list[str] = field(default_factory=lambda: ["torch", "onnx"])  # patchae's model-time and predict
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    iterations: int = 5  # timed batches per batch size (after `warmup`)
    warmup: int = 1
    threads: int | None = None  # torch (and ONNX Runtime) CPU threads; null = one per core
    num_workers: int = 2  # image-loading workers of every data loader
    seed: int = 0
    isolate: bool = True  # each system in its own process (its own peak memory)
    output: str | None = None  # default: outputs/speed/<time>
    overrides: list[str] = field(default_factory=list)  # extra train.py settings for the patchae systems
    worker: str | None = None  # internal: run one system and write its JSON to `output`


# -- the patchae systems ----------------------------------------------------------------------------------
def train_config(cfg: SpeedConfig, system: str, run_dir: Path) -> Any:
    from hydra import compose, initialize_config_dir

    overrides = [
        f"model={system}",
        f"data.root={cfg.root}",
        f"category={cfg.category}",
        "backbone=efficientnet_lite0",
        f"bank.coreset_ratio={cfg.coreset_ratio}",
        "bank.faiss_device=cpu",
        f"seed={cfg.seed}",
        f"data.num_workers={cfg.num_workers}",
        "logger=none",
        "~callbacks.progress",
        "callbacks.results.overlays_per_type=0",
        f"paths.output_dir={run_dir}",
        *cfg.overrides,
    ]
    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


class Stopwatch:
    """Wraps a function and adds up the seconds spent in it."""

    def __init__(self, function: Any) -> None:
        self.function, self.seconds = function, 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.function(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AUROC of raw scores (nan without both classes). torchmetrics squashes values outside [0, 1] with a
    sigmoid, which ties large raw distances, so the scores are min-max scaled first (the order is kept)."""
    from torchmetrics.functional.classification import binary_auroc

    scores, labels = scores.flatten().double(), labels.flatten().long()
    if labels.numel() == 0 or labels.min() == labels.max():
        return math.nan
    scaled = (scores - scores.min()) / (scores.max() - scores.min()).clamp_min(1e-12)
    return float(binary_auroc(scaled, labels))


def image_auroc(rows: list[dict[str, Any]]) -> float:
    """Image AUROC of predict.py's rows against their folder labels."""
    labelled = [row for row in rows if row["label"] in ("normal", "anomalous")]
    labels = torch.tensor([row["label"] == "anomalous" for row in labelled], dtype=torch.long)
    return auroc(torch.tensor([row["score"] for row in labelled]), labels)


def run_patchae(cfg: SpeedConfig, system: str, workdir: Path) -> dict[str, Any]:
    from patchae import callbacks
    from patchae.deploy.loading import load_model
    from patchae.deploy.predict import predict_to_folder
    from patchae.deploy.runtime import OnnxScorer, onnx_file
    from patchae.train import fit_and_test

    train_cfg = train_config(cfg, system, workdir / system)
    coreset = Stopwatch(callbacks.greedy_coreset)
    callbacks.greedy_coreset = coreset
    try:
        results = fit_and_test(train_cfg)
    finally:
        callbacks.greedy_coreset = coreset.function
    fit_test_peak = peak_resident_mb()
    ckpt = Path(train_cfg.paths.output_dir) / "model.ckpt"
    model = load_model(ckpt, device="cpu", faiss_device="cpu")
    size = int(model.preprocessing.crop_size or model.preprocessing.image_size)
    row: dict[str, Any] = {
        "system": system,
        "bank_size": model.bank_size,
        "coreset_seconds": coreset.seconds,
        "fit_seconds": results["train_seconds"],
        "test_images_per_second": results.get("test_images_per_second"),
        "image_auroc": results.get("image_auroc"),
        "pixel_auroc": results.get("pixel_auroc"),
        "peak_fit_test_mb": fit_test_peak,
        "runtimes": {},
    }
    for runtime in cfg.runtimes:
        reset_peak_memory()  # each runtime's peak: what is held (model, bank) plus its own working memory
        with torch.inference_mode():
            if runtime == "onnx":
                scorer = OnnxScorer(onnx_file(ckpt), cfg.threads)
            else:
                scorer = model
            timings = [
                time_scoring(lambda x, s=scorer: s(x)[1], size, batch, cfg.iterations, cfg.warmup)
                for batch in cfg.batch_sizes
            ]
        predict_dir = workdir / f"{system}_predict_{runtime}"
        summary = predict_to_folder(
            ckpt,
            Path(cfg.root) / cfg.category,
            predict_dir,
            device="cpu",
            num_workers=cfg.num_workers,
            overlays=False,
            show_progress=False,
            runtime=runtime,
        )
        rows = json.loads((predict_dir / "predictions.json").read_text())
        row["runtimes"][runtime] = {
            "model_time": timings,
            "end_to_end_images_per_second": summary["images_per_second"],
            "end_to_end_images": summary["images"],
            "predict_image_auroc": image_auroc(rows),
            "peak_memory_mb": peak_resident_mb(),
        }
    row["input_size"] = size
    return row


# -- anomalib ---------------------------------------------------------------------------------------------
def anomalib_reference(cfg: SpeedConfig, bank_size: int | None, workdir: Path) -> dict[str, Any]:
    """What anomalib must match: data, preprocessing, backbone and the bank size of patchae's PatchCore."""
    train_cfg = train_config(cfg, "patchcore", workdir / "reference")
    return {
        "root": str(train_cfg.data.root),
        "category": str(train_cfg.category),
        "image_size": int(train_cfg.data.image_size),
        "crop_size": train_cfg.data.crop_size and int(train_cfg.data.crop_size),
        "mean": list(train_cfg.data.mean),
        "std": list(train_cfg.data.std),
        "backbone": str(train_cfg.backbone.name),
        "layers": list(train_cfg.backbone.layers),
        "bank_size": bank_size,
        "coreset_ratio": cfg.coreset_ratio,
    }


def run_anomalib(cfg: SpeedConfig, reference: dict[str, Any], workdir: Path) -> dict[str, Any]:
    try:
        from anomalib.data import MVTecAD
        from anomalib.engine import Engine
        from anomalib.models import Patchcore
        from anomalib.models.components import KCenterGreedy
        from anomalib.pre_processing import PreProcessor
    except ImportError:
        return {"system": "anomalib", "missing": ANOMALIB_HINT}
    from torchvision.transforms.v2 import CenterCrop, Compose, Normalize, Resize

    from patchae.data import IMAGE_EXTENSIONS

    category = Path(reference["root"]) / reference["category"]
    train_images = sum(
        1 for p in (category / "train" / "good").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
    )
    size = reference["crop_size"] or reference["image_size"]
    patches = train_images * (size // 8) ** 2  # stride-8 grid of stage 2
    ratio = reference["coreset_ratio"]
    if reference["bank_size"]:
        ratio = (reference["bank_size"] + 0.5) / patches  # anomalib keeps int(patches * ratio)
    steps = [Resize((reference["image_size"],) * 2, antialias=True)]
    if reference["crop_size"]:
        steps.append(CenterCrop((size, size)))
    steps.append(Normalize(reference["mean"], reference["std"]))
    model = Patchcore(
        backbone=reference["backbone"],
        layers=reference["layers"],
        pre_trained=False,
        coreset_sampling_ratio=ratio,
        pre_processor=PreProcessor(transform=Compose(steps)),
        # Raw scores, as patchae's: anomalib's post-processor normalises with statistics of a validation pass,
        # which the timed fit leaves out (validation off); AUROC is computed here from the predictions.
        post_processor=False,
        evaluator=False,
        visualizer=False,
    )
    weights_note = load_packaged_weights(model.model, reference["backbone"])
    datamodule = MVTecAD(
        root=reference["root"],
        category=reference["category"],
        train_batch_size=32,
        eval_batch_size=32,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
    )
    # Validation off (limit_val_batches=0): the fit is embedding and coreset, as patchae's PatchCore fit.
    engine = Engine(
        accelerator="cpu",
        devices=1,
        logger=False,
        default_root_dir=workdir / "anomalib",
        enable_progress_bar=False,
        limit_val_batches=0,
    )
    original = KCenterGreedy.sample_coreset
    coreset = Stopwatch(random_coreset(cfg.seed) if cfg.anomalib_coreset == "random" else original)
    KCenterGreedy.sample_coreset = lambda self, *args, **kwargs: coreset(self, *args, **kwargs)
    try:
        start = time.perf_counter()
        engine.fit(model=model, datamodule=datamodule)
        fit_seconds = time.perf_counter() - start
    finally:
        KCenterGreedy.sample_coreset = original
    start = time.perf_counter()
    engine.test(model=model, datamodule=datamodule, verbose=False)
    test_seconds = time.perf_counter() - start
    fit_test_peak = peak_resident_mb()
    reset_peak_memory()
    test_images = len(datamodule.test_data)
    network = model.model.eval()
    with torch.inference_mode():
        timings = [
            time_scoring(lambda x: network(x).pred_score, size, batch, cfg.iterations, cfg.warmup)
            for batch in cfg.batch_sizes
        ]
    # End to end: files of the test split to scores and maps (the data module's predict loader is its test set).
    start = time.perf_counter()
    predictions = engine.predict(model=model, datamodule=datamodule, return_predictions=True)
    predict_seconds = time.perf_counter() - start
    predicted = sum(len(batch.pred_score) for batch in predictions)
    scores = torch.cat([batch.pred_score.flatten() for batch in predictions])
    labels = torch.cat([batch.gt_label.flatten() for batch in predictions])
    maps = torch.cat([batch.anomaly_map.flatten() for batch in predictions])
    masks = torch.cat([batch.gt_mask.flatten() for batch in predictions])
    return {
        "system": "anomalib",
        "bank_size": int(model.model.memory_bank.shape[0]),
        "train_images": train_images,
        "weights": weights_note,
        # A random bank's selection and fit times are not anomalib's: left out of the table.
        "coreset_seconds": coreset.seconds if cfg.anomalib_coreset == "exact" else None,
        "fit_seconds": fit_seconds if cfg.anomalib_coreset == "exact" else None,
        "coreset": cfg.anomalib_coreset,
        "test_images_per_second": test_images / test_seconds,
        "image_auroc": auroc(scores, labels),
        "pixel_auroc": auroc(maps, masks),
        "runtimes": {
            "torch": {
                "model_time": timings,
                "end_to_end_images_per_second": predicted / predict_seconds,
                "end_to_end_images": predicted,
                "peak_memory_mb": peak_resident_mb(),
            }
        },
        "peak_fit_test_mb": fit_test_peak,
        "input_size": size,
    }


def load_packaged_weights(network: Any, backbone: str) -> str:
    """Our packaged ImageNet weights of ``backbone`` into anomalib's PatchCore torch model ``network`` (anomalib
    would download them); returns what its backbone now holds."""
    from patchae.models.backbone import packaged_weights_file

    weights = packaged_weights_file(backbone)
    if weights is None:
        return "random weights (no packaged weights for this backbone)"
    missing, _ = network.feature_extractor.feature_extractor.load_state_dict(
        torch.load(weights, map_location="cpu", weights_only=True), strict=False
    )
    if missing:
        raise PatchAEError(f"anomalib's {backbone} lacks weights for {missing[:3]}")
    return "the same packaged ImageNet weights"


def random_coreset(seed: int) -> Any:
    """A stand-in for anomalib's ``KCenterGreedy.sample_coreset``: a seeded random subset of the same size."""

    def sample(sampler: Any) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randperm(sampler.embedding.shape[0], generator=generator)[: sampler.coreset_size]
        return sampler.embedding[rows.sort().values]

    return sample


# -- running ----------------------------------------------------------------------------------------------
def run_system(
    cfg: SpeedConfig, system: str, workdir: Path, reference: dict[str, Any] | None
) -> dict[str, Any]:
    """One system, in this process; its peak memory is this process's."""
    if cfg.threads is not None:
        from patchae.deploy.loading import set_threads

        set_threads(cfg.threads)
    if system == "anomalib":
        row = run_anomalib(cfg, reference or anomalib_reference(cfg, None, workdir), workdir)
    else:
        row = run_patchae(cfg, system, workdir)
    if "missing" not in row:
        # The phases reset the peak to measure their own; the whole process's is the largest of them.
        phases = [row.get("peak_fit_test_mb")] + [r.get("peak_memory_mb") for r in row["runtimes"].values()]
        row["peak_memory_mb"] = max([peak_resident_mb(), *(p for p in phases if p is not None)])
        row["torch_threads"] = torch.get_num_threads()
    return row


def run_isolated(
    cfg: SpeedConfig, system: str, workdir: Path, reference: dict[str, Any] | None
) -> dict[str, Any]:
    """One system in a fresh Python process (same interpreter), so that peak memories do not mix."""
    result = workdir / f"{system}.json"
    worker_cfg = OmegaConf.structured(cfg)
    worker_cfg.worker, worker_cfg.output = system, str(result)
    (workdir / f"{system}.config.yaml").write_text(OmegaConf.to_yaml(worker_cfg))
    if reference is not None:
        (workdir / "reference.json").write_text(json.dumps(reference))
    command = [
        sys.executable,
        "-m",
        "patchae.benchmarks.speed",
        f"--config={workdir / f'{system}.config.yaml'}",
    ]
    completed = subprocess.run(command)
    if completed.returncode != 0 or not result.is_file():
        return {"system": system, "failed": f"exit status {completed.returncode}; see its output above"}
    return json.loads(result.read_text())


def run_benchmark(cfg: SpeedConfig) -> dict[str, Any]:
    unknown = [system for system in cfg.systems if system not in SYSTEMS]
    if unknown:
        raise PatchAEError(f"systems={unknown} are unknown; use some of {', '.join(SYSTEMS)}")
    for runtime in cfg.runtimes:
        if runtime not in ("torch", "onnx"):
            raise PatchAEError(f"runtimes: {runtime} is unknown; use torch and/or onnx")
    if cfg.anomalib_coreset not in ("exact", "random"):
        raise PatchAEError(f"anomalib_coreset={cfg.anomalib_coreset!r} is unknown; use exact or random")
    if not (Path(cfg.root) / cfg.category).is_dir() and not cfg.overrides:
        raise PatchAEError(
            f"category folder {Path(cfg.root) / cfg.category} not found; pass root=<MVTec AD root> category=<name>"
        )
    cfg.root = str(Path(cfg.root).expanduser().resolve())  # the same data whatever a worker's directory
    output = Path(cfg.output or f"outputs/speed/{time.strftime('%Y-%m-%d_%H-%M-%S')}").resolve()
    output.mkdir(parents=True, exist_ok=True)
    runner = run_isolated if cfg.isolate else run_system
    rows: dict[str, dict[str, Any]] = {}
    # patchae first: anomalib's coreset ratio is chosen to match patchae's PatchCore bank size.
    for system in [s for s in SYSTEMS if s in cfg.systems]:
        reference = None
        if system == "anomalib":
            bank = rows.get("patchcore", rows.get("patch_ae", {})).get("bank_size")
            reference = anomalib_reference(cfg, bank, output)
        log.info("speed benchmark: %s", LABELS[system])
        rows[system] = runner(cfg, system, output, reference)
    results = {"config": asdict(cfg) | {"output": str(output)}, "machine": machine(), "systems": rows}
    (output / "speed.json").write_text(json.dumps(results, indent=2, default=str))
    (output / "speed.md").write_text(format_table(results) + "\n")
    return results


def machine() -> dict[str, Any]:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "gpu": None}


# -- the table --------------------------------------------------------------------------------------------
def _model_time(row: dict[str, Any], runtime: str, batch: int) -> dict[str, float] | None:
    timings = row.get("runtimes", {}).get(runtime, {}).get("model_time", [])
    return next((t for t in timings if t["batch_size"] == batch), None)


def metric_rows(results: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(label, kind, getter) of every table row; kind: time (lower is better), rate (higher), memory, score."""
    cfg = results["config"]
    rows: list[tuple[str, str, Any]] = [
        ("bank vectors", "count", lambda r: r.get("bank_size")),
        ("coreset s", "time", lambda r: r.get("coreset_seconds")),
        ("train + bank s", "time", lambda r: r.get("fit_seconds")),
    ]
    for runtime in cfg["runtimes"]:
        for batch in cfg["batch_sizes"]:

            def rate(r: dict[str, Any], runtime: str = runtime, batch: int = batch) -> Any:
                timing = _model_time(r, runtime, batch)
                return timing and timing["images_per_second"]

            def latency(r: dict[str, Any], runtime: str = runtime, batch: int = batch) -> Any:
                timing = _model_time(r, runtime, batch)
                return timing and (timing["latency_per_image_ms_p50"], timing["latency_per_image_ms_p95"])

            rows.append((f"model-time images/s, batch {batch} ({runtime})", "rate", rate))
            rows.append((f"ms/image p50 / p95, batch {batch} ({runtime})", "latency", latency))
        rows.append(
            (
                f"end-to-end images/s, predict ({runtime})",
                "rate",
                lambda r, runtime=runtime: (
                    r.get("runtimes", {}).get(runtime, {}).get("end_to_end_images_per_second")
                ),
            )
        )
    rows += [
        ("test loop images/s", "rate", lambda r: r.get("test_images_per_second")),
        ("image AUROC %", "score", lambda r: r.get("image_auroc")),
        ("pixel AUROC %", "score", lambda r: r.get("pixel_auroc")),
        ("peak memory MB, fit + test", "memory", lambda r: r.get("peak_fit_test_mb")),
    ]
    for runtime in cfg["runtimes"]:
        rows.append(
            (
                f"peak memory MB, model time + predict ({runtime})",
                "memory",
                lambda r, runtime=runtime: r.get("runtimes", {}).get(runtime, {}).get("peak_memory_mb"),
            )
        )
    rows.append(("peak memory MB, whole process", "memory", lambda r: r.get("peak_memory_mb")))
    return rows


def ratio(kind: str, ours: Any, theirs: Any) -> str:
    """PatchCore against anomalib: x times faster / smaller (> 1: patchae better), or AUROC points apart."""
    if not _is_number(ours) or not _is_number(theirs):
        return ""
    if kind == "rate" and theirs > 0:
        return f"{ours / theirs:.2f}x"
    if kind in ("time", "memory") and ours > 0:
        return f"{theirs / ours:.2f}x"
    if kind == "score":
        return f"{100 * (ours - theirs):+.2f} pt"
    return ""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def cell(kind: str, value: Any) -> str:
    if kind == "latency" and value:
        return f"{value[0]:.1f} / {value[1]:.1f}"
    if not _is_number(value):
        return "–"
    if kind == "score":
        return f"{100 * value:.2f}"
    if kind == "count":
        return f"{int(value)}"
    return f"{value:.1f}" if kind != "rate" or value >= 1 else f"{value:.2f}"


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table: one column per system, then PatchCore against anomalib."""
    systems = results["systems"]
    names = [name for name in SYSTEMS if name in systems]
    compare = "patchcore" in systems and "anomalib" in systems
    header = ["", *(LABELS[name] for name in names)] + (["PatchCore vs anomalib"] if compare else [])
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for label, kind, get in metric_rows(results):
        values = []
        for name in names:
            row = systems[name]
            if "missing" in row or "failed" in row:
                values.append("missing" if "missing" in row else "failed")
                continue
            values.append(cell(kind, get(row)))
        if compare:
            ours, theirs = systems["patchcore"], systems["anomalib"]
            ours_value = get(ours) if "runtimes" in ours else None
            theirs_value = get(theirs) if "runtimes" in theirs else None
            if theirs_value is None and "runtimes" in theirs and "(onnx)" in label:
                theirs_value = get_torch_counterpart(label, kind, theirs, results)
            values.append(ratio(kind, ours_value, theirs_value))
        lines.append("| " + " | ".join([label, *values]) + " |")
    machine, cfg = results["machine"], results["config"]
    lines.append("")
    lines.append(
        f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
        f"{cfg['category']}, coreset ratio {cfg['coreset_ratio']}, seed {cfg['seed']}; "
        "ratio: x faster (or x less memory) than anomalib, AUROC in points; onnx rows compare with anomalib's torch"
    )
    for name in names:
        row = systems[name]
        if "missing" in row or "failed" in row:
            lines.append(f"{LABELS[name]}: {row.get('missing') or row.get('failed')}")
        elif row.get("weights"):
            lines.append(f"{LABELS[name]}: backbone with {row['weights']}")
        if row.get("coreset") == "random":
            lines.append(
                f"{LABELS[name]}: bank = a random subset of the same size (anomalib_coreset=random); its coreset "
                "and fit times are not measured and its AUROC is not anomalib's"
            )
    return "\n".join(lines)


def get_torch_counterpart(label: str, kind: str, row: dict[str, Any], results: dict[str, Any]) -> Any:
    """anomalib's value for the torch version of an onnx row (anomalib runs torch only)."""
    torch_label = label.replace("(onnx)", "(torch)")
    getter = next((get for name, _, get in metric_rows(results) if name == torch_label), None)
    return getter(row) if getter else None


# -- command line -----------------------------------------------------------------------------------------
def parse(args: list[str]) -> SpeedConfig:
    base = OmegaConf.structured(SpeedConfig)
    try:
        files = [OmegaConf.load(arg.split("=", 1)[1]) for arg in args if arg.startswith("--config=")]
        cfg = OmegaConf.merge(
            base, *files, OmegaConf.from_dotlist([a for a in args if not a.startswith("--")])
        )
    except Exception as error:  # omegaconf's errors for unknown keys and wrong types
        raise PatchAEError(
            f"bad argument ({str(error).splitlines()[0]}); use key=value with keys of: "
            "python -m patchae.benchmarks.speed --help"
        ) from None
    return OmegaConf.to_object(cfg)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in args):
        print(__doc__)
        print(OmegaConf.to_yaml(OmegaConf.structured(SpeedConfig)))
        sys.exit(0)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = parse(args)
        if cfg.worker is not None:  # one system, its result as JSON (see run_isolated)
            workdir = Path(cfg.output).parent
            reference_file = workdir / "reference.json"
            reference = json.loads(reference_file.read_text()) if reference_file.is_file() else None
            row = run_system(cfg, cfg.worker, workdir, reference)
            Path(cfg.output).write_text(json.dumps(row, indent=2, default=str))
            return row
        results = run_benchmark(cfg)
    except PatchAEError as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        sys.exit(1)
    print(format_table(results))
    print(f"\nresults in {results['config']['output']} (speed.md, speed.json)")
    return results


if __name__ == "__main__":
    main()
