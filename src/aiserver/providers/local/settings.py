"""Settings of the embedded CPU upscaler."""

from __future__ import annotations

from dataclasses import dataclass

from aiserver.providers.local.models import MODELS

__all__ = ["ALPHA_MODES", "DEFAULT_MODEL", "LocalUpscaleSettings"]

DEFAULT_MODEL = "realesr-animevideov3-x2"
"""Chosen on ``bench/upscale_local.py``: 30-90x faster than ``realesrgan-x4plus`` on the CPU
(which needs over 6 minutes per input megapixel on 2 cores), as good on PSNR/SSIM over real
photos (x4plus is a little better on GMSD) and better on all three over generated images."""

ALPHA_MODES = ("resize", "model")


@dataclass(frozen=True, slots=True)
class LocalUpscaleSettings:
    """ImageUpscale in-process: Real-ESRGAN on the CPU through ncnn, no GPU, no ComfyUI."""

    enabled: bool = True
    """Offer ImageUpscale from this process. Off: ``can_run`` is always False."""
    model: str = DEFAULT_MODEL
    """Model used when a request names none: ``realesr-animevideov3-x2`` (about 5-10 s per
    input megapixel on 2 idle cores), ``realesrgan-x4plus`` (general photos, about 40x
    slower) or ``realesrgan-x4plus-anime`` (about 15x slower); the 4x ones are brought to
    2x with Lanczos. Requests may name any of them in ``model``."""
    tile_size: int = 192
    """Side of the square of input pixels upscaled per model call (16..1024). Bounds memory:
    measured peaks per job at 192 are 0.2 GB for the default model and 3.2 GB for
    ``realesrgan-x4plus`` (5.7 GB at 256). Also bounds how long a cancelled job's last tile
    keeps the CPU busy; smaller tiles spend a little more time on the overlap."""
    tile_overlap: int | None = None
    """Input pixels of context read on each side of a tile, upscaled and then cropped away,
    so tiles join without seams (0..128); None: the model's own (16 for the compact model,
    32 for the RRDB ones, whose output depends on more context). Image borders are mirrored
    by the same amount."""
    threads: int = 0
    """ncnn worker threads per model call; 0 means the number of CPUs."""
    max_concurrent_jobs: int = 1
    """Jobs upscaling at once; further jobs handed to this provider wait their turn."""
    alpha: str = "resize"
    """How an alpha channel is enlarged: ``resize`` (Lanczos, fast) or ``model`` (run through
    the network as a grey image, sharper edges, twice the time)."""
    max_input_pixels: int = 16_000_000
    """Largest input (width x height) accepted; larger ones fail with RESOURCE_EXHAUSTED.
    Bounds memory (the 2x RGBA result is held whole: ~16 bytes per input pixel) and time."""
    png_compress_level: int = 6
    """zlib level of the PNG result (0..9): lower is faster and larger."""

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, not {self.model!r}")
        if not 16 <= self.tile_size <= 1024:
            raise ValueError("tile_size must be in 16..1024")
        if self.tile_overlap is not None and not 0 <= self.tile_overlap <= 128:
            raise ValueError("tile_overlap must be in 0..128")
        if self.threads < 0:
            raise ValueError("threads must be 0 (all CPUs) or more")
        if self.max_concurrent_jobs < 1:
            raise ValueError("max_concurrent_jobs must be at least 1")
        if self.alpha not in ALPHA_MODES:
            raise ValueError(f"alpha must be one of {', '.join(ALPHA_MODES)}")
        if self.max_input_pixels < 1:
            raise ValueError("max_input_pixels must be at least 1")
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError("png_compress_level must be in 0..9")
