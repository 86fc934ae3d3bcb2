"""A job's output format (JobOptions.output_format), applied once when an output is stored.

ComfyUI saves PNG; a job may ask for WebP, AVIF or JPEG (with a quality). The stored artifact is
the re-encoded image, so every later read (streamed bytes, downloads, variants) serves it as is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from pathlib import Path

from aiserver.imaging import OutputFormat, convert, parse_format
from aiserver.providers.base import GeneratedImage
from aiserver.tasks import TaskSpec

__all__ = ["encode_output"]


async def encode_output(image: GeneratedImage, spec: TaskSpec) -> GeneratedImage:
    """``image`` in the spec's output format; unchanged when none is asked or it already is."""
    name = getattr(spec, "output_format", "")
    if not name:
        return image
    fmt = parse_format(name, "params.options.output_format")
    quality = getattr(spec, "output_quality", None)
    if fmt.mime_type == image.mime_type and quality is None:
        return image
    return await asyncio.to_thread(_convert, image, fmt, quality)


def _convert(image: GeneratedImage, fmt: OutputFormat, quality: int | None) -> GeneratedImage:
    with tempfile.TemporaryDirectory(prefix="aiserver-output-") as folder:
        path = Path(folder) / "output"
        path.write_bytes(image.data)
        encoded = convert(path, output_format=fmt, quality=quality)
    stem = image.file_name.rsplit(".", 1)[0] if "." in image.file_name else image.file_name
    return dataclasses.replace(
        image,
        data=encoded.data,
        file_name=stem + fmt.extension,
        mime_type=fmt.mime_type,
        width=encoded.width,
        height=encoded.height,
    )
