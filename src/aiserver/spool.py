"""Uploaded inputs, written to disk as they stream in.

Bytes go to a temporary file while a SHA-256 is computed; a finished file is either moved into
the content-addressed spool (job inputs, read later by providers) or deleted after use (light
tasks). The byte budget is shared by all files of one request and is enforced per chunk, so an
oversize upload is refused as soon as it passes the limit, not after it has been stored.

With a shared blob store (several coordinators, docs/scale-out.md) a job's inputs are also
put there (``inputs/{sha[:2]}/{sha}``) before the job is stored, so whichever process runs the
job finds them: :meth:`InputSpool.local_path` fetches one into the local spool when needed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from aiserver.blobs import BlobStore
from aiserver.errors import ErrorKind, FieldViolation, ServiceError

__all__ = ["InputSpool", "SpooledFile", "UploadBudget"]

logger = logging.getLogger(__name__)


class UploadBudget:
    """Bytes one request may still upload, across all its files."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, field: str, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise ServiceError(
                ErrorKind.RESOURCE_EXHAUSTED,
                "UPLOAD_TOO_LARGE",
                f"upload exceeds the limit of {self.limit} bytes",
                violations=(FieldViolation(field, f"larger than {self.limit} bytes"),),
                metadata={"field": field, "limit_bytes": str(self.limit)},
            )


@dataclass(slots=True)
class SpooledFile:
    """A finished upload: on disk at ``path``."""

    field: str
    file_name: str
    path: Path
    sha256: str
    size: int


class _Writer:
    def __init__(self, spool: InputSpool, field: str, file_name: str, budget: UploadBudget):
        self.field = field
        self.file_name = file_name
        self._budget = budget
        self._hash = hashlib.sha256()
        self._size = 0
        self.path = spool.tmp_dir / f"{uuid.uuid4().hex}.part"
        self._fh = self.path.open("wb")

    def write(self, data: bytes) -> None:
        self._budget.take(self.field, len(data))
        self._hash.update(data)
        self._size += len(data)
        self._fh.write(data)

    def finish(self) -> SpooledFile:
        self._fh.close()
        return SpooledFile(
            self.field, self.file_name, self.path, self._hash.hexdigest(), self._size
        )

    def discard(self) -> None:
        self._fh.close()
        self.path.unlink(missing_ok=True)


class InputSpool:
    """A folder of uploads: ``tmp/`` for files being written, ``{sha[:2]}/{sha}`` for inputs."""

    def __init__(self, root: Path, shared: BlobStore | None = None) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._pins: Counter[str] = Counter()
        self._shared = shared
        """Where every coordinator finds inputs; ``None``: this process alone (the folder)."""

    def pinned(self, sha256: str) -> bool:
        """True while a request holds this input between commit and job submission."""
        return self._pins[sha256] > 0

    def unpin(self, spooled: SpooledFile) -> None:
        """The request that committed ``spooled`` is done with it (its job, if any, now
        references it)."""
        self._pins[spooled.sha256] -= 1
        if self._pins[spooled.sha256] <= 0:
            del self._pins[spooled.sha256]

    def open(self, field: str, file_name: str, budget: UploadBudget) -> _Writer:
        return _Writer(self, field, file_name, budget)

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def commit(self, spooled: SpooledFile) -> SpooledFile:
        """Move a finished upload into the content-addressed spool (idempotent per content)
        and pin it until :meth:`unpin`, so that a job ending meanwhile with the same input
        does not delete it."""
        self._pins[spooled.sha256] += 1
        target = self.path_for(spooled.sha256)
        target.parent.mkdir(exist_ok=True)
        os.replace(spooled.path, target)  # same content: replacing is harmless
        spooled.path = target
        return spooled

    @staticmethod
    def _key(sha256: str) -> str:
        return f"inputs/{sha256[:2]}/{sha256}"

    async def share(self, sha256: str) -> bool:
        """Make the input reachable by every process; ``False`` if it exists nowhere.

        Without a shared store this only checks the local file."""
        path = self.path_for(sha256)
        local = await asyncio.to_thread(path.is_file)
        if self._shared is None:
            return local
        if not local:
            return await self._shared.size(self._key(sha256)) is not None
        data = await asyncio.to_thread(path.read_bytes)
        await self._shared.put(self._key(sha256), data)  # write-once: a no-op when there
        return True

    async def local_path(self, sha256: str) -> Path:
        """The input as a local file, fetched from the shared store if only there (a job
        claimed by another process than the one that received the upload).
        :class:`FileNotFoundError` if it exists nowhere."""
        path = self.path_for(sha256)
        if await asyncio.to_thread(path.is_file) or self._shared is None:
            if not path.is_file():
                raise FileNotFoundError(sha256)
            return path
        part = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        try:
            with part.open("wb") as fh:
                async for chunk in self._shared.read(self._key(sha256), chunk_size=1 << 20):
                    await asyncio.to_thread(fh.write, chunk)
            path.parent.mkdir(exist_ok=True)
            os.replace(part, path)
        finally:
            part.unlink(missing_ok=True)
        return path

    @property
    def shared(self) -> bool:
        return self._shared is not None

    def delete_local(self, sha256: str) -> None:
        """Remove the local copy (synchronous: no request can commit the same bytes between
        the caller's pin check and this)."""
        path = self.path_for(sha256)
        try:
            path.unlink(missing_ok=True)
        except OSError:
            logger.warning("could not delete spooled input %s", path, exc_info=True)

    async def delete_shared(self, sha256: str) -> None:
        """Remove the shared copy (the caller knows no job needs it)."""
        if self._shared is not None:
            try:
                await self._shared.delete(self._key(sha256))
            except Exception:
                logger.warning("could not delete shared input %s", sha256, exc_info=True)

    def sweep_tmp(self) -> None:
        """Delete partial uploads left by a crash (run at start-up, before serving)."""
        for part in self.tmp_dir.glob("*.part"):
            part.unlink(missing_ok=True)
