"""Helpers shared by the artifact tests."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from PIL import Image

from aiserver.artifacts.index import ArtifactIndex, PostgresArtifactIndex, SqliteArtifactIndex
from aiserver.artifacts.store import ArtifactStore
from aiserver.blobs import BlobStore, LocalBlobStore
from aiserver.blobs.s3 import S3BlobStore
from tests.storage.backends import PG_URL, S3_CREDENTIALS, S3Server


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


class PausedDeletes:
    """A real blob store whose deletes wait until :attr:`resume` is set, so that a test can
    run something else while a retention delete is under way (``reached`` is set then)."""

    def __init__(self, inner: BlobStore) -> None:
        self.inner = inner
        self.reached = asyncio.Event()
        self.resume = asyncio.Event()

    async def put(self, key: str, data: bytes, *, fresh: bool = False) -> None:
        await self.inner.put(key, data, fresh=fresh)

    async def size(self, key: str) -> int | None:
        return await self.inner.size(key)

    def read(
        self, key: str, offset: int = 0, length: int | None = None, chunk_size: int = 65536
    ) -> AsyncIterator[bytes]:
        return self.inner.read(key, offset, length, chunk_size)

    async def delete(self, key: str) -> None:
        self.reached.set()
        await self.resume.wait()
        await self.inner.delete(key)

    def local_file(self, key: str) -> AbstractAsyncContextManager[Path]:
        return self.inner.local_file(key)

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        return self.inner.presigned_url(key, expires_s)

    async def close(self) -> None:
        await self.inner.close()


class Coordinators:
    """Artifact stores on one index and one blob store, as coordinators share them.

    ``kind`` is ``{sqlite|postgres}+{folder|s3}``. On PostgreSQL each store has its own index
    (its own pool: another coordinator); SQLite serves one process, so its stores share one
    index object. Blobs: one folder, or one bucket with a client per store."""

    def __init__(self, kind: str, root: Path, s3: S3Server | None, schema: str | None) -> None:
        self.index_kind, self.blob_kind = kind.split("+")
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._s3 = s3
        self._bucket = None if s3 is None else s3.new_bucket()
        self._schema = schema
        self._sqlite: SqliteArtifactIndex | None = None
        self._folder: LocalBlobStore | None = None
        self._opened: list[ArtifactStore] = []

    def _blobs(self) -> BlobStore:
        if self._s3 is None:
            if self._folder is None:  # it clears its temp folder when made: make it once
                self._folder = LocalBlobStore(self.root)
            return self._folder
        return S3BlobStore(
            f"s3://{self._bucket}/artifacts",
            endpoint_url=self._s3.endpoint,
            access_key=S3_CREDENTIALS["aws_access_key_id"],
            secret_key=S3_CREDENTIALS["aws_secret_access_key"],
        )

    async def open(
        self, clock: Callable[[], datetime], wrap: Callable[[BlobStore], BlobStore] | None = None
    ) -> ArtifactStore:
        index: ArtifactIndex
        if self._schema is None:
            if self._sqlite is None:
                self._sqlite = SqliteArtifactIndex(self.root / "artifacts.sqlite3")
            index = self._sqlite
        else:
            index = await PostgresArtifactIndex.open(PG_URL, schema=self._schema, pool_size=2)
        blobs = self._blobs()
        store = ArtifactStore(
            self.root, clock=clock, blobs=blobs if wrap is None else wrap(blobs), index=index
        )
        self._opened.append(store)
        return store

    async def close(self) -> None:
        for store in self._opened:
            await store.close()  # a shared SQLite index or folder closes twice: harmless
