"""Downloading and safely extracting the MVTec AD archive.

The archive is streamed to ``<name>.part`` while its SHA-256 is computed, renamed once verified, extracted
into a temporary folder inside ``root`` (so an interrupted extraction never looks like a complete category),
moved into place, and deleted.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import lzma
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import urlparse

from patchae.errors import PatchAEError

logger = logging.getLogger(__name__)

# The official archive (4.9 GiB, all 15 categories) and its SHA-256, as published with anomalib's MVTecAD
# datamodule (DOWNLOAD_INFO in anomalib/data/datamodules/image/mvtecad.py).
MVTEC_URL = (
    "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/"
    "download/420938113-1629952094/mvtec_anomaly_detection.tar.xz"
)
MVTEC_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
MVTEC_HOMEPAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"

_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 60
_ARCHIVE_TOP_FILES = ("license.txt", "readme.txt")


def download_mvtec(
    root: str | Path,
    category: str | None = None,
    url: str = MVTEC_URL,
    sha256: str | None = MVTEC_SHA256,
) -> None:
    """Download MVTec AD into ``root`` (``root/<category>/...``), verifying ``sha256`` (None skips the check).

    With ``category`` only that category (and the licence files) is extracted. The verified archive stays in
    ``root``, so the other categories extract from it without downloading 5 GB again; delete it when done.
    Categories already present in ``root`` are left untouched.
    """
    root = Path(root).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PatchAEError(
            f"cannot create the MVTec AD root {root} ({error.strerror}); set data.root"
        ) from error
    archive = root / (PurePosixPath(urlparse(url).path).name or "mvtec_anomaly_detection.tar.xz")
    if not (archive.is_file() and (sha256 is None or _sha256_of(archive) == sha256.lower())):
        _fetch(url, archive, sha256)
    safe_extract(archive, root, only=None if category is None else category)
    logger.info("MVTec AD ready in %s (archive kept for the other categories: %s)", root, archive)


def _fetch(url: str, destination: Path, sha256: str | None) -> None:
    partial = destination.with_name(destination.name + ".part")
    digest = hashlib.sha256()
    logger.info("downloading %s to %s", url, destination)
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response, partial.open("wb") as sink:
            total = int(response.headers.get("Content-Length") or 0)
            _stream(response, sink, digest, total)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        partial.unlink(missing_ok=True)
        reason = getattr(error, "reason", None) or error
        raise PatchAEError(
            f"could not download MVTec AD from {url} ({reason}); download it by hand from {MVTEC_HOMEPAGE} "
            "and set data.root"
        ) from error
    got = digest.hexdigest()
    if sha256 is not None and got != sha256.lower():
        partial.unlink(missing_ok=True)
        raise PatchAEError(
            f"checksum mismatch for {url}: expected sha256 {sha256.lower()}, got {got}; the download is corrupt "
            f"or the file changed. Retry, or download it by hand from {MVTEC_HOMEPAGE} and set data.root"
        )
    os.replace(partial, destination)


def _stream(response: BinaryIO, sink: BinaryIO, digest: Any, total: int) -> None:
    done, next_report, started = 0, 0.0, time.monotonic()
    while chunk := response.read(_CHUNK_BYTES):
        sink.write(chunk)
        digest.update(chunk)
        done += len(chunk)
        if total and done / total >= next_report:
            speed = done / max(time.monotonic() - started, 1e-6) / 2**20
            logger.info("  %3.0f%% of %.0f MiB (%.1f MiB/s)", 100 * done / total, total / 2**20, speed)
            next_report += 0.05
    if total and done != total:
        raise OSError(f"connection closed after {done} of {total} bytes")


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def safe_extract(archive: str | Path, destination: str | Path, only: str | None = None) -> None:
    """Extract a tar archive into ``destination``, refusing any member that would land outside it.

    Absolute paths, ``..`` components, links pointing outside, and device/FIFO members are rejected before
    anything is extracted. ``only`` restricts extraction to one top-level folder (plus licence files).
    Entries already present in ``destination`` are kept, not overwritten.
    """
    archive, destination = Path(archive), Path(destination).resolve()
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=destination))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = [m for m in tar.getmembers() if _wanted(m.name, only)]
                for member in members:
                    _check_member(member, staging, archive)
                if only is not None and not any(_top_level(m.name) == only for m in members):
                    raise PatchAEError(
                        f"the archive {archive} has no folder {only!r}; check the category name"
                    )
                extract_kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(staging, members=members, **extract_kwargs)
        except (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, OSError) as error:
            raise PatchAEError(
                f"cannot extract {archive} ({error}); delete it and download again, or extract it by hand"
            ) from error
        _move_into_place(_unwrap(staging), destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _wanted(name: str, only: str | None) -> bool:
    if only is None:
        return True
    top = _top_level(name)
    return top == only or top in _ARCHIVE_TOP_FILES or top == "mvtec_anomaly_detection"


def _top_level(name: str) -> str:
    parts = [p for p in PurePosixPath(name).parts if p not in (".", "")]
    if parts and parts[0] == "mvtec_anomaly_detection" and len(parts) > 1:
        parts = parts[1:]
    return parts[0] if parts else ""


def _check_member(member: tarfile.TarInfo, staging: Path, archive: Path) -> None:
    def refuse(why: str) -> PatchAEError:
        return PatchAEError(
            f"refusing to extract {archive}: member {member.name!r} {why}; the archive is corrupt or malicious"
        )

    name = member.name
    if (
        name.startswith(("/", "\\"))
        or PurePosixPath(name).is_absolute()
        or (len(name) > 1 and name[1] == ":")
    ):
        raise refuse("has an absolute path")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise refuse("contains '..'")
    target = (staging / name).resolve()
    if not target.is_relative_to(staging.resolve()):
        raise refuse("would be written outside the destination")
    if member.issym() or member.islnk():
        link = member.linkname
        if PurePosixPath(link).is_absolute() or link.startswith("\\"):
            raise refuse(f"links to the absolute path {link!r}")
        base = target.parent if member.issym() else staging
        # '..' in a link is refused outright: chained links could otherwise escape once extracted.
        escapes = ".." in PurePosixPath(link.replace("\\", "/")).parts
        if escapes or not (base / link).resolve().is_relative_to(staging.resolve()):
            raise refuse(f"links outside the destination ({link!r})")
    elif not (member.isfile() or member.isdir()):
        raise refuse("is a device or FIFO")


def _unwrap(staging: Path) -> Path:
    """Tolerate archives that wrap the categories in a single ``mvtec_anomaly_detection/`` folder."""
    entries = list(staging.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name == "mvtec_anomaly_detection":
        return entries[0]
    return staging


def _move_into_place(source: Path, destination: Path) -> None:
    for entry in sorted(source.iterdir()):
        target = destination / entry.name
        if target.exists():
            logger.info("keeping the existing %s", target)
            continue
        os.replace(entry, target)
