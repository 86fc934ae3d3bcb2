"""Pixel-mode normalisation per output format: alpha, palettes, bit depth, ICC."""

from __future__ import annotations

import io

from PIL import Image

from aiserver.errors import ErrorKind
from aiserver.imaging._errors import field_error
from aiserver.imaging.formats import OutputFormat

__all__ = ["for_target", "icc_fits", "icc_of", "working_mode"]


def icc_fits(icc: bytes | None, mode: str) -> bool:
    """Whether the profile's colour space (ICC header bytes 16..20) matches the pixels."""
    if not icc or len(icc) < 20:
        return False
    return icc[16:20] == (b"GRAY" if mode in ("L", "LA") else b"RGB ")


def _cmyk_to_rgb(img: Image.Image, icc: bytes | None) -> Image.Image:
    if icc:
        try:
            from PIL import ImageCms

            converted = ImageCms.profileToProfile(
                img,
                ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                ImageCms.createProfile("sRGB"),
                outputMode="RGB",
            )
            if converted is not None:
                return converted
        except (ImportError, OSError, ValueError, TypeError):
            pass  # unusable profile: fall back to the naive formula
    return img.convert("RGB")


def _to_8bit_grey(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16"):
        low, high = 0.0, 65535.0
        img = img.convert("I")
    else:
        if img.mode not in ("I", "F"):
            img = img.convert("I")
        low, high = _extrema(img)
        # Guess the nominal range the way viewers do: 8-bit, 16-bit, unit float, else stretch.
        for top in (255.0, 65535.0) if img.mode == "I" else (1.0, 255.0, 65535.0):
            if low >= 0 and high <= top:
                low, high = 0.0, top
                break
    scale = 255.0 / (high - low) if high > low else 0.0
    offset = -low * scale
    return img.point(lambda v: v * scale + offset).convert("L")


def _extrema(img: Image.Image) -> tuple[float, float]:
    """Min and max of a single-band image."""
    low, high = img.getextrema()
    if isinstance(low, tuple) or isinstance(high, tuple):  # multi-band: not expected here
        raise ValueError(f"expected one band, got {img.mode}")
    return float(low), float(high)


def working_mode(img: Image.Image, field: str) -> Image.Image:
    """Bring any decoded mode to L, LA, RGB or RGBA (may return ``img`` itself)."""
    mode = img.mode
    try:
        if mode in ("L", "RGB"):
            return img.convert(mode + "A") if "transparency" in img.info else img
        if mode in ("LA", "RGBA"):
            return img
        if mode == "1":
            return img.convert("L")
        if mode in ("P", "PA"):
            return img.convert("RGBA" if img.has_transparency_data else "RGB")
        if mode in ("La", "RGBa"):
            return img.convert(mode.upper())
        if mode == "CMYK":
            return _cmyk_to_rgb(img, icc_of(img))
        if mode.startswith("I") or mode == "F":
            return _to_8bit_grey(img)
        return img.convert("RGB")
    except ValueError as exc:
        raise field_error(
            ErrorKind.INVALID_ARGUMENT,
            field,
            "UNSUPPORTED_IMAGE_MODE",
            f"cannot convert pixel mode {mode}: {exc}",
        ) from exc


def icc_of(img: Image.Image) -> bytes | None:
    icc = img.info.get("icc_profile")
    return icc if isinstance(icc, bytes) and icc else None


def _flatten(img: Image.Image) -> Image.Image:
    """Composite onto white for formats without alpha."""
    grey = img.mode == "LA"
    base = Image.new("L" if grey else "RGB", img.size, 255 if grey else (255, 255, 255))
    base.paste(img.convert(base.mode), mask=img.getchannel("A"))
    return base


_TRANSPARENT_BELOW_HALF = [255] * 128 + [0] * 128


def _palettize(img: Image.Image, transparent_index: bool) -> Image.Image:
    """Quantize for GIF; ``transparent_index`` reserves index 255 even in opaque frames.

    Animation frames are whole canvases drawn after "restore to background": every frame
    of a transparent animation needs the index, or decoders restore to an opaque colour.
    """
    if img.mode == "L" and not transparent_index:
        return img  # written with a grey palette, losslessly
    if img.mode != "RGBA":
        img = img.convert("RGBA")
    alpha = img.getchannel("A")
    rgb = img.convert("RGB")
    if not transparent_index and _extrema(alpha)[0] >= 128:
        return rgb.quantize(256, Image.Quantize.MEDIANCUT)
    # GIF has no partial transparency: pixels under 50% alpha take the reserved index.
    pal = rgb.quantize(255, Image.Quantize.MEDIANCUT)
    palette = pal.getpalette() or []
    pal.putpalette(palette + [0] * (768 - len(palette)))
    pal.paste(255, mask=alpha.point(_TRANSPARENT_BELOW_HALF))
    pal.info["transparency"] = 255
    return pal


def for_target(
    img: Image.Image, target: OutputFormat, *, transparent_index: bool = False
) -> Image.Image:
    if img.mode in ("LA", "RGBA") and not target.supports_alpha:
        img = _flatten(img)
    if target.name == "gif":
        return _palettize(img, transparent_index)
    if target.pil_format in ("WEBP", "AVIF") and img.mode in ("L", "LA"):
        img = img.convert("RGB" if img.mode == "L" else "RGBA")
    return img
