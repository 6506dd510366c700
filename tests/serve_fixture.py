"""A real screening station for the tests: ``python serve.py`` in a subprocess on a free loopback port.

``StationProcess`` starts it, waits until /health answers, stops it (SIGTERM, or SIGKILL for the crash test)
and checks that its port is closed afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from conftest import REPO
from patchae.benchmarks.serve import free_port, wait_for_health
from patchae.errors import PatchAEError

HOST = "127.0.0.1"


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((HOST, port)) == 0


class StationProcess:
    def __init__(self, ckpt: Path, folder: Path, *overrides: str, env: dict[str, str] | None = None) -> None:
        self.ckpt, self.folder, self.overrides = ckpt, folder, overrides
        # A token in the test runner's environment must not leak into a station meant to run without one.
        inherited = {key: value for key, value in os.environ.items() if key != "PATCHAE_SERVE_TOKEN"}
        self.env = {**inherited, "OMP_NUM_THREADS": "1", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log = folder.parent / f"{folder.name}.log"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 180) -> StationProcess:
        self.port = free_port()
        command = [
            sys.executable,
            str(REPO / "serve.py"),
            f"ckpt={self.ckpt}",
            f"output={self.folder}",
            f"host={HOST}",
            f"port={self.port}",
            "device=cpu",
            "threads=1",
            *self.overrides,
        ]
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.folder.parent, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            if wait_for_health(self.process, self.url, timeout, poll_s=0.3):
                return self
        except PatchAEError as exited:
            raise RuntimeError(f"{exited}:\n{self.log_tail()}") from None
        self.kill()
        raise RuntimeError(f"serve.py did not answer /health within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return (
            "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""
        )

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM (uvicorn's graceful shutdown: queued requests finish, the audit log is closed)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def stopped_cleanly(self) -> bool:
        """Ended by SIGTERM through uvicorn's shutdown (which re-raises the signal: exit status 0 or -15), the
        audit log closed (its WAL folded in and removed)."""
        assert self.process is not None
        return (
            self.process.returncode in (0, -signal.SIGTERM)
            and "Application shutdown complete" in self.log_tail(5)
            and not (self.folder / "audit.sqlite-wal").exists()
        )

    def kill(self) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def post(self, body: bytes, content_type: str = "image/png", **kwargs: Any) -> httpx.Response:
        headers = {"Content-Type": content_type, **kwargs.pop("headers", {})}
        return httpx.post(f"{self.url}/predict", content=body, headers=headers, timeout=60, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=60, **kwargs)

    def __enter__(self) -> StationProcess:
        if self.process is None or self.process.poll() is not None:  # `with station.start():` starts once
            self.start()
        return self

    def __exit__(self, *args: Any) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()
