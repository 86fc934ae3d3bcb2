"""Exactly-2x upscaling of one image with a Real-ESRGAN network, tile by tile.

Blocking code, meant for worker threads; the provider drives it one tile per call so that
progress and cancellation happen between tiles.

* **Tiles.** The input is cut into a grid of near-equal tiles of at most ``tile_size``
  pixels a side. Each is upscaled together with ``overlap`` pixels of context on every side
  (the image itself is mirrored by ``overlap`` at its borders), and only the tile's own area
  of the result is kept: tiles meet without seams and a tiled result matches an untiled one.
* **Scale.** Networks of another native scale (the 4x models) are brought to exactly 2x
  per tile with Lanczos, still including the context, so the filter never sees a tile edge.
* **Pixels.** Input to the network is RGB in 0..1; its output is clamped to 0..1 and
  rounded to 8 bits. Any mode is accepted: palette, 1-bit, CMYK (through its ICC profile),
  16-bit and float greys are converted as the transforms do; grey inputs give grey
  results. Alpha is enlarged apart from the colour (Lanczos, or the network on alpha as a
  grey image) and put back. EXIF orientation is applied, as for the other tasks.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image

from aiserver.errors import ErrorKind, FieldViolation, ServiceError
from aiserver.imaging import ImageLimits, exif_orientation, open_image

# The conversion rules the transforms apply (CMYK via ICC, 16-bit scaling, palettes).
from aiserver.imaging._pixels import icc_fits, icc_of, working_mode

__all__ = [
    "SCALE",
    "Network",
    "Source",
    "Tile",
    "TiledPass",
    "assemble",
    "decode",
    "encode_png",
    "plan_tiles",
    "source_from_image",
    "upscale_image",
]

SCALE = 2
"""What every result is: exactly twice the input's width and height."""

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]


class Network(Protocol):
    """What the tiler needs of a model (``RealEsrganNet`` is one)."""

    @property
    def scale(self) -> int: ...

    @property
    def context(self) -> int:
        """The tile overlap the network needs."""
        ...

    def run(self, chw: F32) -> F32: ...


@dataclass(slots=True)
class Source:
    """A decoded input, ready to upscale."""

    rgb: U8
    """``(height, width, 3)``; grey inputs are replicated into three channels."""
    alpha: U8 | None
    """``(height, width)``, or None when the input has no alpha."""
    grey: bool
    icc: bytes | None = None
    """A profile to attach to the result (only one that matches the result's colours)."""

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


@dataclass(frozen=True, slots=True)
class Tile:
    """A rectangle of input pixels: ``x0 <= x < x1``, ``y0 <= y < y1``."""

    x0: int
    y0: int
    x1: int
    y1: int


def _too_large(field_name: str, width: int, height: int, limit: int) -> ServiceError:
    message = (
        f"image is {width}x{height} = {width * height} pixels; the local upscaler takes at"
        f" most {limit}"
    )
    return ServiceError(
        ErrorKind.RESOURCE_EXHAUSTED,
        "IMAGE_TOO_LARGE_TO_UPSCALE",
        message,
        violations=(FieldViolation(field_name, message),),
        metadata={
            "field": field_name,
            "width": str(width),
            "height": str(height),
            "limit": str(limit),
        },
    )


def _output_too_large(field_name: str, width: int, height: int, limit: int) -> ServiceError:
    message = (
        f"a {width}x{height} image would become {width * SCALE}x{height * SCALE}; the"
        f" largest side allowed is {limit}"
    )
    return ServiceError(
        ErrorKind.RESOURCE_EXHAUSTED,
        "OUTPUT_TOO_LARGE",
        message,
        violations=(FieldViolation(field_name, message),),
        metadata={"field": field_name, "limit": str(limit)},
    )


def decode(path: Path | bytes, limits: ImageLimits, field_name: str, max_pixels: int) -> Source:
    """Open an untrusted image (a file, or its bytes) safely and bring it to a
    :class:`Source`."""
    with open_image(path, limits, field_name) as im:
        width, height = im.size
        if width * height > max_pixels:
            raise _too_large(field_name, width, height, max_pixels)
        if max(width, height) * SCALE > limits.max_output_side:
            raise _output_too_large(field_name, width, height, limits.max_output_side)
        orientation = exif_orientation(im)
        icc = icc_of(im)
        im.load()
        img = working_mode(im, field_name)
        if orientation in _TRANSPOSE:
            img = img.transpose(_TRANSPOSE[orientation])
        return source_from_image(img, icc=icc)


def source_from_image(img: Image.Image, *, icc: bytes | None = None) -> Source:
    """A :class:`Source` from an image in any mode (no EXIF orientation is applied)."""
    if img.mode not in ("L", "LA", "RGB", "RGBA"):
        img = working_mode(img, "image")
    grey = img.mode in ("L", "LA")
    alpha = np.asarray(img.getchannel("A"), dtype=np.uint8) if img.mode.endswith("A") else None
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    keep = icc if icc_fits(icc, "L" if grey else "RGB") else None
    return Source(rgb=rgb, alpha=alpha, grey=grey, icc=keep)


def plan_tiles(width: int, height: int, tile_size: int) -> list[Tile]:
    """A row-major grid of near-equal tiles, each at most ``tile_size`` a side."""
    if width < 1 or height < 1 or tile_size < 1:
        raise ValueError("sizes must be positive")

    def cuts(length: int) -> list[int]:
        count = math.ceil(length / tile_size)
        return [length * i // count for i in range(count + 1)]

    xs, ys = cuts(width), cuts(height)
    return [
        Tile(xs[i], ys[j], xs[i + 1], ys[j + 1])
        for j in range(len(ys) - 1)
        for i in range(len(xs) - 1)
    ]


def _to_scale(chw: F32, width: int, height: int) -> F32:
    """Resample each channel to ``width`` x ``height`` with Lanczos (float precision)."""
    planes = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(plane)).resize(
                (width, height), Image.Resampling.LANCZOS
            ),
            dtype=np.float32,
        )
        for plane in chw
    ]
    return np.stack(planes)


@dataclass(slots=True)
class TiledPass:
    """Upscales one 3-channel 8-bit image tile by tile into :attr:`out`.

    Tiles may be run in any order, each exactly once, from any thread.
    """

    net: Network
    pixels: U8
    """``(height, width, 3)``"""
    tiles: list[Tile]
    overlap: int
    out: U8 = field(init=False)
    """``(2 * height, 2 * width, 3)``: the result, complete once every tile has run."""
    _padded: U8 = field(init=False)

    def __post_init__(self) -> None:
        p = self.overlap
        height, width = self.pixels.shape[:2]
        self._padded = np.pad(self.pixels, ((p, p), (p, p), (0, 0)), mode="reflect")
        self.out = np.empty((height * SCALE, width * SCALE, 3), dtype=np.uint8)

    def run(self, index: int) -> None:
        """Upscale tile ``index`` (blocking; ncnn releases the GIL meanwhile)."""
        tile, p = self.tiles[index], self.overlap
        # In padded coordinates the tile starts at (x0 + p, y0 + p): the window with its
        # context therefore starts at (x0, y0).
        window = self._padded[tile.y0 : tile.y1 + 2 * p, tile.x0 : tile.x1 + 2 * p]
        chw = np.ascontiguousarray(window.transpose(2, 0, 1), dtype=np.float32)
        chw *= np.float32(1 / 255)
        result = self.net.run(chw)
        win_h, win_w = window.shape[:2]
        if self.net.scale != SCALE:
            result = _to_scale(result, win_w * SCALE, win_h * SCALE)
        m = p * SCALE
        core = result[:, m : m + (tile.y1 - tile.y0) * SCALE, m : m + (tile.x1 - tile.x0) * SCALE]
        core = np.clip(core, 0.0, 1.0)
        core *= np.float32(255)
        core += np.float32(0.5)
        self.out[tile.y0 * SCALE : tile.y1 * SCALE, tile.x0 * SCALE : tile.x1 * SCALE] = (
            core.astype(np.uint8).transpose(1, 2, 0)
        )


def resize_alpha(alpha: U8) -> U8:
    height, width = alpha.shape
    enlarged = Image.fromarray(alpha).resize(
        (width * SCALE, height * SCALE), Image.Resampling.LANCZOS
    )
    return np.asarray(enlarged, dtype=np.uint8)


def alpha_pass(net: Network, source: Source, tile_size: int, overlap: int) -> TiledPass | None:
    """A pass that runs the network on the alpha channel, or None when alpha is absent or
    constant (then :func:`resize_alpha` is exact)."""
    alpha = source.alpha
    if alpha is None or int(alpha.min()) == int(alpha.max()):
        return None
    grey = np.repeat(alpha[:, :, np.newaxis], 3, axis=2)
    return TiledPass(net, grey, plan_tiles(source.width, source.height, tile_size), overlap)


def alpha_from_pass(done: TiledPass) -> U8:
    total: npt.NDArray[np.uint16] = done.out.sum(axis=2, dtype=np.uint16)
    return ((total + 1) // 3).astype(np.uint8)


def assemble(source: Source, rgb: U8, alpha: U8 | None) -> Image.Image:
    """The result image: L, LA, RGB or RGBA like the (converted) input."""
    img = Image.fromarray(rgb)
    if source.grey:
        img = img.convert("L")
    if alpha is not None:
        img.putalpha(Image.fromarray(alpha))
    return img


def encode_png(img: Image.Image, icc: bytes | None, compress_level: int = 6) -> bytes:
    buffer = io.BytesIO()
    params: dict[str, object] = {"compress_level": compress_level}
    if icc:
        params["icc_profile"] = icc
    try:
        img.save(buffer, format="PNG", **params)
    except (OSError, ValueError) as exc:
        message = f"cannot encode png: {exc}"
        raise ServiceError(ErrorKind.INTERNAL, "ENCODE_FAILED", message) from exc
    return buffer.getvalue()


def upscale_image(
    img: Image.Image,
    net: Network,
    *,
    tile_size: int = 256,
    overlap: int | None = None,
    alpha_mode: str = "resize",
    on_tile: Callable[[int, int], None] | None = None,
) -> Image.Image:
    """All of it, synchronously: ``img`` (any mode) to exactly twice its size.

    ``on_tile(done, total)`` is called after each tile; ``overlap`` defaults to the
    network's context.
    """
    if overlap is None:
        overlap = net.context
    source = source_from_image(img)
    colour = TiledPass(net, source.rgb, plan_tiles(source.width, source.height, tile_size), overlap)
    extra = alpha_pass(net, source, tile_size, overlap) if alpha_mode == "model" else None
    passes = [colour] if extra is None else [colour, extra]
    total = sum(len(p.tiles) for p in passes)
    finished = 0
    for tiled in passes:
        for index in range(len(tiled.tiles)):
            tiled.run(index)
            finished += 1
            if on_tile is not None:
                on_tile(finished, total)
    if extra is not None:
        alpha: U8 | None = alpha_from_pass(extra)
    else:
        alpha = None if source.alpha is None else resize_alpha(source.alpha)
    return assemble(source, colour.out, alpha)
