"""Load on the screening station: ``serve.py`` under N concurrent clients, against predict.py on the same images.

    make bench-serve SERVE_ARGS="ckpt=outputs/bottle/<time>/model.ckpt images=data/mvtec_ad/bottle/test"
    python -m patchae.benchmarks.serve ckpt=<model.ckpt> images=<folder> requests=400 clients=8 runtimes=[torch]

For every runtime (torch, onnx) and batching setting (on: ``batch.window_ms`` / ``batch.max_size``; off:
``batch.max_size=1``, every image scored alone) it starts ``python serve.py`` on a free loopback port, sends
``warmup`` untimed requests, then ``requests`` requests from ``clients`` concurrent httpx clients (the images
cycled, bodies read into memory first), stops the station (SIGTERM) and reports: images/s, client-side p50 /
p95 / p99 latency, errors (any answer but 200, or no answer), the mean batch the station formed, and the audit
rows written against the responses received (they must be equal). ``baseline=true`` also runs predict.py's
``predict_to_folder`` once per runtime on the same images with the same overlays setting (bench-speed's
"end-to-end images/s" row when overlays are off) and prints the station's ratio to it.

Clients and station share the machine's cores, as on a line PC that also runs its camera software.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from patchae.benchmarks.cli import project_root, run_command
from patchae.benchmarks.inference import percentile
from patchae.benchmarks.speed import machine
from patchae.errors import PatchAEError

log = logging.getLogger(__name__)

CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp"}
CKPT_HINT = (
    'make bench-serve SERVE_ARGS="ckpt=outputs/bottle/<time>/model.ckpt images=data/mvtec_ad/bottle/test"'
)


@dataclass
class ServeBenchConfig:
    """``python -m patchae.benchmarks.serve key=value ...``"""

    ckpt: str | None = None  # required: the model.ckpt to serve
    images: str | None = (
        None  # folder / glob of images to send; default: the run's <data.root>/<category>/test
    )
    requests: int = 400  # timed requests per setting
    clients: int = 8  # concurrent clients
    warmup: int = 16  # untimed requests first (model, allocator and connection warm-up)
    runtimes: list[str] = field(default_factory=lambda: ["torch", "onnx"])
    batching: list[str] = field(default_factory=lambda: ["on", "off"])
    window_ms: float = 10.0  # batching on: the station's batch.window_ms ...
    max_batch: int = 16  # ... and batch.max_size
    overlays: bool = False  # the station's overlays= (and the baseline's): off as bench-speed's predict row
    device: str = "cpu"
    threads: int | None = None  # the station's (and the baseline's) torch / ONNX Runtime threads
    baseline: bool = True  # also time predict.py on the same images
    timeout_s: float = 600.0  # for the station to start (runtime=onnx exports the model first)
    folder: str | None = None  # station folders; default outputs/bench_serve/<time>
    output: str | None = None  # also write the results as JSON


# -- the station ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_health(process: subprocess.Popen[bytes], url: str, timeout: float, poll_s: float = 0.5) -> bool:
    """True once ``url``/health answers 200, False when ``timeout`` passes first; raises :class:`PatchAEError`
    (with the exit status) when the station's process ends before it answers."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PatchAEError(f"serve.py exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    return False


class Station:
    """``python serve.py`` in a subprocess, for the length of one measurement."""

    def __init__(self, cfg: ServeBenchConfig, runtime: str, batching: str, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        max_size = cfg.max_batch if batching == "on" else 1
        self.command = [
            sys.executable,
            str(project_root() / "serve.py"),
            f"ckpt={Path(cfg.ckpt).expanduser().resolve()}",
            f"output={folder}",
            "host=127.0.0.1",
            f"port={self.port}",
            f"device={cfg.device}",
            f"runtime={runtime}",
            f"batch.window_ms={cfg.window_ms if batching == 'on' else 0}",
            f"batch.max_size={max_size}",
            f"overlays={str(cfg.overlays).lower()}",
            f"limit_concurrency={max(64, 4 * cfg.clients)}",
            *([f"threads={cfg.threads}"] if cfg.threads is not None else []),
        ]
        self.log = folder.parent / f"{folder.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float) -> None:
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        env = {key: value for key, value in os.environ.items() if key != "PATCHAE_SERVE_TOKEN"}
        with self.log.open("wb") as log_file:
            self.process = subprocess.Popen(self.command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            if wait_for_health(self.process, self.url, timeout):
                return
        except PatchAEError as exited:
            raise PatchAEError(f"{exited}: {self.last_line()}") from None
        self.stop()
        raise PatchAEError(f"serve.py did not start within timeout_s={timeout:g}; see {self.log}")

    def last_line(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        return lines[-1] if lines else "(no output)"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)

    def audit(self) -> dict[str, Any]:
        connection = sqlite3.connect(self.folder / "audit.sqlite")
        try:
            rows, mean_batch = connection.execute(
                "SELECT COUNT(*), AVG(batch_size) FROM requests WHERE status = 200"
            ).fetchone()
            total = connection.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
            integrity = connection.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            connection.close()
        return {"rows": total, "scored_rows": rows, "mean_batch": mean_batch, "integrity": integrity}


# -- the clients ------------------------------------------------------------------------------------------
def send(
    url: str, bodies: list[tuple[bytes, str]], count: int, clients: int
) -> tuple[list[tuple[float, int | None]], float]:
    """``count`` POSTs from ``clients`` threads with a connection each: (seconds, status or None) per request,
    and the wall seconds from the moment every client is ready (clients are set up off the clock)."""
    import httpx

    numbers = itertools.count()
    results: list[tuple[float, int | None]] = []
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            ready.wait()
            while (index := next(numbers)) < count:
                body, content_type = bodies[index % len(bodies)]
                started = time.perf_counter()
                try:
                    status: int | None = http.post(
                        f"{url}/predict", content=body, headers={"Content-Type": content_type}
                    ).status_code
                except httpx.HTTPError:
                    status = None
                with lock:
                    results.append((time.perf_counter() - started, status))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    ready.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - started


def measure(
    cfg: ServeBenchConfig, runtime: str, batching: str, bodies: list[tuple[bytes, str]], folder: Path
) -> dict[str, Any]:
    station = Station(cfg, runtime, batching, folder / f"{runtime}_batching_{batching}")
    station.start(cfg.timeout_s)
    try:
        warm = send(station.url, bodies, cfg.warmup, cfg.clients)[0] if cfg.warmup else []
        timed, seconds = send(station.url, bodies, cfg.requests, cfg.clients)
    finally:
        station.stop()
    audit = station.audit()
    answered = sum(status is not None for _, status in warm + timed)  # every answer, refusals included
    ok = [latency * 1000 for latency, status in timed if status == 200]
    return {
        "runtime": runtime,
        "batching": batching,
        "window_ms": cfg.window_ms if batching == "on" else 0,
        "max_batch": cfg.max_batch if batching == "on" else 1,
        "requests": len(timed),
        "seconds": seconds,
        "images_per_second": len(ok) / seconds,
        "latency_ms_p50": percentile(ok, 50),
        "latency_ms_p95": percentile(ok, 95),
        "latency_ms_p99": percentile(ok, 99),
        "errors": len(timed) - len(ok) + sum(status != 200 for _, status in warm),
        "responses": answered,
        "audit_rows": audit["rows"],
        "audit_integrity": audit["integrity"],
        "mean_batch": audit["mean_batch"],
        "station_folder": str(station.folder),
    }


# -- predict.py on the same images ------------------------------------------------------------------------
def predict_baseline(cfg: ServeBenchConfig, runtime: str, images: str, folder: Path) -> float:
    """predict.py's end-to-end images/s on the same images (the same ``find_images`` listing the clients send):
    the better of two runs, the first also warming the caches, so the station is held to predict.py's best."""
    from patchae.deploy.predict import predict_to_folder

    return max(
        predict_to_folder(
            cfg.ckpt,
            images,
            folder / f"predict_{runtime}_{attempt}",
            device=cfg.device,
            num_workers=2,
            overlays=cfg.overlays,
            show_progress=False,
            threads=cfg.threads,
            runtime=runtime,
        )["images_per_second"]
        for attempt in (1, 2)
    )


# -- the run ----------------------------------------------------------------------------------------------
def default_images(ckpt: Path) -> str:
    """The test folder of the run that wrote ``ckpt``, from its .hydra/config.yaml."""
    config = ckpt.parent / ".hydra" / "config.yaml"
    if config.is_file():
        saved = OmegaConf.load(config)
        root, category = OmegaConf.select(saved, "data.root"), OmegaConf.select(saved, "category")
        if root and category and (Path(root) / str(category) / "test").is_dir():
            return str(Path(root) / str(category) / "test")
    raise PatchAEError(
        f"images= is required (a folder of test images, e.g. data/mvtec_ad/bottle/test): {CKPT_HINT}"
    )


def run_benchmark(cfg: ServeBenchConfig) -> dict[str, Any]:
    from patchae.deploy.inputs import find_images
    from patchae.deploy.runtime import check_runtime

    if not cfg.ckpt:
        raise PatchAEError(f"ckpt= is required: {CKPT_HINT}")
    ckpt = Path(cfg.ckpt).expanduser()
    if not ckpt.is_file():
        raise PatchAEError(f"ckpt={ckpt} not found; pass the model.ckpt a training run wrote")
    for name in ("requests", "clients"):
        if getattr(cfg, name) < 1:
            raise PatchAEError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    for runtime in cfg.runtimes:
        check_runtime(runtime)
    # The command line reads on / off as YAML booleans, which the string list turns into "True" / "False".
    cfg.batching = [
        {"true": "on", "false": "off"}.get(str(value).lower(), str(value)) for value in cfg.batching
    ]
    if unknown := [value for value in cfg.batching if value not in ("on", "off")]:
        raise PatchAEError(f"batching={unknown} is unknown; use [on,off], [on] or [off]")
    spec = cfg.images or default_images(ckpt)
    images = find_images(spec)
    bodies = [
        (path.read_bytes(), CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream"))
        for path in images
    ]
    folder = (
        Path(cfg.folder or f"outputs/bench_serve/{datetime.now():%Y-%m-%d_%H-%M-%S}").expanduser().resolve()
    )
    folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": machine(),
        "checkpoint": str(ckpt),
        "images": len(images),
        "config": {key: value for key, value in vars(cfg).items()},
        "command": " ".join(["python -m patchae.benchmarks.serve", *sys.argv[1:]]),
        "rows": [],
        "predict_images_per_second": {},
    }
    for runtime in cfg.runtimes:
        if cfg.baseline:
            results["predict_images_per_second"][runtime] = predict_baseline(cfg, runtime, spec, folder)
        for batching in cfg.batching:
            row = measure(cfg, runtime, batching, bodies, folder)
            baseline = results["predict_images_per_second"].get(runtime)
            row["ratio_to_predict"] = row["images_per_second"] / baseline if baseline else None
            results["rows"].append(row)
            log.warning("%s, batching %s: %.1f images/s", runtime, batching, row["images_per_second"])
    return results


def format_results(results: dict[str, Any]) -> str:
    cpu = results["machine"]
    cfg = results["config"]
    lines = [
        f"machine: {cpu['cpu']}, {cpu['cores']} cores, torch {cpu['torch']}",
        f"model: {results['checkpoint']}; {results['images']} images cycled; {cfg['requests']} timed requests "
        f"from {cfg['clients']} concurrent clients on 127.0.0.1; overlays {'on' if cfg['overlays'] else 'off'}",
        f"command: {results['command']}",
        f"{'runtime':<8} {'batching':<18} {'images/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7} "
        f"{'mean batch':>10} {'rows/responses':>15} {'predict.py':>11} {'ratio':>6}",
    ]
    for row in results["rows"]:
        batching = (
            f"on ({row['window_ms']:g} ms, <={row['max_batch']})"
            if row["batching"] == "on"
            else "off (1 image)"
        )
        baseline = results["predict_images_per_second"].get(row["runtime"])
        ratio = f"{row['ratio_to_predict']:.2f}" if row["ratio_to_predict"] is not None else "-"
        mean_batch = f"{row['mean_batch']:.1f}" if row["mean_batch"] is not None else "-"
        lines.append(
            f"{row['runtime']:<8} {batching:<18} {row['images_per_second']:>9.1f} {row['latency_ms_p50']:>8.1f} "
            f"{row['latency_ms_p95']:>8.1f} {row['latency_ms_p99']:>8.1f} {row['errors']:>7} {mean_batch:>10} "
            f"{str(row['audit_rows']) + '/' + str(row['responses']):>15} "
            f"{(f'{baseline:.1f}' if baseline else '-'):>11} {ratio:>6}"
        )
    lines.append(
        "predict.py: images/s of predict_to_folder on the same images, same runtime and overlays setting; "
        "ratio = station / predict.py; rows/responses: audit rows written / answers received (warm-up included)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_command(
        "patchae.benchmarks.serve", __doc__, ServeBenchConfig, run_benchmark, format_results, argv
    )


if __name__ == "__main__":
    main()
