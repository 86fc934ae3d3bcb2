"""Open untrusted image files so that decoding them cannot exhaust memory or crash.

Every failure becomes a :class:`~aiserver.errors.ServiceError` naming the request field:

* only the JPEG (incl. MPO), PNG, GIF, BMP, TIFF, WebP and AVIF decoders are tried;
  anything else is INVALID_ARGUMENT ``IMAGE_UNREADABLE`` (``EMPTY_IMAGE`` for 0 bytes);
* pixel and frame counts are checked from the header before any pixel is decoded:
  RESOURCE_EXHAUSTED ``IMAGE_TOO_MANY_PIXELS`` / ``IMAGE_TOO_MANY_FRAMES``. Pillow's own
  decompression-bomb error and warning are reported the same way;
* truncated or corrupt pixel data found while decoding is INVALID_ARGUMENT
  ``IMAGE_TRUNCATED`` / ``IMAGE_CORRUPT``.
"""

from __future__ import annotations

import functools
import importlib
import io
import os
import re
import struct
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, TypeAlias

from PIL import ExifTags, Image, ImageFile, PngImagePlugin, UnidentifiedImageError

from aiserver.errors import ErrorKind, ServiceError
from aiserver.imaging._errors import field_error
from aiserver.imaging.formats import OutputFormat, available_formats, format_for_pillow
from aiserver.imaging.limits import ImageLimits

__all__ = [
    "HeldImage",
    "ImageInfo",
    "ImageSource",
    "check_frame_size",
    "exif_orientation",
    "open_image",
    "open_image_with_info",
    "probe",
]


class HeldImage(Protocol):
    """An image's bytes held in memory in pieces, read as a file
    (``aiserver.spool_memory.HeldBytes``: an upload that was never written to disk)."""

    @property
    def size(self) -> int: ...

    def open(self, mode: str = "rb") -> IO[bytes]: ...


ImageSource: TypeAlias = "Path | bytes | HeldImage"
"""What an image is read from: a file, its bytes, or bytes held in pieces."""

# Pillow ids whose frames form an animation; MPO/TIFF extra frames are other pictures.
_ANIMATED_SOURCES = frozenset({"GIF", "PNG", "WEBP", "AVIF"})
_PLUGIN_MODULES = {
    "JPEG": "JpegImagePlugin",
    "PNG": "PngImagePlugin",
    "GIF": "GifImagePlugin",
    "BMP": "BmpImagePlugin",
    "TIFF": "TiffImagePlugin",
    "WEBP": "WebPImagePlugin",
    "AVIF": "AvifImagePlugin",
}
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})

# What malformed input makes Pillow raise while parsing or decoding. TypeError is only
# expected from header parsing, so it is not masked once the caller's code runs.
_DECODE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    ZeroDivisionError,
    OverflowError,
)
_OPEN_ERRORS: tuple[type[Exception], ...] = (*_DECODE_ERRORS, TypeError)


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the header says about an image; sizes are after EXIF orientation."""

    format: OutputFormat | None
    """Registry entry of the source format (MPO is reported as ``jpg``)."""
    pil_format: str
    width: int
    height: int
    mode: str
    frame_count: int
    animated: bool
    """True when the frames form an animation (GIF, APNG, animated WebP/AVIF)."""
    has_alpha: bool
    has_icc_profile: bool
    orientation: int
    """EXIF orientation 1..8; 5..8 swap width and height."""

    @property
    def mime_type(self) -> str:
        """MIME type of the source (``image/jpeg`` for MPO)."""
        return self.format.mime_type if self.format else "application/octet-stream"


@functools.cache
def _pillow_formats() -> tuple[str, ...]:
    ids = tuple(f.pil_format for f in available_formats())
    # Register exactly these decoders up front, instead of Pillow importing every plugin
    # lazily (and concurrently) on first use. MPO files are opened by the JPEG decoder.
    for pil_id in ids:
        importlib.import_module(f"PIL.{_PLUGIN_MODULES[pil_id]}")
    return ids


# --- Pillow decompression-bomb warnings -------------------------------------------------
# Pillow warns (rather than raises) between MAX_IMAGE_PIXELS and twice that, also while
# seeking GIF frames. The warning filter is process state before Python 3.14's
# context-aware warnings, so concurrent workers share one reference-counted
# catch_warnings(): nested enter/exit pairs from different threads would otherwise
# restore each other's filters.
_guard_lock = threading.Lock()
_guard_users = 0
_guard_cm: warnings.catch_warnings[None] | None = None


@contextmanager
def _bomb_warnings_raise() -> Iterator[None]:
    global _guard_users, _guard_cm  # noqa: PLW0603 - process-wide by nature, see above
    if getattr(sys.flags, "context_aware_warnings", False):
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
        return
    with _guard_lock:
        if _guard_users == 0:
            cm = warnings.catch_warnings()
            cm.__enter__()
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            _guard_cm = cm
        _guard_users += 1
    try:
        yield
    finally:
        with _guard_lock:
            _guard_users -= 1
            if _guard_users == 0 and _guard_cm is not None:
                _guard_cm.__exit__(None, None, None)
                _guard_cm = None


# --- header peeking -----------------------------------------------------------------------
# Some decoders allocate their canvas while Pillow is still opening the file (WebP), and
# Pillow's own bomb check fires before ours with no size attached. Reading the size from
# fixed header offsets first lets our limit apply first, with a useful error.


def _peek_size(fp: IO[bytes]) -> tuple[int, int] | None:
    fp.seek(0)
    head = fp.read(32)
    size: tuple[int, int] | None = None
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        size = struct.unpack(">II", head[16:24])
    elif head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        size = struct.unpack("<HH", head[6:10])
    elif head.startswith(b"BM") and len(head) >= 26:
        if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2 core header
            size = struct.unpack("<HH", head[18:22])
        else:
            w, h = struct.unpack("<ii", head[18:26])
            size = abs(w), abs(h)  # negative height means top-down rows
    elif head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        size = _peek_webp(head)
    elif head.startswith(b"\xff\xd8"):
        size = _peek_jpeg(fp)
    fp.seek(0)
    return size


def _peek_webp(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8X" and len(head) >= 30:
        w = int.from_bytes(head[24:27], "little") + 1
        h = int.from_bytes(head[27:30], "little") + 1
        return w, h
    if chunk == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", head[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


# Start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) do not.
_SOF_MARKERS = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)


def _peek_jpeg(fp: IO[bytes]) -> tuple[int, int] | None:
    fp.seek(2)
    for _ in range(256):  # segments before SOF are few; give up on pathological files
        byte = fp.read(1)
        while byte == b"\xff":
            byte = fp.read(1)  # fill bytes
        if not byte:
            return None
        marker = byte[0]
        if marker == 0xDA:  # scan data before any frame header
            return None
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            continue
        raw = fp.read(2)
        if len(raw) < 2:
            return None
        length = struct.unpack(">H", raw)[0]
        if length < 2:
            return None
        if marker in _SOF_MARKERS:
            body = fp.read(5)
            if len(body) < 5:
                return None
            h, w = struct.unpack(">HH", body[1:5])
            return w, h
        fp.seek(length - 2, os.SEEK_CUR)
        if fp.read(1) != b"\xff":
            return None
    return None


# --- errors -----------------------------------------------------------------------------


def _too_many_pixels(
    field: str, limits: ImageLimits, size: tuple[int, int] | None, pixels: int | None = None
) -> ServiceError:
    meta: dict[str, object] = {"limit": limits.max_pixels}
    if size is not None:
        meta |= {"width": size[0], "height": size[1]}
        pixels = size[0] * size[1]
        what = f"{size[0]}x{size[1]} = {pixels} pixels"
    else:
        what = f"{pixels} pixels" if pixels is not None else "too many pixels"
    if pixels is not None:
        meta["pixels"] = pixels
    return field_error(
        ErrorKind.RESOURCE_EXHAUSTED,
        field,
        "IMAGE_TOO_MANY_PIXELS",
        f"image is {what}; the limit is {limits.max_pixels} pixels per frame",
        **meta,
    )


def _bomb_error(
    exc: BaseException, field: str, limits: ImageLimits, size: tuple[int, int] | None
) -> ServiceError:
    match = re.search(r"\((\d+) pixels\)", str(exc))
    return _too_many_pixels(field, limits, size, int(match[1]) if match else None)


def _decode_error(exc: BaseException, field: str) -> ServiceError:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, EOFError) or "truncated" in text.lower():
        return field_error(
            ErrorKind.INVALID_ARGUMENT, field, "IMAGE_TRUNCATED", f"image data is truncated: {text}"
        )
    return field_error(
        ErrorKind.INVALID_ARGUMENT, field, "IMAGE_CORRUPT", f"image data is corrupt: {text}"
    )


def _check_pixels(size: tuple[int, int], limits: ImageLimits, field: str) -> None:
    if size[0] * size[1] > limits.max_pixels:
        raise _too_many_pixels(field, limits, size)


def check_frame_size(size: tuple[int, int], limits: ImageLimits, field: str) -> None:
    """Re-check a frame after seeking: GIF frames may grow the canvas."""
    _check_pixels(size, limits, field)


# --- opening ----------------------------------------------------------------------------


def _open_file(path: ImageSource, field: str) -> IO[bytes]:
    if isinstance(path, bytes):  # an upload held in memory
        if not path:
            raise field_error(ErrorKind.INVALID_ARGUMENT, field, "EMPTY_IMAGE", "image is empty")
        return io.BytesIO(path)
    if not isinstance(path, Path):  # held in memory in pieces
        if not path.size:
            raise field_error(ErrorKind.INVALID_ARGUMENT, field, "EMPTY_IMAGE", "image is empty")
        return path.open("rb")
    try:
        fp = path.open("rb")
    except FileNotFoundError as exc:
        raise field_error(
            ErrorKind.NOT_FOUND, field, "IMAGE_NOT_FOUND", "image file does not exist"
        ) from exc
    except OSError as exc:
        raise field_error(
            ErrorKind.INTERNAL, field, "IMAGE_READ_FAILED", f"cannot read image: {exc}"
        ) from exc
    if os.fstat(fp.fileno()).st_size == 0:
        fp.close()
        raise field_error(ErrorKind.INVALID_ARGUMENT, field, "EMPTY_IMAGE", "image is empty")
    return fp


def _identify(
    fp: IO[bytes], field: str, limits: ImageLimits, peeked: tuple[int, int] | None
) -> ImageFile.ImageFile:
    accepted = ", ".join(f.name for f in available_formats())
    try:
        return Image.open(fp, formats=list(_pillow_formats()))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(exc, field, limits, peeked) from exc
    except UnidentifiedImageError as exc:
        raise field_error(
            ErrorKind.INVALID_ARGUMENT,
            field,
            "IMAGE_UNREADABLE",
            f"not an image in a supported format ({accepted})",
        ) from exc
    except _OPEN_ERRORS as exc:
        # A decoder recognised the signature, then failed: a damaged file, not a non-image.
        raise _decode_error(exc, field) from exc


def exif_orientation(image: Image.Image) -> int:
    """EXIF orientation (1..8) known before decoding; 1 when absent or malformed.

    PNG's ``getexif`` decodes the whole image to look for a trailing eXIf chunk, so for PNG
    only metadata that precedes the pixel data is used (the base implementation).
    """
    try:
        if isinstance(image, PngImagePlugin.PngImageFile):
            exif = Image.Image.getexif(image)
        else:
            exif = image.getexif()
        value = exif.get(ExifTags.Base.Orientation, 1)
    except Exception:  # malformed EXIF is ignored, as viewers do
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _inspect(im: ImageFile.ImageFile, limits: ImageLimits, field: str) -> ImageInfo:
    _check_pixels(im.size, limits, field)
    pil_format = im.format or ""
    frames = int(getattr(im, "n_frames", 1))  # header walk for GIF/TIFF, no decoding
    animated = frames > 1 and pil_format in _ANIMATED_SOURCES
    if animated:
        if frames > limits.max_frames:
            raise field_error(
                ErrorKind.RESOURCE_EXHAUSTED,
                field,
                "IMAGE_TOO_MANY_FRAMES",
                f"animation has {frames} frames; the limit is {limits.max_frames}",
                frames=frames,
                limit=limits.max_frames,
            )
        total = frames * im.size[0] * im.size[1]
        if total > limits.max_total_pixels:
            raise field_error(
                ErrorKind.RESOURCE_EXHAUSTED,
                field,
                "IMAGE_TOO_MANY_PIXELS",
                f"animation is {frames} frames of {im.size[0]}x{im.size[1]} = {total} pixels;"
                f" the limit is {limits.max_total_pixels}",
                width=im.size[0],
                height=im.size[1],
                frames=frames,
                pixels=total,
                limit=limits.max_total_pixels,
            )
    orientation = exif_orientation(im)
    width, height = im.size if orientation < 5 else im.size[::-1]
    return ImageInfo(
        format=format_for_pillow(pil_format),
        pil_format=pil_format,
        width=width,
        height=height,
        mode=im.mode,
        frame_count=frames,
        animated=animated,
        has_alpha=im.mode in _ALPHA_MODES or "transparency" in im.info,
        has_icc_profile=bool(im.info.get("icc_profile")),
        orientation=orientation,
    )


@contextmanager
def open_image_with_info(
    path: ImageSource, limits: ImageLimits, field: str = "image"
) -> Iterator[tuple[ImageFile.ImageFile, ImageInfo]]:
    """Open ``path`` (a file, or the image's bytes) and yield the lazily-decoded image with
    its checked header info.

    Pillow errors raised inside the ``with`` block (decoding, seeking, cropping) are turned
    into ``IMAGE_TRUNCATED``/``IMAGE_CORRUPT``/``IMAGE_TOO_MANY_PIXELS`` on ``field``, so
    encode the result outside the block or wrap encoder errors in a ServiceError first.
    """
    peeked: tuple[int, int] | None = None
    with _bomb_warnings_raise(), _open_file(path, field) as fp:
        try:
            peeked = _peek_size(fp)
            if peeked is not None:
                _check_pixels(peeked, limits, field)
        except OSError as exc:
            raise _decode_error(exc, field) from exc
        im = _identify(fp, field, limits, peeked)
        try:
            info = _inspect(im, limits, field)
            yield im, info
        except ServiceError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _bomb_error(exc, field, limits, None) from exc
        except _DECODE_ERRORS as exc:
            raise _decode_error(exc, field) from exc
        finally:
            im.close()


@contextmanager
def open_image(
    path: ImageSource, limits: ImageLimits, field: str = "image"
) -> Iterator[ImageFile.ImageFile]:
    """Like :func:`open_image_with_info`, yielding only the image."""
    with open_image_with_info(path, limits, field) as (im, _info):
        yield im


def probe(path: Path, limits: ImageLimits, field: str = "image") -> ImageInfo:
    """Read and check an image's header without decoding its pixels."""
    with open_image_with_info(path, limits, field) as (_im, info):
        return info
