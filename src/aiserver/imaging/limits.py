"""Resource limits applied to every image before and while it is decoded."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_LIMITS", "ImageLimits"]


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """Upper bounds checked from the file header, before any pixel is decoded."""

    max_pixels: int = 50_000_000
    """Width x height of one frame (50 MP: a 8660 x 5773 photo, ~200 MB as RGBA)."""
    max_frames: int = 1000
    """Frames of an animation that will be decoded."""
    max_total_pixels: int = 400_000_000
    """Frames x pixels per frame: bounds the CPU spent on an animation."""
    max_output_side: int = 16384
    """Largest width or height ``resize`` may produce."""


DEFAULT_LIMITS = ImageLimits()
