"""The station's audit log: one row per POST /predict, whatever its outcome, in SQLite (WAL) in the station folder.

A row is committed before its response is sent, so every answer a client received is on disk; a row without a
delivered answer (the client went away) is possible, the reverse is not.

Durability: WAL mode with ``synchronous=FULL`` fsyncs the WAL at every commit, so a committed row survives a
killed process *and* a power cut. (``NORMAL`` with WAL would survive SIGKILL as well, since the WAL is written
before commit returns, but may drop the last commits on power loss: not "loses nothing" for a station by a
production line.) The cost is one fsync per commit; rows of one scored batch share a commit.

Readers (``/history``, CSV export) use connections of their own: WAL lets them read while the writer writes,
and they never see a half-written batch. ``/stats`` reads a :class:`Tally` kept up to date with every commit.
"""

from __future__ import annotations

import csv
import io
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from patchae.errors import PatchAEError


@dataclass
class AuditRow:
    request_id: str  # also the overlay's name
    time: str  # UTC, ISO 8601, when the request arrived
    client: str
    status: int  # HTTP status of the response
    decision: str  # normal | anomalous | rejected | error
    model_sha256: str  # of the checkpoint file that decided
    latency_ms: float  # request arrival -> row written (the response follows at once)
    image_sha256: str | None = None
    input_path: str | None = None  # the stored upload, relative to the station folder
    width: int | None = None
    height: int | None = None
    score: float | None = None  # raw image score
    normalized_score: float | None = None  # 0.5 = threshold
    threshold: float | None = None  # raw score threshold in force
    threshold_method: str | None = None
    runtime: str | None = None
    batch_size: int | None = None  # images scored together with this one
    overlay_path: str | None = None
    error: str | None = None  # the one-line reason of a refusal or failure


COLUMNS = [field.name for field in fields(AuditRow)]
SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    time TEXT NOT NULL,
    client TEXT NOT NULL,
    status INTEGER NOT NULL,
    decision TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    latency_ms REAL NOT NULL,
    image_sha256 TEXT,
    input_path TEXT,
    width INTEGER,
    height INTEGER,
    score REAL,
    normalized_score REAL,
    threshold REAL,
    threshold_method TEXT,
    runtime TEXT,
    batch_size INTEGER,
    overlay_path TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS requests_model ON requests (model_sha256, decision);
"""
HISTOGRAM_BINS = 20  # of the normalised score, so the threshold (0.5) is a bin edge
DECISIONS = ("normal", "anomalous", "rejected", "error")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class AuditLog:
    """The writer. ``tally`` follows ``model_sha256``'s rows (the served model) for the live page."""

    def __init__(self, path: str | Path, model_sha256: str) -> None:
        self.path = Path(path)
        self.lock = threading.Lock()  # one writer connection, shared by the scoring worker and the handlers
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.connection = self._connect()
            self.connection.execute("PRAGMA journal_mode=WAL")
            self.connection.execute("PRAGMA synchronous=FULL")
            self.connection.executescript(SCHEMA)
            self.connection.commit()
            self.tally = Tally(self.path, model_sha256)
        except sqlite3.DatabaseError as error:
            raise PatchAEError(
                f"cannot open the audit log {self.path} ({error}); use another output= folder or repair the file"
            ) from None

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are begun and committed explicitly below.
        return sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)

    def write(self, rows: Sequence[AuditRow]) -> None:
        """Commit ``rows`` in one transaction (one fsync); returns only once they are durable."""
        if not rows:
            return
        names = ", ".join(COLUMNS)
        marks = ", ".join("?" for _ in COLUMNS)
        values = [tuple(getattr(row, name) for name in COLUMNS) for row in rows]
        with self.lock:
            self.connection.execute("BEGIN IMMEDIATE")
            try:
                self.connection.executemany(f"INSERT INTO requests ({names}) VALUES ({marks})", values)
            except BaseException:
                self.connection.execute("ROLLBACK")
                raise
            self.connection.execute("COMMIT")
        self.tally.add(rows)

    def close(self) -> None:
        with self.lock:
            try:
                self.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # fold the WAL in on a clean stop
            finally:
                self.connection.close()


# -- reading ------------------------------------------------------------------------------------------------
def read_connection(path: str | Path) -> sqlite3.Connection:
    # Not mode=ro: a read-only connection cannot create the WAL's shared-memory file when it is missing.
    connection = sqlite3.connect(Path(path), timeout=30)
    connection.execute("PRAGMA query_only=ON")
    connection.row_factory = sqlite3.Row
    return connection


def page(path: str | Path, limit: int, before: int | None = None) -> list[dict[str, Any]]:
    """The newest ``limit`` rows (with ``id < before`` when given), newest first."""
    with closing(read_connection(path)) as connection:
        if before is None:
            rows = connection.execute("SELECT * FROM requests ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = connection.execute(
                "SELECT * FROM requests WHERE id < ? ORDER BY id DESC LIMIT ?", (before, limit)
            )
        return [dict(row) for row in rows]


def csv_lines(path: str | Path, batch: int = 1000) -> Iterator[str]:
    """Every row, oldest first, as CSV text (header first), read in batches so the export streams."""
    with closing(read_connection(path)) as connection:
        cursor = connection.execute("SELECT * FROM requests ORDER BY id")
        names = [column[0] for column in cursor.description]
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(names)
        while True:
            rows = cursor.fetchmany(batch)
            writer.writerows(tuple(row) for row in rows)
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
            if not rows:
                return


class Tally:
    """One model's counts by decision and histogram of normalised scores: read from the log once, then kept up
    to date as rows are committed, so the live page's polling never scans a log that grows for months."""

    def __init__(self, path: str | Path, model_sha256: str) -> None:
        self.model_sha256 = model_sha256
        self.lock = threading.Lock()
        self.counts = dict.fromkeys(DECISIONS, 0)
        self.histogram = [0] * HISTOGRAM_BINS
        with closing(read_connection(path)) as connection:
            for decision, count in connection.execute(
                "SELECT decision, COUNT(*) FROM requests WHERE model_sha256 = ? GROUP BY decision",
                (model_sha256,),
            ):
                self.counts[decision] = self.counts.get(decision, 0) + count
            for index, count in connection.execute(
                "SELECT MIN(CAST(normalized_score * ? AS INTEGER), ?), COUNT(*) FROM requests "
                "WHERE model_sha256 = ? AND normalized_score IS NOT NULL GROUP BY 1",
                (HISTOGRAM_BINS, HISTOGRAM_BINS - 1, model_sha256),
            ):
                self.histogram[max(0, int(index))] += count

    def add(self, rows: Sequence[AuditRow]) -> None:
        with self.lock:
            for row in rows:
                if row.model_sha256 != self.model_sha256:
                    continue
                self.counts[row.decision] = self.counts.get(row.decision, 0) + 1
                if row.normalized_score is not None:  # as the SQL above: [0, 1] cut into equal bins
                    self.histogram[
                        max(0, min(int(row.normalized_score * HISTOGRAM_BINS), HISTOGRAM_BINS - 1))
                    ] += 1

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                **{decision: self.counts.get(decision, 0) for decision in DECISIONS},
                "histogram": {
                    "bins": HISTOGRAM_BINS,
                    "range": [0.0, 1.0],
                    "threshold": 0.5,
                    "counts": list(self.histogram),
                },
            }
