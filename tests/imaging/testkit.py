"""Helpers shared by the imaging tests: synthetic images and assertions."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageStat

from aiserver.errors import ErrorKind, ServiceError
from aiserver.imaging import OutputFormat, available_formats, parse_format

# Top-left, top-right, bottom-left, bottom-right: far apart so lossy codecs keep them apart.
BLOCK_COLOURS = ((220, 30, 30), (30, 200, 40), (30, 60, 220), (240, 220, 40))
FORMAT_NAMES = [f.name for f in available_formats()]
LOSSLESS = {f.name for f in available_formats() if not f.lossy}


def fmt(name: str) -> OutputFormat:
    return parse_format(name, "params.format")


def blocks(size: tuple[int, int] = (64, 48), mode: str = "RGB") -> Image.Image:
    """A 2x2 grid of BLOCK_COLOURS."""
    w, h = size
    img = Image.new("RGB", size)
    for (x, y), colour in zip(((0, 0), (1, 0), (0, 1), (1, 1)), BLOCK_COLOURS, strict=True):
        img.paste(colour, (x * w // 2, y * h // 2, (x + 1) * w // 2, (y + 1) * h // 2))
    return img.convert(mode)


def noise(size: tuple[int, int] = (256, 256), seed: int = 0) -> Image.Image:
    rnd = random.Random(seed)
    return Image.frombytes("RGB", size, rnd.randbytes(size[0] * size[1] * 3))


def save(img: Image.Image, path: Path, format_name: str, **params: Any) -> Path:
    target = fmt(format_name)
    if target.lossy:
        params.setdefault("quality", 95)
    img.save(path, target.pil_format, **params)
    return path


def encode(img: Image.Image, pil_format: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, pil_format, **params)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    """Open and fully load encoded bytes (first frame)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def frames_of(data: bytes) -> list[tuple[Image.Image, dict[str | tuple[int, int], Any]]]:
    """Every frame as RGBA with its info (duration is only known after load)."""
    img = Image.open(io.BytesIO(data))
    out = []
    for index in range(getattr(img, "n_frames", 1)):
        img.seek(index)
        img.load()
        out.append((img.convert("RGBA"), dict(img.info)))
    return out


def mean(img: Image.Image, box: tuple[int, int, int, int]) -> tuple[float, ...]:
    return tuple(ImageStat.Stat(img.convert("RGB").crop(box)).mean)


def assert_colour(
    actual: tuple[float, ...], expected: tuple[float, ...], tolerance: float = 12
) -> None:
    assert all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True)), (
        actual,
        expected,
    )


def quadrant_means(img: Image.Image, inset: int = 3) -> list[tuple[float, ...]]:
    """Mean colour inside each quadrant (TL, TR, BL, BR), away from the edges."""
    w, h = img.size
    boxes = [
        (0, 0, w // 2, h // 2),
        (w // 2, 0, w, h // 2),
        (0, h // 2, w // 2, h),
        (w // 2, h // 2, w, h),
    ]
    return [mean(img, (x0 + inset, y0 + inset, x1 - inset, y1 - inset)) for x0, y0, x1, y1 in boxes]


@contextmanager
def raises_service_error(
    kind: ErrorKind, reason: str, *fields: str
) -> Iterator[pytest.ExceptionInfo[ServiceError]]:
    """Expect a ServiceError with this kind/reason whose violations name ``fields``."""
    with pytest.raises(ServiceError) as info:
        yield info
    error = info.value
    assert (error.kind, error.reason) == (kind, reason), str(error)
    if fields:
        assert {v.field for v in error.violations} == set(fields), error.violations
