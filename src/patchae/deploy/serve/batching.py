"""Dynamic batching: requests that arrive together are scored as one batch by one worker thread.

The worker waits for a first job, then keeps collecting until ``max_size`` jobs or until ``window_ms`` have
passed since the first one came, and hands the batch to ``process``. A window of 0 takes only the jobs already
waiting (no added latency, batches still form under load); ``max_size=1`` scores every image alone. One worker
owns the model, so torch / ONNX Runtime use all their threads on one batch instead of fighting over the cores.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from patchae.errors import PatchAEError, finite_number

log = logging.getLogger(__name__)

Job = TypeVar("Job")
_STOP = object()


class Busy(Exception):
    """More jobs are waiting than the queue holds."""


class DynamicBatcher(Generic[Job]):
    """``await batcher.submit(job)`` returns ``process([... job ...])``'s result for that job.

    ``process`` takes a list of jobs and returns one result per job, in order; an exception it raises is
    raised to every caller of that batch.
    """

    def __init__(
        self,
        process: Callable[[Sequence[Job]], Sequence[Any]],
        window_ms: float = 10.0,
        max_size: int = 16,
        max_queue: int = 256,
    ) -> None:
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise PatchAEError(f"batch.max_size must be a positive integer, got {max_size!r}")
        if not 0 <= finite_number("batch.window_ms", window_ms) <= 10_000:
            raise PatchAEError(f"batch.window_ms must be between 0 and 10000, got {window_ms!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise PatchAEError(f"batch.max_queue must be a positive integer, got {max_queue!r}")
        self.process = process
        self.window_s = float(window_ms) / 1000
        self.max_size = max_size
        self.jobs: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self.batches = 0
        self.scored = 0
        self.worker = threading.Thread(target=self._run, name="patchae-batcher", daemon=True)
        self.worker.start()

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    async def submit(self, job: Job) -> Any:
        future: Future[Any] = Future()
        try:
            self.jobs.put_nowait((job, future))
        except queue.Full:
            raise Busy(f"{self.jobs.maxsize} requests are already waiting") from None
        return await asyncio.wrap_future(future)

    def stop(self, timeout: float = 30.0) -> None:
        """Score what is queued, then end the worker."""
        try:
            self.jobs.put(_STOP, timeout=timeout)
        except queue.Full:
            log.warning("the scoring queue did not drain within %g s; stopping without it", timeout)
            return
        self.worker.join(timeout)

    def _collect(self) -> tuple[list[tuple[Job, Future[Any]]], bool]:
        first = self.jobs.get()
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_size:
            remaining = deadline - time.monotonic()
            try:
                item = self.jobs.get(timeout=remaining) if remaining > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = self._collect()
            # A caller that was cancelled meanwhile (its client went away) is dropped; the others can no
            # longer be cancelled, so their results are always delivered.
            batch = [(job, future) for job, future in batch if future.set_running_or_notify_cancel()]
            if not batch:
                continue
            jobs = [job for job, _ in batch]
            try:
                results = self.process(jobs)
            except BaseException as error:  # every caller of the batch gets it; the worker goes on
                log.exception("scoring a batch of %d failed", len(jobs))
                for _, future in batch:
                    future.set_exception(error)
                continue
            self.batches += 1
            self.scored += len(jobs)
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)
