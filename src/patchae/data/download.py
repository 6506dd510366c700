"""Downloading public data sets and extracting their archives safely.

An archive is streamed to ``<name>.part`` while its SHA-256 is computed, renamed once verified, extracted
into a temporary folder inside ``root`` (so an interrupted extraction never looks like a complete category),
moved into place, and kept so that other categories extract from it without a new download. Tar (any
compression) and zip archives are supported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import logging
import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import urlparse

from patchae.errors import PatchAEError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSource:
    """Where a data set's archive comes from and how it unpacks.

    ``sha256`` None means no verified checksum is known: downloading then refuses (never an unchecked
    archive) until the user sets one. ``url`` None: the authors offer no direct link, only a manual download.
    ``wrappers`` are folder names an archive may wrap everything in (stripped on extraction); ``keep`` are
    top-level entries extracted along with any single category (licence files, split files).
    """

    name: str
    url: str | None
    sha256: str | None
    homepage: str
    license: str
    wrappers: tuple[str, ...] = ()
    keep: tuple[str, ...] = ("license.txt", "readme.txt")


# The official archive (4.9 GiB, all 15 categories) and its SHA-256, as published with anomalib's MVTecAD
# datamodule (DOWNLOAD_INFO in anomalib/data/datamodules/image/mvtecad.py).
MVTEC_URL = (
    "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/"
    "download/420938113-1629952094/mvtec_anomaly_detection.tar.xz"
)
MVTEC_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
MVTEC_HOMEPAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
MVTEC_AD = DatasetSource(
    name="MVTec AD",
    url=MVTEC_URL,
    sha256=MVTEC_SHA256,
    homepage=MVTEC_HOMEPAGE,
    license="CC BY-NC-SA 4.0",
    wrappers=("mvtec_anomaly_detection",),
)

_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 60


def download_mvtec(
    root: str | Path,
    category: str | None = None,
    url: str = MVTEC_URL,
    sha256: str | None = MVTEC_SHA256,
) -> None:
    """Download MVTec AD into ``root`` (``root/<category>/...``), verifying ``sha256``.

    With ``category`` only that category (and the licence files) is extracted. The verified archive stays in
    ``root``, so the other categories extract from it without downloading 5 GB again; delete it when done.
    Categories already present in ``root`` are left untouched.
    """
    download_dataset(dataclasses.replace(MVTEC_AD, url=url, sha256=sha256), root, category)


def download_dataset(source: DatasetSource, root: str | Path, only: str | None = None) -> None:
    """Download ``source`` into ``root`` (SHA-256 checked) and extract it, or only its folder ``only``."""
    if source.url is None:
        raise PatchAEError(
            f"{source.name} has no direct download link; download it by hand from {source.homepage}, "
            "extract it and set data.root to its folder"
        )
    if not source.sha256:
        raise PatchAEError(
            f"no verified SHA-256 is known for the {source.name} archive, so it is not downloaded unchecked; "
            f"set data.sha256=<64 hex digits> from a copy you trust, or download it by hand from "
            f"{source.homepage} and set data.root"
        )
    if len(source.sha256) != 64 or any(c not in "0123456789abcdef" for c in source.sha256.lower()):
        raise PatchAEError(f"data.sha256={source.sha256!r} is not a SHA-256: it must be 64 hex digits")
    root = Path(root).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PatchAEError(
            f"cannot create the {source.name} root {root} ({error.strerror}); set data.root"
        ) from error
    logger.info("%s is licensed under %s (see %s)", source.name, source.license, source.homepage)
    archive = root / (PurePosixPath(urlparse(source.url).path).name or "archive")
    if not (archive.is_file() and _sha256_of(archive) == source.sha256.lower()):
        _fetch(source, archive)
    safe_extract(archive, root, only=only, wrappers=source.wrappers, keep=source.keep)
    logger.info("%s ready in %s (archive kept for the other categories: %s)", source.name, root, archive)


def _fetch(source: DatasetSource, destination: Path) -> None:
    url, sha256 = str(source.url), str(source.sha256).lower()
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
            f"could not download {source.name} from {url} ({reason}); offline or the link moved? "
            f"Download it by hand from {source.homepage}, extract it and set data.root"
        ) from error
    got = digest.hexdigest()
    if got != sha256:
        partial.unlink(missing_ok=True)
        raise PatchAEError(
            f"checksum mismatch for {url}: expected sha256 {sha256}, got {got}; the download is corrupt "
            f"or the file changed. Retry, or download it by hand from {source.homepage} and set data.root"
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


def safe_extract(
    archive: str | Path,
    destination: str | Path,
    only: str | None = None,
    wrappers: tuple[str, ...] = MVTEC_AD.wrappers,
    keep: tuple[str, ...] = MVTEC_AD.keep,
) -> None:
    """Extract a tar or zip archive into ``destination``, refusing any member that would land outside it.

    Absolute paths, ``..`` components, links pointing outside, and device/FIFO members are rejected before
    anything is extracted. ``only`` restricts extraction to one top-level folder (plus the ``keep`` entries);
    a single ``wrappers`` folder around everything is stripped. Entries already present in ``destination``
    are kept, not overwritten.
    """
    archive, destination = Path(archive), Path(destination).resolve()
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=destination))
    try:
        try:
            if zipfile.is_zipfile(archive):
                _extract_zip(archive, staging, only, wrappers, keep)
            else:
                _extract_tar(archive, staging, only, wrappers, keep)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, lzma.LZMAError, zlib.error, OSError) as error:
            raise PatchAEError(
                f"cannot extract {archive} ({error}); delete it and download again, or extract it by hand"
            ) from error
        _move_into_place(_unwrap(staging, wrappers), destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract_tar(
    archive: Path, staging: Path, only: str | None, wrappers: tuple[str, ...], keep: tuple[str, ...]
) -> None:
    with tarfile.open(archive, "r:*") as tar:
        members = [m for m in tar.getmembers() if _wanted(m.name, only, wrappers, keep)]
        for member in members:
            _check_member(member, staging, archive)
        _check_has(only, [m.name for m in members], wrappers, archive)
        extract_kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(staging, members=members, **extract_kwargs)


def _extract_zip(
    archive: Path, staging: Path, only: str | None, wrappers: tuple[str, ...], keep: tuple[str, ...]
) -> None:
    with zipfile.ZipFile(archive) as zipped:
        members = [m for m in zipped.infolist() if _wanted(m.filename, only, wrappers, keep)]
        for member in members:
            _check_name(member.filename, staging, archive)
            if stat.S_ISLNK(member.external_attr >> 16):  # zipfile would write the link target as a file
                raise _refusal(archive, member.filename, "is a symbolic link")
        _check_has(only, [m.filename for m in members], wrappers, archive)
        zipped.extractall(staging, members=members)


def _check_has(only: str | None, names: list[str], wrappers: tuple[str, ...], archive: Path) -> None:
    if only is not None and not any(_top_level(name, wrappers) == only for name in names):
        raise PatchAEError(f"the archive {archive} has no folder {only!r}; check the category name")


def _wanted(name: str, only: str | None, wrappers: tuple[str, ...], keep: tuple[str, ...]) -> bool:
    if only is None:
        return True
    top = _top_level(name, wrappers)
    return top == only or top in keep or top in wrappers


def _top_level(name: str, wrappers: tuple[str, ...]) -> str:
    parts = [p for p in PurePosixPath(name).parts if p not in (".", "")]
    if parts and parts[0] in wrappers and len(parts) > 1:
        parts = parts[1:]
    return parts[0] if parts else ""


def _refusal(archive: Path, name: str, why: str) -> PatchAEError:
    return PatchAEError(
        f"refusing to extract {archive}: member {name!r} {why}; the archive is corrupt or malicious"
    )


def _check_name(name: str, staging: Path, archive: Path) -> Path:
    """The path ``name`` would be extracted to, refusing absolute paths and ``..``."""
    if (
        name.startswith(("/", "\\"))
        or PurePosixPath(name).is_absolute()
        or (len(name) > 1 and name[1] == ":")
    ):
        raise _refusal(archive, name, "has an absolute path")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise _refusal(archive, name, "contains '..'")
    target = (staging / name).resolve()
    if not target.is_relative_to(staging.resolve()):
        raise _refusal(archive, name, "would be written outside the destination")
    return target


def _check_member(member: tarfile.TarInfo, staging: Path, archive: Path) -> None:
    target = _check_name(member.name, staging, archive)
    if member.issym() or member.islnk():
        link = member.linkname
        if PurePosixPath(link).is_absolute() or link.startswith("\\"):
            raise _refusal(archive, member.name, f"links to the absolute path {link!r}")
        base = target.parent if member.issym() else staging
        # '..' in a link is refused outright: chained links could otherwise escape once extracted.
        escapes = ".." in PurePosixPath(link.replace("\\", "/")).parts
        if escapes or not (base / link).resolve().is_relative_to(staging.resolve()):
            raise _refusal(archive, member.name, f"links outside the destination ({link!r})")
    elif not (member.isfile() or member.isdir()):
        raise _refusal(archive, member.name, "is a device or FIFO")


def _unwrap(staging: Path, wrappers: tuple[str, ...]) -> Path:
    """Tolerate archives that wrap everything in a single folder such as ``mvtec_anomaly_detection/``."""
    entries = list(staging.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name in wrappers:
        return entries[0]
    return staging


def _move_into_place(source: Path, destination: Path) -> None:
    for entry in sorted(source.iterdir()):
        target = destination / entry.name
        if target.exists():
            logger.info("keeping the existing %s", target)
            continue
        os.replace(entry, target)
