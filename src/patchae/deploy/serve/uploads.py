"""Reading and checking one uploaded image: the body's size, its content type, and what it decodes to.

Every refusal is a :class:`Refused` with an HTTP status and one line that says what to do. The size limit is
enforced while the body streams in (a ``Content-Length`` over the limit is refused before a byte is read), so
an oversized upload never sits in memory whole. Decoding goes through :func:`patchae.data.load_rgb`, the reader
predict.py uses for files, so a posted image gets exactly the pixels (16-bit, grey, alpha rules included)
and therefore the decision that predict.py gives the same file.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from patchae.data import load_rgb
from patchae.errors import PatchAEError

# The decoders a station accepts (the image types training and predict.py read); PIL's other formats stay shut.
FORMATS = {"PNG": "png", "JPEG": "jpg", "TIFF": "tif", "BMP": "bmp", "WEBP": "webp"}
RAW_TYPES = {
    "application/octet-stream",
    *(f"image/{name}" for name in ("png", "jpeg", "jpg", "tiff", "bmp", "webp")),
}
MULTIPART = "multipart/form-data"
SEND_HINT = "post the file as the body (-H 'Content-Type: image/png' --data-binary @part.png) or as a form (-F file=@part.png)"


class Refused(Exception):
    """A request the station answers with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int
    max_pixels: int
    timeout_s: float


@dataclass
class DecodedImage:
    image: Image.Image  # 8-bit RGB, as load_rgb reads the same file
    body: bytes
    sha256: str
    extension: str  # of the stored input: png, jpg, tif, bmp, webp


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def check_content_type(request: Request) -> None:
    """Raw image bodies, ``application/octet-stream``, a multipart form, or no type at all are accepted."""
    kind = media_type(request)
    if kind and kind != MULTIPART and kind not in RAW_TYPES:
        raise Refused(415, f"Content-Type {kind} is not an image; {SEND_HINT}")


async def read_upload(request: Request, limits: UploadLimits) -> bytes:
    """The image bytes of the request (the raw body, or the first file of a multipart form)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
        raise Refused(413, too_large(int(declared), limits.max_bytes))
    try:
        return await asyncio.wait_for(_read(request, limits.max_bytes), limits.timeout_s)
    except TimeoutError:
        raise Refused(
            408,
            f"the upload took over {limits.timeout_s:g} s (upload_timeout_s); send the whole image at once",
        ) from None
    except ClientDisconnect:
        raise Refused(400, "the client went away before the whole body arrived; send it again") from None


async def _read(request: Request, max_bytes: int) -> bytes:
    stream = _limited(request, max_bytes)
    if media_type(request) == MULTIPART:
        return await _form_file(request, stream)
    return b"".join([chunk async for chunk in stream])


async def _limited(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    """The body's chunks, refused as soon as they add up to more than ``max_bytes`` (chunked bodies too)."""
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise Refused(413, too_large(received, max_bytes, at_least=True))
        yield chunk


async def _form_file(request: Request, stream: AsyncIterator[bytes]) -> bytes:
    parser = MultiPartParser(request.headers, stream, max_files=1, max_fields=8)  # type: ignore[arg-type]
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise Refused(
            400, f"bad multipart form ({error.message}); send one file: -F file=@part.png"
        ) from None
    try:
        upload = next((value for _, value in form.multi_items() if isinstance(value, UploadFile)), None)
        if upload is None:
            raise Refused(400, "the multipart form holds no file; send one: -F file=@part.png")
        return await upload.read()
    finally:
        await form.close()


def too_large(size: int, max_bytes: int, at_least: bool = False) -> str:
    over = "over " if at_least else ""
    return (
        f"the upload is {over}{size / 2**20:.1f} MB, above max_upload_mb={max_bytes / 2**20:g}; "
        "send a smaller image or raise max_upload_mb"
    )


def decode(body: bytes, max_pixels: int) -> DecodedImage:
    """Check the header (format, pixel count) before decoding anything, then decode as predict.py does."""
    if not body:
        raise Refused(400, f"the body is empty; {SEND_HINT}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own pixel limit decides below
        try:
            with Image.open(io.BytesIO(body), formats=list(FORMATS)) as header:
                width, height, kind = header.width, header.height, header.format
        except Image.DecompressionBombError as error:  # PIL's own limit (~179 Mpx) refuses before ours
            found = re.search(r"\((\d+) pixels\)", str(error))
            size = f"{int(found.group(1)) / 1e6:.0f} megapixels" if found else "over PIL's pixel limit"
            raise Refused(413, too_many_pixels(size, max_pixels)) from None
        except UnidentifiedImageError:
            raise Refused(422, f"the body is not a PNG, JPEG, TIFF, BMP or WebP image; {SEND_HINT}") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise Refused(
                422, f"the image header cannot be read ({_first_line(error)}); send the whole, undamaged file"
            ) from None
    if width * height > max_pixels:
        raise Refused(
            413, too_many_pixels(f"{width} x {height} = {width * height / 1e6:.0f} megapixels", max_pixels)
        )
    try:
        image = load_rgb(io.BytesIO(body))
    except PatchAEError as error:
        reason = _first_line(error.__cause__) if error.__cause__ is not None else "undecodable"
        raise Refused(
            422, f"the {kind} image cannot be decoded ({reason}); send the whole, undamaged file"
        ) from None
    return DecodedImage(image, body, hashlib.sha256(body).hexdigest(), FORMATS[kind])


def too_many_pixels(size: str, max_pixels: int) -> str:
    return f"the image is {size}, above max_megapixels={max_pixels / 1e6:g}; downscale it or raise max_megapixels"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
