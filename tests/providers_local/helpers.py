"""Helpers for the local provider's tests: real files and a recording sink."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from aiserver.providers.base import (
    GeneratedImage,
    GeneratedText,
    ProviderProgress,
    WorkInput,
    WorkItem,
)
from aiserver.tasks import ImageUpscaleSpec, TaskKind


class RecordingSink:
    """A RunSink that keeps everything; ``on_progress`` runs after each progress report."""

    def __init__(self, on_progress: Callable[[ProviderProgress], Awaitable[None]] | None = None):
        self.progress_updates: list[ProviderProgress] = []
        self.images: list[GeneratedImage] = []
        self.texts: list[GeneratedText] = []
        self.checkpoints: list[Mapping[str, str]] = []
        self._on_progress = on_progress

    async def progress(self, update: ProviderProgress) -> None:
        self.progress_updates.append(update)
        if self._on_progress is not None:
            await self._on_progress(update)

    async def image(self, image: GeneratedImage) -> None:
        self.images.append(image)

    async def text(self, text: GeneratedText) -> None:
        self.texts.append(text)

    async def checkpoint(self, state: Mapping[str, str]) -> None:
        self.checkpoints.append(dict(state))


def textured(size: tuple[int, int], seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Photo-like content: smooth colour fields with edges and some fine detail."""
    w, h = size
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, h // 6), max(2, w // 6), 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    detail = rng.normal(0, 12, (h, w, 3))
    pixels = np.clip(np.asarray(img, dtype=np.float64) + detail, 0, 255).astype(np.uint8)
    out = Image.fromarray(pixels)
    return out if mode == "RGB" else out.convert(mode)


def save(img: Image.Image, path: Path, fmt: str = "PNG", **params: Any) -> Path:
    img.save(path, fmt, **params)
    return path


def work_for(
    path: Path, *, model: str = "", job_id: str = "job-1", task: TaskKind = TaskKind.IMAGE_UPSCALE
) -> WorkItem:
    data = path.read_bytes()
    with Image.open(path) as im:
        width, height = im.size
        mime = Image.MIME.get(im.format or "", "application/octet-stream")
    item = WorkInput(
        field="image",
        path=path,
        file_name=path.name,
        sha256=hashlib.sha256(data).hexdigest(),
        mime_type=mime,
        width=width,
        height=height,
    )
    return WorkItem(
        job_id=job_id, task=task, spec=ImageUpscaleSpec(model=model), inputs={"image": item}
    )


def decoded(image: GeneratedImage) -> Image.Image:
    img = Image.open(io.BytesIO(image.data))
    img.load()
    return img
