"""Screening new images with a trained checkpoint: scores, decisions, anomaly maps, overlays and summaries.

``python predict.py ckpt=<model.ckpt> input=<image | folder | 'glob' | -> [output=<dir>]`` (see
conf/predict.yaml). The checkpoint holds everything needed (weights, memory bank, preprocessing, the
calibrated threshold), so no training data is read.

Preprocessing is the one the model was tested with (resize to ``image_size``, squashed or keeping the aspect
ratio and padded, centre crop to ``crop_size``, normalise), so scores are comparable with the calibrated
threshold. The anomaly map is brought back to the image's original size (padding dropped); with a centre crop,
the cropped-away border was never scored and is filled with the map's minimum (it shows as "least anomalous",
it is not evidence of normality).

One unreadable file never stops a run: it is reported (console, ``predictions.csv``, ``summary.json``) and
the other images are processed.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image, ImageDraw, ImageFont

from patchae.callbacks import progress_bar, write_csv
from patchae.data import ImageTransform, load_rgb
from patchae.deploy.inputs import as_rgb, find_images, folder_label, stdin_paths
from patchae.deploy.loading import load_model, pick_thresholds, resolve_device, set_threads
from patchae.deploy.runtime import OnnxScorer, check_runtime, onnx_file
from patchae.errors import PatchAEError, finite_number
from patchae.models import AnomalyModule
from patchae.thresholds import Thresholds
from patchae.visualize import heatmap

log = logging.getLogger(__name__)

_END = object()  # marks the end of the paths in Predictor.predict_paths


# -- prediction -------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """The result for one image. ``anomaly_map`` is the normalised map (0.5 = threshold) at the image's
    original size; ``error`` is set (and the rest empty) when the image could not be read."""

    path: str
    score: float = math.nan
    normalized_score: float = math.nan
    anomalous: bool | None = None
    label: int | None = None
    height: int = 0
    width: int = 0
    anomaly_map: np.ndarray | None = field(default=None, repr=False)
    image: np.ndarray | None = field(default=None, repr=False)  # the RGB input, kept for overlays
    error: str | None = None

    @property
    def decision(self) -> str:
        if self.error is not None:
            return "error"
        return "anomalous" if self.anomalous else "normal"

    @property
    def correct(self) -> bool | None:
        if self.error is not None or self.label is None:
            return None
        return bool(self.anomalous) == bool(self.label)

    def row(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "score": self.score,
            "normalized_score": self.normalized_score,
            "decision": self.decision,
            "label": {0: "normal", 1: "anomalous", None: ""}[self.label],
            "correct": "" if self.correct is None else int(self.correct),
            "height": self.height,
            "width": self.width,
            "error": self.error or "",
        }


@dataclass
class LoadedImage:
    path: str
    tensor: torch.Tensor | None = None  # normalised (3, H, W) model input
    size: tuple[int, int] = (0, 0)  # original (height, width)
    pixels: np.ndarray | None = None  # original RGB, when overlays are wanted
    error: str | None = None
    from_file: bool = False  # only files have folder labels; in-memory images are named image_<i>


class Predictor:
    """Batched inference with one trained model.

    ``predict(images)`` scores in-memory images; ``predict_paths(paths)`` streams files (any iterable,
    e.g. a growing folder or stdin), loading the next batch in ``num_workers`` threads while the current
    one is scored. Unreadable files come back as predictions with ``error`` set.
    """

    def __init__(
        self,
        model: AnomalyModule,
        thresholds: Thresholds | None = None,
        batch_size: int = 32,
        num_workers: int = 2,
        keep_images: bool = False,
        scorer: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise PatchAEError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise PatchAEError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        self.model = model.eval()
        self.thresholds = pick_thresholds(thresholds if thresholds is not None else model.thresholds)
        self.transform = ImageTransform.from_preprocessing(model.preprocessing)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.keep_images = keep_images
        self.scorer = scorer  # scores batches instead of the torch model (runtime=onnx)
        self.runtime = "torch" if scorer is None else "onnx"

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: str | Path,
        device: str = "auto",
        threshold: float | None = None,
        threshold_method: str | None = None,
        threshold_quantile: float | None = None,
        search: str | None = None,
        faiss_index: str | None = None,
        search_memory_mb: float | None = None,
        runtime: str = "torch",
        **kwargs: Any,
    ) -> Predictor:
        if check_runtime(runtime) == "onnx":
            if device not in ("auto", "cpu"):
                raise PatchAEError(
                    f"runtime=onnx runs on the CPU; use device=cpu (or runtime=torch for {device})"
                )
            device = "cpu"
        torch_device = resolve_device(device)
        overrides = {"search": search, "faiss_index": faiss_index}
        if torch_device.type == "cpu":
            overrides["faiss_device"] = "cpu"
        model = load_model(ckpt, device=str(torch_device), **overrides)
        if search_memory_mb is not None:
            # The torch search's working memory; a model without a bank has no search to bound.
            model.model.scorer.search_block_mb = finite_number("search_memory_mb", search_memory_mb)
        thresholds = pick_thresholds(
            model.thresholds, threshold, threshold_method, threshold_quantile, f"checkpoint {ckpt}"
        )
        if runtime == "onnx":
            kwargs["scorer"] = OnnxScorer(onnx_file(ckpt))
        return cls(model, thresholds, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- loading ------------------------------------------------------------------------------------------
    def prepare(self, image: Image.Image, path: str) -> LoadedImage:
        tensor = self.transform.image(image)
        pixels = np.asarray(image) if self.keep_images else None
        return LoadedImage(path, tensor, (image.height, image.width), pixels)

    def load(self, path: str | Path) -> LoadedImage:
        """Read and preprocess one file; a file that cannot be read gives an error record, not an exception."""
        try:
            return replace(self.prepare(load_rgb(path), str(path)), from_file=True)
        except PatchAEError as error:
            return LoadedImage(str(path), error=str(error))
        except Exception as error:  # a decoder failing in an unexpected way must not stop the other images
            return LoadedImage(
                str(path),
                error=f"cannot read image {path}: {type(error).__name__}: {error}; replace or remove the file",
            )

    # -- scoring ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw maps (B, H, W) and image scores (B,) of a normalised (B, 3, H, W) batch."""
        if self.scorer is not None:
            return self.scorer(batch)
        return self.model(batch.to(self.device, non_blocking=True))

    def to_original_size(self, anomaly_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """A model-input map on the original (H, W) image: undo the centre crop, the padding, then the resize.

        The cropped-away border has no score; it takes the map's minimum.
        """
        return self.transform.restore_map(anomaly_map, size)

    def predict_loaded(self, loaded: Sequence[LoadedImage]) -> list[Prediction]:
        """Score images already read and prepared (:meth:`prepare`, :meth:`load`) as one batch: the one place
        raw scores become decisions, normalised scores and maps at the original size (predict.py and serve.py)."""
        ready = [position for position, item in enumerate(loaded) if item.error is None]
        results = [Prediction(item.path, error=item.error) for item in loaded]
        if ready:
            maps, scores = self.score(torch.stack([loaded[position].tensor for position in ready]))
            normalized = self.thresholds.normalize(scores.double().cpu())
            for i, position in enumerate(ready):
                item = loaded[position]
                full = self.thresholds.normalize(self.to_original_size(maps[i].float(), item.size).double())
                results[position] = Prediction(
                    path=item.path,
                    score=float(scores[i]),
                    normalized_score=float(normalized[i]),
                    anomalous=bool(self.thresholds.is_anomalous(scores[i].double().cpu())),
                    label=folder_label(Path(item.path)) if item.from_file else None,
                    height=item.size[0],
                    width=item.size[1],
                    anomaly_map=full.float().cpu().numpy(),
                    image=item.pixels,
                )
        return results

    def predict(
        self, images: Sequence[Image.Image | np.ndarray], names: Sequence[str] | None = None
    ) -> list[Prediction]:
        """Score in-memory images (PIL images of any mode, or arrays as :func:`as_rgb` takes), in batches."""
        names = list(names) if names is not None else [f"image_{i}" for i in range(len(images))]
        predictions: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(images)))
            predictions += self.predict_loaded([self.prepare(as_rgb(images[i]), names[i]) for i in chunk])
        return predictions

    def predict_paths(self, paths: Iterable[str | Path]) -> Iterator[Prediction]:
        """Score image files in order, the next ones loading (up to two batches ahead) while one is scored.

        A list is scored in full batches. A stream (stdin, a generator) is scored in batches of whatever has
        arrived, so no result waits for paths that have not come yet.
        """
        full_batches = isinstance(paths, Sequence)
        loads: queue.Queue[Any] = queue.Queue(maxsize=2 * self.batch_size)  # bounds the images held in memory
        with ThreadPoolExecutor(max_workers=max(1, self.num_workers)) as pool:

            def read() -> None:
                try:
                    for path in paths:
                        loads.put(pool.submit(self.load, path))
                except BaseException as error:  # e.g. stdin that is not text: re-raised below
                    loads.put(error)
                loads.put(_END)

            threading.Thread(target=read, daemon=True).start()
            ended = False
            while not ended:
                batch = [loads.get()]
                while len(batch) < self.batch_size and batch[-1] is not _END:
                    try:
                        batch.append(loads.get() if full_batches else loads.get_nowait())
                    except queue.Empty:
                        break
                if batch[-1] is _END:
                    ended = True
                    batch.pop()
                for item in batch:
                    if isinstance(item, BaseException):
                        raise item
                if batch:
                    yield from self.predict_loaded([future.result() for future in batch])


# -- writing results --------------------------------------------------------------------------------------
def overlay_image(prediction: Prediction) -> Image.Image:
    """The image and its normalised map blended over it, side by side, with the decision written on top.

    The colour scale is fixed (0 blue .. 0.5 = threshold .. 1 red), so overlays of different images compare.
    """
    image = prediction.image
    blended = (0.5 * image + 0.5 * heatmap(prediction.anomaly_map)).astype(np.uint8)
    canvas = Image.fromarray(np.concatenate([image, blended], axis=1))
    draw = ImageDraw.Draw(canvas)
    text = f"{prediction.decision.upper()}  score {prediction.normalized_score:.2f}"
    colour = (255, 40, 40) if prediction.anomalous else (40, 220, 40)
    font = ImageFont.load_default(size=max(10, image.shape[0] // 24))  # readable on large images too
    left, top, right, bottom = draw.textbbox((4, 2), text, font=font)
    draw.rectangle((0, 0, right + 4, bottom + 3), fill=(0, 0, 0))
    draw.text((4, 2), text, fill=colour, font=font)
    return canvas


class OutputNames:
    """Flat, unique file names for per-image outputs: the path relative to the input folder ('/' -> '__'),
    or, for globs and streams, as many trailing folder names as it takes to be unique."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.used: set[str] = set()

    def __call__(self, path: Path) -> str:
        parts = path.resolve().with_suffix("").parts
        if self.root is not None and path.resolve().is_relative_to(self.root):
            parts = path.resolve().relative_to(self.root).with_suffix("").parts
            candidates = ["__".join(parts)]
        else:
            candidates = ["__".join(parts[-n:]) for n in range(1, len(parts) + 1)]
        name = next((c for c in candidates if c not in self.used), None)
        counter = 1
        while name is None or name in self.used:
            name, counter = f"{candidates[0]}_{counter}", counter + 1
        self.used.add(name)
        return name


def predict_to_folder(
    ckpt: str | Path,
    input: str | Path,
    output: str | Path,
    device: str = "auto",
    batch_size: int = 32,
    num_workers: int = 2,
    overlays: bool = True,
    save_maps: bool = False,
    threshold: float | None = None,
    threshold_method: str | None = None,
    threshold_quantile: float | None = None,
    search: str | None = None,
    faiss_index: str | None = None,
    search_memory_mb: float | None = None,
    show_progress: bool = True,
    threads: int | None = None,
    runtime: str = "torch",
) -> dict[str, Any]:
    """Predict every image ``input`` names and write, under ``output``: ``predictions.csv`` (one row per
    image), ``predictions.json`` (the same), ``summary.json``, ``overlays/<name>.png`` and, with
    ``save_maps``, ``maps/<name>.npy`` (normalised map at original size). Returns the summary."""
    if threads is not None:
        set_threads(threads)
    output = Path(output).expanduser()
    streaming = str(input) == "-"
    paths: Iterable[Path] = stdin_paths() if streaming else find_images(input)
    root = None if streaming else Path(input).expanduser().resolve()
    root = root if root is not None and root.is_dir() else None
    if (
        root is not None
        and (root / "test").is_dir()
        and all(p.resolve().is_relative_to(root / "test") for p in paths)
    ):
        root = root / "test"  # a category folder: name outputs as for its test/ folder
    names = OutputNames(root)
    predictor = Predictor.from_checkpoint(
        ckpt,
        device,
        threshold,
        threshold_method,
        threshold_quantile,
        search,
        faiss_index,
        search_memory_mb,
        batch_size=batch_size,
        num_workers=num_workers,
        keep_images=overlays,
        runtime=runtime,
    )
    output.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    started = time.perf_counter()
    total = None if streaming else len(paths)  # type: ignore[arg-type]
    with ThreadPoolExecutor(max_workers=2) as writers, _maybe_progress(show_progress) as progress:
        task = progress.add_task("predicting", total=total) if progress else None
        writes: deque[Future[None]] = deque()
        for prediction in predictor.predict_paths(paths):
            rows.append(prediction.row())
            if prediction.error is not None:
                errors.append({"path": prediction.path, "error": prediction.error})
                log.warning("skipped: %s", prediction.error)
            elif overlays or save_maps:
                name = names(Path(prediction.path))
                overlay = output / "overlays" / f"{name}.png" if overlays else None
                anomaly_map = output / "maps" / f"{name}.npy" if save_maps else None
                writes.append(writers.submit(_save_outputs, prediction, overlay, anomaly_map))
                while len(writes) > 2 * predictor.batch_size:  # bound the images waiting to be written
                    writes.popleft().result()
            if progress:
                progress.advance(task)
        for write in writes:
            write.result()
    if not rows:  # only a stream can be empty: find_images() refuses an input without images
        raise PatchAEError(
            "no image paths came on stdin; pipe one path per line, e.g. find dir -name '*.png' | python predict.py ... input=-"
        )
    seconds = time.perf_counter() - started
    summary = summarize(rows, errors, predictor, ckpt, input, output, seconds)
    write_csv(output / "predictions.csv", rows, fields=list(Prediction("").row()))
    (output / "predictions.json").write_text(json.dumps(rows, indent=1))
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    if summary["predicted"] == 0:
        raise PatchAEError(
            f"none of the {len(rows)} input image(s) could be read (see {output / 'summary.json'}); first: {errors[0]['error']}"
        )
    return summary


def _save_outputs(prediction: Prediction, overlay: Path | None, anomaly_map: Path | None) -> None:
    """Write an image's overlay PNG and/or its map (.npy); a failed write is a one-line error."""
    for path in (overlay, anomaly_map):
        if path is None:
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path == overlay:  # compress_level 1: 2x faster than the default, files ~5 % larger
                overlay_image(prediction).save(path, compress_level=1)
            else:
                np.save(path, prediction.anomaly_map)
        except OSError as error:
            raise PatchAEError(
                f"cannot write {path} ({error.strerror or error}); check that output= has free space and write permission"
            ) from None


class _NoProgress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: Any) -> None:
        return None


def _maybe_progress(show: bool) -> Any:
    return progress_bar() if show else _NoProgress()


def summarize(
    rows: list[dict[str, Any]],
    errors: list[dict[str, str]],
    predictor: Predictor,
    ckpt: str | Path,
    input: str | Path,
    output: Path,
    seconds: float,
) -> dict[str, Any]:
    predicted = [row for row in rows if row["decision"] != "error"]
    labelled = [row for row in predicted if row["label"]]
    hparams = predictor.model.hparams
    thresholds = predictor.thresholds
    return {
        "checkpoint": str(ckpt),
        "input": str(input),
        "output": str(output),
        "model": type(predictor.model).__name__,
        "backbone": hparams.get("backbone"),
        "device": str(predictor.device),
        "runtime": predictor.runtime,
        "images": len(rows),
        "predicted": len(predicted),
        "anomalous": sum(row["decision"] == "anomalous" for row in predicted),
        "normal": sum(row["decision"] == "normal" for row in predicted),
        "errors": errors,
        "labelled": len(labelled),
        "accuracy": sum(int(row["correct"]) for row in labelled) / len(labelled) if labelled else None,
        "threshold": {
            "method": thresholds.method,
            "value": thresholds.value,
            "f1": thresholds.f1,
            "quantile": thresholds.quantile,
            "q": thresholds.q,
            "normalization_scale": thresholds.scale,
        },
        "seconds": seconds,
        "images_per_second": len(rows) / max(seconds, 1e-9),
    }


def report(summary: dict[str, Any]) -> str:
    """The few lines a person reads after a run."""
    lines = [
        f"predicted {summary['predicted']} of {summary['images']} image(s): {summary['anomalous']} anomalous, "
        f"{summary['normal']} normal ({summary['images_per_second']:.1f} images/s on {summary['device']}; "
        f"threshold {summary['threshold']['method']} = {summary['threshold']['value']:.4g})"
    ]
    if summary["accuracy"] is not None:
        lines.append(
            f"accuracy against the folder labels: {summary['accuracy']:.4f} ({summary['labelled']} labelled images)"
        )
    if summary["errors"]:
        lines.append(
            f"{len(summary['errors'])} image(s) could not be read and were skipped (listed above and in summary.json)"
        )
    lines.append(f"results in {summary['output']} (predictions.csv, summary.json, overlays/)")
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict[str, Any]:
    """predict.py's task; a user error ends it with one line ``error: ...`` and exit status 1."""
    try:
        summary = predict_to_folder(
            cfg.ckpt,
            cfg.input,
            cfg.output,
            device=cfg.device,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            overlays=cfg.overlays,
            save_maps=cfg.save_maps,
            threshold=cfg.threshold,
            threshold_method=cfg.threshold_method,
            threshold_quantile=cfg.threshold_quantile,
            search=cfg.search,
            faiss_index=cfg.faiss_index,
            search_memory_mb=cfg.search_memory_mb,
            show_progress=cfg.progress,
            threads=cfg.threads,
            runtime=cfg.get("runtime", "torch"),
        )
    except PatchAEError as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        sys.exit(1)
    print(report(summary))
    return summary
