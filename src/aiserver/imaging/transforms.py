"""Crop, convert and resize image files; each call returns the encoded result.

Encoding rules shared by every transform:

* **Orientation.** EXIF orientation (read from metadata that precedes the pixel data) is
  applied, so sizes and crop rectangles are in the image as viewers show it. Outputs carry
  no EXIF, XMP or other metadata, hence no orientation tag.
* **Colour profiles.** The ICC profile is kept when the target format stores one (jpg,
  png, webp, tiff, avif) and the pixels stay in the profile's colour space. CMYK images
  are converted to sRGB through their profile (when LittleCMS is available) and written
  without a profile; a grey profile is dropped when grey pixels become RGB (webp, avif).
* **Quality.** 1..100, default 90; used by the lossy formats (jpg, webp, avif) and ignored
  by the lossless ones. Out-of-range values are rejected for every format.
* **Alpha.** Kept where the format has it (png, webp, avif, tiff; gif as on/off at 50%).
  jpg and bmp get transparent pixels composited onto white.
* **Modes.** 1-bit becomes greyscale, palette becomes RGB(A), CMYK/YCbCr/LAB become RGB,
  16/32-bit integer and float greyscale are scaled to 8 bits. GIF output is palettized
  (median cut, no dithering, up to 256 colours with one reserved for transparency).
* **Animation.** GIF, APNG and animated WebP/AVIF inputs keep every frame, with their
  durations and loop count, when the target animates (gif, webp, png); each frame is
  cropped or resized the same way. Other targets get the first frame.
* **Sizes.** ``resize`` never enlarges with ``contain`` (the default) or when only one
  side is given; ``cover`` and ``fill`` always produce exactly the requested box.

All functions are synchronous and thread-safe: call them from worker threads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile

from aiserver.errors import ErrorKind
from aiserver.imaging._encoding import Frames, encode_frames
from aiserver.imaging._errors import field_error, fields_error
from aiserver.imaging._pixels import for_target, icc_fits, icc_of, working_mode
from aiserver.imaging.formats import OutputFormat
from aiserver.imaging.limits import DEFAULT_LIMITS, ImageLimits
from aiserver.imaging.safe_open import (
    ImageInfo,
    ImageSource,
    check_frame_size,
    open_image_with_info,
)

__all__ = [
    "DEFAULT_QUALITY",
    "FITS",
    "EncodedImage",
    "apply_jpeg_draft",
    "convert",
    "crop",
    "resize",
    "verify",
]

DEFAULT_QUALITY = 90
FITS = ("contain", "cover", "fill")

# Decode JPEGs at the smallest DCT scale (1/2, 1/4, 1/8) that still covers the output: a
# scaled decode averages each block, as the box reduce() before Lanczos would, at a fraction
# of the cost (12 MP -> 256 px decodes 1/8, 500x375, then one Lanczos pass of about 2x).
_DRAFT_GAP = 1.0
# Resize first shrinks by an integer factor with a box filter while the source is at least
# this many times larger than needed; only the last step pays for Lanczos.
_REDUCING_GAP = 3.0
_DEFAULT_DURATION_MS = 100

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

Box = tuple[float, float, float, float]


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """An encoded output image."""

    data: bytes
    format: OutputFormat
    width: int
    height: int
    frame_count: int = 1


@dataclass(frozen=True, slots=True)
class _Plan:
    """Geometry in oriented, full-resolution source coordinates."""

    size: tuple[int, int]
    region: Box | None = None
    """Source rectangle to keep; None is the whole image."""
    resample: bool = False
    """Scale ``region`` to ``size``; otherwise ``region`` already has that size."""


# --- public transforms ------------------------------------------------------------------


def crop(
    path: ImageSource,
    *,
    x: int,
    y: int,
    width: int,
    height: int,
    output_format: OutputFormat | None = None,
    quality: int | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    image_field: str = "image",
) -> EncodedImage:
    """Cut the rectangle at ``(x, y)`` out of the (EXIF-oriented) image.

    The output format defaults to the input's. Errors: INVALID_ARGUMENT ``INVALID_CROP``
    for a width/height below 1, ``CROP_OUT_OF_BOUNDS`` when the rectangle leaves the image.
    """
    bad = [
        (f"params.{name}", f"{name} must be at least 1, got {value}")
        for name, value in (("width", width), ("height", height))
        if value < 1
    ]
    if bad:
        raise fields_error(
            ErrorKind.INVALID_ARGUMENT, "INVALID_CROP", "; ".join(d for _, d in bad), bad
        )
    _check_quality(quality)

    def plan(info: ImageInfo) -> _Plan:
        w, h = info.width, info.height
        out: list[tuple[str, str]] = []
        if not 0 <= x < w:
            out.append(("params.x", f"x must be between 0 and {w - 1}, got {x}"))
        elif x + width > w:
            out.append(("params.width", f"x + width must be at most {w}, got {x + width}"))
        if not 0 <= y < h:
            out.append(("params.y", f"y must be between 0 and {h - 1}, got {y}"))
        elif y + height > h:
            out.append(("params.height", f"y + height must be at most {h}, got {y + height}"))
        if out:
            raise fields_error(
                ErrorKind.INVALID_ARGUMENT,
                "CROP_OUT_OF_BOUNDS",
                f"crop rectangle x={x} y={y} width={width} height={height} does not fit"
                f" the {w}x{h} image (size after EXIF orientation)",
                out,
                image_width=w,
                image_height=h,
            )
        return _Plan((width, height), (x, y, x + width, y + height))

    return _transform(
        path,
        planner=plan,
        output_format=output_format,
        quality=quality,
        limits=limits,
        field=image_field,
        draft=False,
    )


def convert(
    path: ImageSource,
    *,
    output_format: OutputFormat,
    quality: int | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    image_field: str = "image",
) -> EncodedImage:
    """Re-encode the whole image in ``output_format``."""
    _check_quality(quality)
    return _transform(
        path,
        planner=lambda info: _Plan((info.width, info.height)),
        output_format=output_format,
        quality=quality,
        limits=limits,
        field=image_field,
        draft=False,
    )


def resize(
    path: Path,
    *,
    width: int | None = None,
    height: int | None = None,
    fit: str = "contain",
    output_format: OutputFormat | None = None,
    quality: int | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    image_field: str = "image",
    fast_encode: bool = False,
) -> EncodedImage:
    """Scale the image to a ``width`` x ``height`` box.

    ``contain`` (default, also for ``""``) fits inside the box keeping the aspect ratio and
    never enlarges; ``cover`` fills the box and centre-crops the overflow; ``fill``
    stretches to the box. With one side only, the other follows the aspect ratio and the
    image is never enlarged. Errors: ``INVALID_SIZE``, ``INVALID_FIT``, and
    ``VARIANT_TOO_LARGE`` when a side would exceed ``limits.max_output_side``.
    ``fast_encode``: less encoder effort, a few percent more bytes (WebP; see ``_encoding``).
    """
    mode = fit.strip().lower() or "contain"
    if mode not in FITS:
        raise field_error(
            ErrorKind.INVALID_ARGUMENT,
            "params.fit",
            "INVALID_FIT",
            f"unknown fit {fit!r}; accepted values: {', '.join(FITS)}",
        )
    bad: list[tuple[str, str]] = []
    if width is None and height is None:
        bad = [(f"params.{n}", "width or height is required") for n in ("width", "height")]
    for name, value in (("width", width), ("height", height)):
        if value is not None and value < 1:
            bad.append((f"params.{name}", f"{name} must be at least 1, got {value}"))
    if bad:
        raise fields_error(
            ErrorKind.INVALID_ARGUMENT, "INVALID_SIZE", "; ".join(d for _, d in bad), bad
        )
    _check_side(limits, width=width, height=height)
    _check_quality(quality)

    def plan(info: ImageInfo) -> _Plan:
        result = _resize_plan(info.width, info.height, width, height, mode)
        _check_side(limits, width=result.size[0], height=result.size[1])
        return result

    return _transform(
        path,
        planner=plan,
        output_format=output_format,
        quality=quality,
        limits=limits,
        field=image_field,
        draft=True,
        fast_encode=fast_encode,
    )


def apply_jpeg_draft(image: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
    """Ask libjpeg to decode at 1/2, 1/4 or 1/8 scale while still covering ``size``.

    ``size`` is in the file's stored (un-oriented) pixels. Only JPEG/MPO images that are
    not decoded yet are affected; returns the size the image will decode at.
    """
    if image.format in ("JPEG", "MPO") and isinstance(image, ImageFile.ImageFile) and image.tile:
        image.draft(None, size)
    return image.size


def verify(path: Path, limits: ImageLimits = DEFAULT_LIMITS, field: str = "image") -> ImageInfo:
    """The header checks of ``probe``, then a decode of the first frame (JPEG at 1/8 scale),
    so that truncated or corrupt data is refused (``IMAGE_TRUNCATED`` / ``IMAGE_CORRUPT``)
    before the file is handed to a provider."""
    with open_image_with_info(path, limits, field) as (im, info):
        apply_jpeg_draft(im, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
        im.load()
    return info


# --- validation and planning ------------------------------------------------------------


def _check_quality(quality: int | None) -> None:
    if quality is not None and (isinstance(quality, bool) or not 1 <= quality <= 100):
        raise field_error(
            ErrorKind.INVALID_ARGUMENT,
            "params.quality",
            "INVALID_QUALITY",
            f"quality must be between 1 and 100, got {quality}",
        )


def _check_side(limits: ImageLimits, **sides: int | None) -> None:
    cap = limits.max_output_side
    bad = [
        (f"params.{name}", f"{name} {value} exceeds the maximum of {cap}")
        for name, value in sides.items()
        if value is not None and value > cap
    ]
    if bad:
        raise fields_error(
            ErrorKind.INVALID_ARGUMENT,
            "VARIANT_TOO_LARGE",
            f"output sides are limited to {cap} pixels: " + "; ".join(d for _, d in bad),
            bad,
            limit=cap,
        )


def _scaled(value: int, factor: float) -> int:
    return max(1, round(value * factor))


def _resize_plan(src_w: int, src_h: int, width: int | None, height: int | None, fit: str) -> _Plan:
    if width is None or height is None:
        factor = min(1.0, width / src_w if width is not None else (height or src_h) / src_h)
        size = (_scaled(src_w, factor), _scaled(src_h, factor))
        return _Plan(size, None, size != (src_w, src_h))
    if fit == "fill":
        return _Plan((width, height), None, (width, height) != (src_w, src_h))
    if fit == "cover":
        factor = max(width / src_w, height / src_h)
        region_w, region_h = width / factor, height / factor
        left, top = (src_w - region_w) / 2, (src_h - region_h) / 2
        return _Plan((width, height), (left, top, left + region_w, top + region_h), True)
    factor = min(1.0, width / src_w, height / src_h)
    size = (min(width, _scaled(src_w, factor)), min(height, _scaled(src_h, factor)))
    return _Plan(size, None, size != (src_w, src_h))


def _resolve_quality(quality: int | None, target: OutputFormat) -> int | None:
    if not target.lossy:
        return None
    return DEFAULT_QUALITY if quality is None else quality


# --- orientation ------------------------------------------------------------------------


def _to_raw_box(box: Box, orientation: int, raw_size: tuple[int, int]) -> Box:
    """Map a rectangle of the oriented image onto the stored (un-oriented) pixels."""
    rw, rh = raw_size

    def point(u: float, v: float) -> tuple[float, float]:
        match orientation:
            case 2:
                return rw - u, v
            case 3:
                return rw - u, rh - v
            case 4:
                return u, rh - v
            case 5:
                return v, u
            case 6:
                return v, rh - u
            case 7:
                return rw - v, rh - u
            case 8:
                return rw - v, u
            case _:
                return u, v

    x0, y0 = point(box[0], box[1])
    x1, y1 = point(box[2], box[3])
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def _apply_plan(img: Image.Image, info: ImageInfo, plan: _Plan) -> Image.Image:
    """Cut/scale in stored pixels, then orient: only the (small) result is transposed."""
    orientation = info.orientation
    swap = orientation >= 5
    raw_w, raw_h = img.size
    oriented_w, oriented_h = (raw_h, raw_w) if swap else (raw_w, raw_h)
    region = plan.region or (0.0, 0.0, float(info.width), float(info.height))
    # A JPEG draft decodes smaller than the header size: scale the region to match.
    sx, sy = oriented_w / info.width, oriented_h / info.height
    scaled: Box = (region[0] * sx, region[1] * sy, region[2] * sx, region[3] * sy)
    raw_box = _to_raw_box(scaled, orientation, (raw_w, raw_h))
    out_w, out_h = plan.size
    if plan.resample:
        raw_size = (out_h, out_w) if swap else (out_w, out_h)
        img = img.resize(
            raw_size, Image.Resampling.LANCZOS, box=raw_box, reducing_gap=_REDUCING_GAP
        )
    elif plan.region is not None:
        left, top, right, bottom = (round(v) for v in raw_box)
        img = img.crop((left, top, right, bottom))
    method = _TRANSPOSE.get(orientation)
    return img.transpose(method) if method is not None else img


# --- the pipeline -----------------------------------------------------------------------


def _render(
    src: Image.Image,
    info: ImageInfo,
    plan: _Plan,
    target: OutputFormat,
    *,
    field: str,
    animation: bool = False,
) -> tuple[Image.Image, bytes | None]:
    icc = icc_of(src)
    if plan.resample:
        img = _apply_plan(working_mode(src, field), info, plan)  # never resample palettes
    else:
        img = working_mode(_apply_plan(src, info, plan), field)  # convert only what is kept
    if src.mode == "CMYK":
        icc = None  # pixels are sRGB now
    img = for_target(img, target, transparent_index=animation and info.has_alpha)
    return img, icc if target.supports_icc and icc_fits(icc, img.mode) else None


def _source_plays(im: Image.Image, pil_format: str) -> int:
    loop = im.info.get("loop")
    if pil_format == "GIF":
        # No NETSCAPE block plays once; its count is repeats after the first showing.
        if loop is None:
            return 1
        return 0 if loop == 0 else int(loop) + 1
    return int(loop) if isinstance(loop, int) and loop >= 0 else 0


def _decode_animation(
    im: ImageFile.ImageFile,
    *,
    info: ImageInfo,
    plan: _Plan,
    target: OutputFormat,
    limits: ImageLimits,
    field: str,
) -> Frames:
    plays = _source_plays(im, info.pil_format)
    canvas = im.size
    images: list[Image.Image] = []
    durations: list[int] = []
    icc: bytes | None = None
    for index in range(info.frame_count):
        im.seek(index)
        check_frame_size(im.size, limits, field)
        frame = im.convert("RGBA")  # the composed canvas, decoded now
        duration = im.info.get("duration")
        if frame.size != canvas:  # GIF frames may grow the canvas; keep the first size
            frame = frame.crop((0, 0, *canvas))
        out, frame_icc = _render(frame, info, plan, target, field=field, animation=True)
        if index == 0:
            icc = frame_icc
        images.append(out)
        durations.append(round(duration) if isinstance(duration, (int, float)) else 0)
    durations = [d if d > 0 else _DEFAULT_DURATION_MS for d in durations]
    return Frames(images, durations, icc, plays)


def _transform(
    path: ImageSource,
    *,
    planner: Callable[[ImageInfo], _Plan],
    output_format: OutputFormat | None,
    quality: int | None,
    limits: ImageLimits,
    field: str,
    draft: bool,
    fast_encode: bool = False,
) -> EncodedImage:
    with open_image_with_info(path, limits, field) as (im, info):
        target = output_format or info.format
        if target is None:
            raise field_error(
                ErrorKind.INVALID_ARGUMENT,
                "params.format",
                "UNSUPPORTED_FORMAT",
                f"cannot write {info.pil_format} images; choose an output format",
            )
        plan = planner(info)
        if max(plan.size) > target.max_side:
            raise field_error(
                ErrorKind.INVALID_ARGUMENT,
                "params.format",
                "IMAGE_TOO_LARGE_FOR_FORMAT",
                f"{target.name} images are limited to {target.max_side} pixels per side;"
                f" the result would be {plan.size[0]}x{plan.size[1]}",
                limit=target.max_side,
            )
        if info.animated and target.supports_animation:
            frames = _decode_animation(
                im, info=info, plan=plan, target=target, limits=limits, field=field
            )
        else:
            if draft and plan.resample:
                apply_jpeg_draft(im, _draft_size(info, plan))
            im.load()
            image, icc = _render(im, info, plan, target, field=field)
            frames = Frames([image], [], icc, 0)
        if all(frame is not im for frame in frames.images):
            im.close()  # release the decoded source before encoding
        data = encode_frames(frames, target, _resolve_quality(quality, target), fast=fast_encode)
    first = frames.images[0]
    return EncodedImage(data, target, first.width, first.height, len(frames.images))


def _draft_size(info: ImageInfo, plan: _Plan) -> tuple[int, int]:
    """Stored-pixel size the whole image must decode at to cover the plan with margin."""
    region = plan.region or (0.0, 0.0, float(info.width), float(info.height))
    need_w = info.width * plan.size[0] / (region[2] - region[0]) * _DRAFT_GAP
    need_h = info.height * plan.size[1] / (region[3] - region[1]) * _DRAFT_GAP
    size = (math.ceil(need_w), math.ceil(need_h))
    return (size[1], size[0]) if info.orientation >= 5 else size
