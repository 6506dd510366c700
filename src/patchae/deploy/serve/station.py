"""The screening station without its HTTP layer: one Predictor, the dynamic batcher, the audit log and the
station folder (``audit.sqlite``, ``inputs/<sha256>.<ext>``, ``overlays/<request id>.png``).

Scoring goes through :class:`patchae.deploy.predict.Predictor` (``prepare`` then ``predict_loaded``), the code
predict.py runs, so a posted image gets predict.py's decision for the same file, model and threshold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from patchae.deploy.loading import set_threads
from patchae.deploy.predict import LoadedImage, Prediction, Predictor, overlay_image
from patchae.deploy.serve.audit import AuditLog, AuditRow
from patchae.deploy.serve.auth import resolve_token
from patchae.deploy.serve.batching import DynamicBatcher
from patchae.deploy.serve.uploads import DecodedImage, UploadLimits, decode
from patchae.errors import PatchAEError, finite_number

log = logging.getLogger(__name__)


@dataclass
class StationSettings:
    """conf/serve.yaml's keys (see there for what each does)."""

    ckpt: str
    output: str
    device: str = "auto"
    runtime: str = "torch"
    threads: int | None = None
    window_ms: float = 10.0
    max_batch: int = 16
    max_queue: int = 256
    threshold: float | None = None
    threshold_method: str | None = None
    threshold_quantile: float | None = None
    search: str | None = None
    faiss_index: str | None = None
    search_memory_mb: float | None = 256
    overlays: bool = True
    max_upload_mb: float = 50.0
    max_megapixels: float = 50.0
    upload_timeout_s: float = 30.0
    token: str | None = None
    latest: int = 12

    @classmethod
    def from_config(cls, cfg: Any) -> StationSettings:
        if OmegaConf.is_missing(cfg, "ckpt") or cfg.ckpt in (None, ""):
            raise PatchAEError("ckpt= is required: python serve.py ckpt=outputs/<category>/<time>/model.ckpt")
        return cls(
            ckpt=str(cfg.ckpt),
            output=str(cfg.output),
            device=str(cfg.device),
            runtime=str(cfg.runtime),
            threads=cfg.threads,
            window_ms=cfg.batch.window_ms,
            max_batch=cfg.batch.max_size,
            max_queue=cfg.batch.max_queue,
            threshold=cfg.threshold,
            threshold_method=cfg.threshold_method,
            threshold_quantile=cfg.threshold_quantile,
            search=cfg.search,
            faiss_index=cfg.faiss_index,
            search_memory_mb=cfg.search_memory_mb,
            overlays=bool(cfg.overlays),
            max_upload_mb=cfg.max_upload_mb,
            max_megapixels=cfg.max_megapixels,
            upload_timeout_s=cfg.upload_timeout_s,
            token=cfg.auth.token,
            latest=cfg.page.latest,
        )

    def limits(self) -> UploadLimits:
        values = {}
        for name in ("max_upload_mb", "max_megapixels", "upload_timeout_s"):
            values[name] = finite_number(name, getattr(self, name))
            if values[name] <= 0:
                raise PatchAEError(f"{name} must be positive, got {getattr(self, name)!r}")
        return UploadLimits(
            max_bytes=int(values["max_upload_mb"] * 2**20),
            max_pixels=int(values["max_megapixels"] * 1e6),
            timeout_s=values["upload_timeout_s"],
        )


@dataclass
class Job:
    """One accepted upload, read and preprocessed, waiting to be scored."""

    request_id: str
    arrived: str
    started: float  # perf_counter at arrival, for the latency
    client: str
    decoded: DecodedImage
    loaded: LoadedImage
    input_path: str


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_durably(path: Path, data: bytes | None = None, image: Image.Image | None = None) -> None:
    """Write to a temporary name, fsync, then rename: the final name never holds a partial file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=path.suffix)
    try:
        with os.fdopen(handle, "wb") as file:
            if image is not None:
                image.save(file, format="PNG", compress_level=1)  # as predict.py's overlays
            else:
                file.write(data or b"")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class Station:
    def __init__(self, settings: StationSettings) -> None:
        self.settings = settings
        self.limits = settings.limits()
        self.token = resolve_token(settings.token)
        if settings.threads is not None:
            set_threads(settings.threads)
        ckpt = Path(settings.ckpt).expanduser()
        if not ckpt.is_file():
            raise PatchAEError(f"ckpt={ckpt} not found; pass the model.ckpt a training run wrote")
        self.predictor = Predictor.from_checkpoint(
            ckpt,
            settings.device,
            settings.threshold,
            settings.threshold_method,
            settings.threshold_quantile,
            settings.search,
            settings.faiss_index,
            settings.search_memory_mb,
            batch_size=settings.max_batch,
            num_workers=0,
            keep_images=settings.overlays,
            runtime=settings.runtime,
        )
        self.ckpt = ckpt
        self.model_sha256 = file_sha256(ckpt)
        self.model_id = self.model_sha256[:12]
        self.folder = Path(settings.output).expanduser()
        try:
            for name in ("inputs", "overlays"):
                (self.folder / name).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise PatchAEError(
                f"cannot create the station folder {self.folder} ({error.strerror}); pick a writable output="
            ) from None
        self.audit_path = self.folder / "audit.sqlite"
        self.audit = AuditLog(self.audit_path, self.model_sha256)
        self.info = self._model_info()
        self._warm_up()
        # Overlays are drawn after the row is committed, by two threads, as predict.py writes them.
        self.overlay_writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="patchae-overlay")
        self.pending_overlays: dict[str, Future[None]] = {}
        self.overlay_queue: deque[Future[None]] = deque()
        self.overlay_lock = threading.Lock()
        self.batcher: DynamicBatcher[Job] = DynamicBatcher(
            self.score_batch, settings.window_ms, settings.max_batch, settings.max_queue
        )
        self.started = time.time()

    # -- what the model is ------------------------------------------------------------------------------------
    def _model_info(self) -> dict[str, Any]:
        model, thresholds = self.predictor.model, self.predictor.thresholds
        results = _read_json(self.ckpt.parent / "results.json")
        return {
            "model_id": self.model_id,
            "model_sha256": self.model_sha256,
            "checkpoint": str(self.ckpt),
            "category": results.get("category"),
            "model": type(model).__name__,
            "backbone": model.hparams.get("backbone"),
            "image_size": list(self.predictor.transform.output_shape),  # model input (height, width)
            "runtime": self.predictor.runtime,
            "device": str(self.predictor.device),
            "threshold": {
                "method": thresholds.method,
                "value": thresholds.value,
                "f1": _finite_or_none(thresholds.f1),
                "quantile": _finite_or_none(thresholds.quantile),
                "q": thresholds.q,
            },
            "training": {  # the run's metrics and timings from results.json beside the checkpoint
                key: value if isinstance(value, int) else _finite_or_none(value)
                for key, value in results.items()
                if isinstance(value, int | float)
                and not isinstance(value, bool)
                and key not in ("seed", "alpha")
            },
        }

    def _warm_up(self) -> None:
        """One image through the whole path before the first request (ONNX session, faiss, allocator)."""
        height, width = self.predictor.transform.output_shape
        self.predictor.predict([np.zeros((height, width, 3), np.uint8)])

    # -- one request --------------------------------------------------------------------------------------
    def accept(self, body: bytes, request_id: str, arrived: str, started: float, client: str) -> Job:
        """Check and decode the upload, store it (durably, once per content) and preprocess it; runs in a
        request thread, beside the scoring, as predict.py's loader threads do."""
        decoded = decode(body, self.limits.max_pixels)
        relative = f"inputs/{decoded.sha256}.{decoded.extension}"
        stored = self.folder / relative
        if not stored.exists():
            write_durably(stored, decoded.body)
        loaded = self.predictor.prepare(decoded.image, relative)
        return Job(request_id, arrived, started, client, decoded, loaded, relative)

    def score_batch(self, jobs: list[Job]) -> list[AuditRow]:
        """The batcher's work: score, commit one audit row per job, then queue the overlays."""
        predictions = self.predictor.predict_loaded([job.loaded for job in jobs])
        rows = [
            self._row(job, prediction, len(jobs)) for job, prediction in zip(jobs, predictions, strict=True)
        ]
        self.audit.write(rows)
        if self.settings.overlays:
            for row, prediction in zip(rows, predictions, strict=True):
                if row.overlay_path is not None:
                    self._queue_overlay(row.request_id, prediction)
        return rows

    def _row(self, job: Job, prediction: Prediction, batch_size: int) -> AuditRow:
        thresholds = self.predictor.thresholds
        failed = prediction.error is not None
        return AuditRow(
            request_id=job.request_id,
            time=job.arrived,
            client=job.client,
            status=500 if failed else 200,
            decision=prediction.decision,
            model_sha256=self.model_sha256,
            latency_ms=(time.perf_counter() - job.started) * 1000,
            image_sha256=job.decoded.sha256,
            input_path=job.input_path,
            width=prediction.width or job.loaded.size[1],
            height=prediction.height or job.loaded.size[0],
            score=None if failed else prediction.score,
            normalized_score=None if failed else prediction.normalized_score,
            threshold=thresholds.value,
            threshold_method=thresholds.method,
            runtime=self.predictor.runtime,
            batch_size=batch_size,
            overlay_path=f"overlays/{job.request_id}.png" if self.settings.overlays and not failed else None,
            error=prediction.error,
        )

    def refusal_row(
        self,
        request_id: str,
        arrived: str,
        started: float,
        client: str,
        status: int,
        message: str,
        body: bytes | None = None,
    ) -> AuditRow:
        """The row of a request answered without a decision; the body's SHA-256 when one was read."""
        thresholds = self.predictor.thresholds
        return AuditRow(
            request_id=request_id,
            time=arrived,
            client=client,
            status=status,
            decision="error" if status >= 500 else "rejected",
            model_sha256=self.model_sha256,
            latency_ms=(time.perf_counter() - started) * 1000,
            image_sha256=hashlib.sha256(body).hexdigest() if body else None,
            threshold=thresholds.value,
            threshold_method=thresholds.method,
            runtime=self.predictor.runtime,
            error=message,
        )

    # -- overlays -----------------------------------------------------------------------------------------
    def _queue_overlay(self, request_id: str, prediction: Prediction) -> None:
        path = self.folder / "overlays" / f"{request_id}.png"
        future = self.overlay_writer.submit(self._write_overlay, path, prediction)
        with self.overlay_lock:
            self.pending_overlays[request_id] = future
            self.overlay_queue.append(future)
        future.add_done_callback(lambda _: self._forget_overlay(request_id))
        # Bound the overlays waiting (each holds an image and its map), as predict.py bounds its writes.
        while len(self.overlay_queue) > 2 * self.settings.max_batch:
            self.overlay_queue.popleft().exception()

    @staticmethod
    def _write_overlay(path: Path, prediction: Prediction) -> None:
        try:
            write_durably(path, image=overlay_image(prediction))
        except Exception:  # an overlay is a view; losing one must not stop the station
            log.exception("cannot write overlay %s", path)

    def _forget_overlay(self, request_id: str) -> None:
        with self.overlay_lock:
            self.pending_overlays.pop(request_id, None)

    def overlay_pending(self, request_id: str) -> Future[None] | None:
        with self.overlay_lock:
            return self.pending_overlays.get(request_id)

    # -- the response -------------------------------------------------------------------------------------
    def answer(self, row: AuditRow) -> dict[str, Any]:
        return {
            "id": row.request_id,
            "decision": row.decision,
            "score": row.score,
            "normalized_score": row.normalized_score,
            "threshold": row.threshold,
            "threshold_method": row.threshold_method,
            "model_id": self.model_id,
            "latency_ms": round(row.latency_ms, 2),
            "overlay": f"/{row.overlay_path}" if row.overlay_path else None,
            "image_sha256": row.image_sha256,
            "width": row.width,
            "height": row.height,
            "batch_size": row.batch_size,
            "runtime": row.runtime,
        }

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model_id": self.model_id,
            "runtime": self.predictor.runtime,
            "device": str(self.predictor.device),
            "waiting": self.batcher.waiting,
            "scored": self.batcher.scored,
            "batches": self.batcher.batches,
            "uptime_s": round(time.time() - self.started, 1),
        }

    def close(self) -> None:
        """Score what is queued, finish the overlays, fold the WAL into the database."""
        self.batcher.stop()
        self.overlay_writer.shutdown(wait=True)
        self.audit.close()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a metric that could not be computed (no masks, one class) is null."""
    return value if math.isfinite(value) else None
