"""Helpers shared by the artifact tests."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

from PIL import Image

from aiserver.artifacts.store import ArtifactStore


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def image_bytes(
    size: tuple[int, int], fmt: str = "PNG", color: tuple[int, int, int] = (200, 40, 90)
) -> bytes:
    img = Image.new("RGB", size, color)
    # A gradient band so encoders have something to do and images differ by size.
    for x in range(0, size[0], max(1, size[0] // 16)):
        img.paste((x % 256, 255 - x % 256, 128), (x, 0, min(size[0], x + 2), size[1]))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


async def put(
    store: ArtifactStore,
    data: bytes,
    *,
    owner: str = "alice",
    job_id: str = "job-1",
    mime_type: str = "image/png",
    size: tuple[int, int] = (1, 1),
) -> str:
    ref = await store.put(
        data,
        file_name="out.png",
        mime_type=mime_type,
        width=size[0],
        height=size[1],
        seed=42,
        provider="local",
        job_id=job_id,
        owner=owner,
    )
    return ref.name
