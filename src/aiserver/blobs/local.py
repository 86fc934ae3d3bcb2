"""Blobs as files under one folder: the embedded default, and today's artifact layout."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from aiserver.blobs.protocol import DEFAULT_CHUNK_SIZE

__all__ = ["LocalBlobStore"]

logger = logging.getLogger(__name__)


class LocalBlobStore:
    """``{root}/{key}`` for each blob; ``{root}/.tmp/`` for blobs being written (same file
    system, so the final rename is atomic). Temp files left by a crash go at start-up."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._real_root = root.resolve(strict=True)
        self._tmp = root / ".tmp"
        self._tmp.mkdir(exist_ok=True)
        for stale in self._tmp.iterdir():
            stale.unlink(missing_ok=True)

    def _path(self, key: str) -> Path:
        """The file of ``key``, never outside ``root``: a key whose real location differs
        from its lexical one (a symlink anywhere below ``root``) does not exist."""
        path = self.root / key
        try:
            real = path.resolve(strict=False)
        except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop
            raise FileNotFoundError(key) from exc
        if real != self._real_root / key:
            logger.warning("blob %s leaves the store through a symlink", key)
            raise FileNotFoundError(key)
        return path

    def _write_if_missing(self, key: str, data: bytes) -> None:
        path = self._path(key)
        if path.is_file():
            return
        tmp = self._tmp / f"{uuid.uuid4().hex}.part"
        try:
            with tmp.open("xb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        # The rename is durable only once the directory entry is on disk.
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._write_if_missing, key, data)

    async def size(self, key: str) -> int | None:
        try:
            path = self._path(key)
            return (await asyncio.to_thread(os.stat, path, follow_symlinks=False)).st_size
        except FileNotFoundError:
            return None

    async def read(
        self,
        key: str,
        offset: int = 0,
        length: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> AsyncIterator[bytes]:
        path = self._path(key)
        # O_NOFOLLOW: a symlink planted after the check above is still refused.
        try:
            fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise FileNotFoundError(key) from exc
        try:
            size = os.fstat(fd).st_size
            remaining = max(0, size - offset) if length is None else min(length, size - offset)
            while remaining > 0:
                chunk = await asyncio.to_thread(os.pread, fd, min(chunk_size, remaining), offset)
                if not chunk:
                    break  # truncated under us: stop rather than spin
                offset += len(chunk)
                remaining -= len(chunk)
                yield chunk
        finally:
            os.close(fd)

    async def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            path = self._path(key)
            await asyncio.to_thread(path.unlink, missing_ok=True)

    @contextlib.asynccontextmanager
    async def local_file(self, key: str) -> AsyncIterator[Path]:
        path = self._path(key)
        if not await asyncio.to_thread(path.is_file):
            raise FileNotFoundError(key)
        yield path

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        return None  # served by the service itself, under its own signed URLs

    async def close(self) -> None:
        return None
