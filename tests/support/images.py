"""Test images made on the fly with Pillow."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

# Four distinct quadrant colours: crops and conversions can be checked by colour.
QUADRANTS = ((220, 30, 30), (30, 200, 40), (40, 60, 210), (240, 220, 40))


def quadrant_image(width: int = 64, height: int = 48, mode: str = "RGB") -> Image.Image:
    im = Image.new("RGB", (width, height))
    hw, hh = width // 2, height // 2
    for i, colour in enumerate(QUADRANTS):
        x0, y0 = (i % 2) * hw, (i // 2) * hh
        im.paste(colour, (x0, y0, x0 + hw, y0 + hh))
    return im.convert(mode) if mode != "RGB" else im


def encode(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims a huge size (its data is never valid for that size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    raw = zlib.compress(b"\x00" * 64)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def mean_colour(im: Image.Image, box: tuple[int, int, int, int]) -> tuple[float, ...]:
    from PIL import ImageStat

    return tuple(ImageStat.Stat(im.convert("RGB").crop(box)).mean)


def close(a: tuple[float, ...], b: tuple[float, ...], tol: float) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))
