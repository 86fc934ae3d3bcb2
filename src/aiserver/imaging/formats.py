"""Registry of the image formats the service can write (and therefore read back)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from PIL import features

from aiserver.errors import ErrorKind
from aiserver.imaging._errors import field_error

__all__ = ["OutputFormat", "available_formats", "format_for_pillow", "parse_format"]


@dataclass(frozen=True, slots=True)
class OutputFormat:
    """One output format and what its encoder can carry."""

    name: str
    """Canonical lower-case name used in requests and responses (``jpg``)."""
    pil_format: str
    """Pillow's format id, passed to ``Image.save`` (``JPEG``)."""
    mime_type: str
    extension: str
    """File extension with its leading dot (``.jpg``)."""
    lossy: bool
    """``quality`` only applies to lossy formats."""
    supports_alpha: bool
    supports_animation: bool
    supports_icc: bool
    max_side: int
    """Largest width or height the encoder accepts."""


_JPG = OutputFormat("jpg", "JPEG", "image/jpeg", ".jpg", True, False, False, True, 65_500)
_PNG = OutputFormat("png", "PNG", "image/png", ".png", False, True, True, True, 2**31 - 1)
# GIF transparency is a single palette index, so alpha is kept as on/off.
_GIF = OutputFormat("gif", "GIF", "image/gif", ".gif", False, True, True, False, 65_535)
_BMP = OutputFormat("bmp", "BMP", "image/bmp", ".bmp", False, False, False, False, 2**31 - 1)
# Multi-page TIFF is not an animation; only the first page is ever written.
_TIFF = OutputFormat("tiff", "TIFF", "image/tiff", ".tiff", False, True, False, True, 2**31 - 1)
_WEBP = OutputFormat("webp", "WEBP", "image/webp", ".webp", True, True, True, True, 16_383)
# AVIF sequences exist but are poorly supported by viewers; AVIF output is one frame.
_AVIF = OutputFormat("avif", "AVIF", "image/avif", ".avif", True, True, False, True, 65_536)

_ALIASES = {"jpeg": "jpg", "tif": "tiff"}
_PILLOW_IDS = {"MPO": "jpg"}  # MPO is JPEG with extra pictures appended


@functools.cache
def available_formats() -> tuple[OutputFormat, ...]:
    """Formats this Pillow build can both decode and encode, in a stable order."""
    formats = [_JPG, _PNG, _GIF, _BMP, _TIFF]
    # WebP and AVIF are optional Pillow features; never advertise what cannot be encoded.
    if features.check("webp"):
        formats.append(_WEBP)
    if features.check("avif"):
        formats.append(_AVIF)
    return tuple(formats)


@functools.cache
def _by_name() -> dict[str, OutputFormat]:
    table = {f.name: f for f in available_formats()}
    for alias, name in _ALIASES.items():
        if name in table:
            table[alias] = table[name]
    return table


def _accepted_names() -> list[str]:
    return sorted(_by_name())


def parse_format(name: str, field: str) -> OutputFormat:
    """Look up a format by name or alias, ignoring case and surrounding blanks.

    Raises INVALID_ARGUMENT ``UNSUPPORTED_FORMAT`` on ``field`` for anything else.
    """
    found = _by_name().get(name.strip().lower())
    if found is None:
        accepted = ", ".join(_accepted_names())
        raise field_error(
            ErrorKind.INVALID_ARGUMENT,
            field,
            "UNSUPPORTED_FORMAT",
            f"unsupported image format {name!r}; accepted values: {accepted}",
            accepted=accepted,
        )
    return found


def format_for_pillow(pil_format: str | None) -> OutputFormat | None:
    """Registry entry for an opened image's ``Image.format`` (``JPEG``, ``MPO``...)."""
    if not pil_format:
        return None
    upper = pil_format.upper()
    name = _PILLOW_IDS.get(upper)
    if name is None:
        name = next((f.name for f in available_formats() if f.pil_format == upper), None)
    return _by_name().get(name) if name else None
