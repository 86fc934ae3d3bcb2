"""Content-addressed store of job outputs, with owner-scoped metadata in SQLite.

The bytes live in a :class:`~aiserver.blobs.BlobStore` under the key
``{yyyy}/{mm}/{dd}/{sha256}.{ext}`` (named by their hash, UTC date of first put): by default
the local folder ``root`` (``.tmp/`` there holds files being written), or an S3 bucket. The
metadata is an :class:`~aiserver.artifacts.index.ArtifactIndex`: ``root/artifacts.sqlite3``
by default, or tables in the PostgreSQL job database.

Identical bytes are stored once, whoever stores them and whenever: a later ``put`` of the same
content reuses the existing file and name and only adds a reference (owner, job, file name,
seed, provider). A name is visible to an owner only if that owner has a reference to it.

A put registers first (one statement, which names the key) and writes the bytes after; a
retention delete removes the row and then the bytes before any register of the same bytes can
return (see :mod:`aiserver.artifacts.index`), and a sweep never deletes a blob registered less
than ``fresh_s`` ago (longer than any put takes from its register to the end of its write), so
a put never ends with its bytes deleted under it, or written after its row was deleted, on one
process or several.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

from aiserver.artifacts.index import (
    ArtifactIndex,
    IndexedRef,
    NewRef,
    SqliteArtifactIndex,
    StoredBlob,
)
from aiserver.blobs import BlobStore, LocalBlobStore
from aiserver.blobs.protocol import Frame
from aiserver.errors import ErrorKind, FieldViolation, ServiceError, invalid_argument
from aiserver.jobs.model import ArtifactRef

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "EXTENSIONS",
    "SWEEP_FRESH_S",
    "ArtifactStore",
    "DeleteListener",
    "PutListener",
    "StoredBlob",
    "artifact_not_found",
]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 256 * 1024

#: MIME type -> file extension of every format the store accepts.
EXTENSIONS: dict[str, str] = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/bmp": "bmp",
    "image/tiff": "tiff",
    "image/avif": "avif",
}
_MIME_TYPES = {ext: mime for mime, ext in EXTENSIONS.items()}

# The only accepted shape of a relative artifact path. ``[0-9]`` rather than ``\d`` (which
# matches non-ASCII digits) and ``fullmatch`` (``$`` would allow a trailing newline): nothing
# that could name another file (``..``, ``/`` at the start, ``%``, ``\``, NUL) gets through.
_REL_PATH = re.compile(
    r"(?P<y>[0-9]{4})/(?P<m>[0-9]{2})/(?P<d>[0-9]{2})/(?P<sha>[0-9a-f]{64})\.(?P<ext>"
    + "|".join(sorted(_MIME_TYPES))
    + r")"
)
_HASH_IN_THREAD = 1024 * 1024  # hashing below this is quicker than a thread hop
_REFS_MADE = 4096
"""ArtifactRefs kept per (path, owner) looked up (see ArtifactStore._made)."""
SWEEP_FRESH_S = 60.0
"""A sweep's default: blobs registered less than this long ago are kept (far longer than a
put takes from its register to the end of its write)."""

DeleteListener = Callable[[str, str], None]
"""Called (in a worker thread) with ``(name, sha256)`` after an artifact is deleted."""
PutListener = Callable[[ArtifactRef], None]
"""Called (on the event loop; must not block) with each reference :meth:`ArtifactStore.put`
returns."""


def artifact_not_found(name: str) -> ServiceError:
    """Missing and someone else's are the same answer, so names cannot be probed."""
    return ServiceError(
        ErrorKind.NOT_FOUND,
        "ARTIFACT_NOT_FOUND",
        f"artifact {name!r} not found",
        metadata={"name": name},
    )


class ArtifactStore:
    """Stores outputs content-addressed under ``root``; see the module docstring."""

    def __init__(
        self,
        root: Path,
        *,
        url_prefix: str = "/artifacts",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        blobs: BlobStore | None = None,
        index: ArtifactIndex | None = None,
    ) -> None:
        self.root = root
        self.url_prefix = url_prefix.rstrip("/")
        self._clock = clock
        root.mkdir(parents=True, exist_ok=True)
        self._real_root = root.resolve(strict=True)
        self.blobs: BlobStore = LocalBlobStore(root) if blobs is None else blobs
        self.index: ArtifactIndex = (
            SqliteArtifactIndex(root / "artifacts.sqlite3") if index is None else index
        )
        self._local = isinstance(self.blobs, LocalBlobStore) and isinstance(
            self.index, SqliteArtifactIndex
        )
        self._made: dict[tuple[str, str | None], tuple[IndexedRef, ArtifactRef]] = {}
        """The last ArtifactRef made per lookup, with the row it was made of: an index that
        answers a repeated lookup with the same row (SQLite's) costs no new one."""
        """The embedded layout (a folder and SQLite): a put's writes share one thread hop."""
        self._listeners: list[DeleteListener] = []
        self._put_listeners: list[PutListener] = []

    # --- names and paths ------------------------------------------------------------------

    def relative_path(self, name: str) -> str:
        """``{yyyy}/{mm}/{dd}/{sha}.{ext}`` from a name or URL path; INVALID_ARGUMENT else."""
        for prefix in ("artifacts/", self.url_prefix + "/"):
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        if _REL_PATH.fullmatch(name) is None:
            raise invalid_argument(
                "name",
                "INVALID_ARTIFACT_NAME",
                "artifact names look like artifacts/{yyyy}/{mm}/{dd}/{sha256}.{ext}",
            )
        return name

    def path_of(self, name: str) -> Path:
        """The file of ``name`` in the local folder backend (which need not exist), never
        outside ``root``. For tests of the layout: the service reads through :attr:`blobs`.

        Beyond the shape check, a path whose real location differs from its lexical one (a
        symlink anywhere below ``root``) is NOT_FOUND.
        """
        rel = self.relative_path(name)
        path = self.root / rel
        try:
            real = path.resolve(strict=False)
        except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop
            raise artifact_not_found(name) from exc
        if real != self._real_root / rel:
            logger.warning("artifact path %s leaves the store through a symlink", rel)
            raise artifact_not_found(name)
        return path

    def _ref(self, row: IndexedRef) -> ArtifactRef:
        return ArtifactRef(
            name=f"artifacts/{row.path}",
            url=f"{self.url_prefix}/{row.path}",
            file_name=row.file_name,
            mime_type=row.mime_type,
            width=row.width,
            height=row.height,
            size_bytes=row.size,
            sha256=row.sha256,
            seed=row.seed,
            provider=row.provider,
            created=datetime.fromtimestamp(row.ref_created, UTC),
            job_id=row.job_id,
        )

    # --- public API -----------------------------------------------------------------------

    async def put(
        self,
        data: bytes,
        *,
        file_name: str,
        mime_type: str,
        width: int,
        height: int,
        seed: int | None,
        provider: str,
        job_id: str,
        owner: str,
    ) -> ArtifactRef:
        """Store ``data`` (once per content) and add ``owner``'s reference to it."""
        ext = EXTENSIONS.get(mime_type)
        if ext is None:
            raise invalid_argument(
                "mime_type",
                "UNSUPPORTED_MIME_TYPE",
                f"cannot store {mime_type!r}; accepted: {', '.join(sorted(EXTENSIONS))}",
            )
        if len(data) > _HASH_IN_THREAD:
            sha256 = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        else:
            sha256 = hashlib.sha256(data).hexdigest()
        now = self._clock()
        new = NewRef(
            # Unless these bytes are known already. (strftime would cost 10x these fields.)
            path=f"{now.year:04d}/{now.month:02d}/{now.day:02d}/{sha256}.{ext}",
            sha256=sha256,
            mime_type=mime_type,
            size=len(data),
            width=width,
            height=height,
            now=now.timestamp(),
            owner=owner,
            job_id=job_id,
            file_name=file_name,
            seed=seed,
            provider=provider,
        )
        blobs, index = self.blobs, self.index
        if self._local:
            assert isinstance(blobs, LocalBlobStore) and isinstance(index, SqliteArtifactIndex)
            row = await index.register_and_write(
                new, lambda key: blobs.put_now(key, data), blobs.has_now
            )
        else:
            row = await index.register(new)
            # After the row: a retention delete of these bytes finished before the register
            # returned, and none starts before the row is fresh_s old, so this write stays.
            # Write-once: known bytes cost a look, new ones are written without (on S3 a
            # HEAD fewer).
            try:
                await blobs.put(row.path, data, fresh=row.new_blob)
            except BaseException:
                if row.new_blob:  # a row this put made, whose bytes never came: take it back
                    await self._forget_unwritten(row.path, row.sha256, new.now)
                raise
        ref = self._ref(row)
        for listener in self._put_listeners:
            try:
                listener(ref)
            except Exception:
                logger.exception("put listener failed for %s", ref.name)
        return ref

    async def get(self, name: str, owner: str | None) -> ArtifactRef:
        """Metadata of ``name`` as ``owner`` sees it (``None``: admin, any reference)."""
        rel = self.relative_path(name)
        row = await self.index.lookup(rel, owner)
        if row is None:
            raise artifact_not_found(name)
        made = self._made.get((rel, owner))
        if made is not None and made[0] is row:
            return made[1]
        ref = self._ref(row)
        if len(self._made) >= _REFS_MADE:
            self._made.clear()  # bounded; refilled by the next reads
        self._made[rel, owner] = (row, ref)
        return ref

    async def read(
        self,
        name: str,
        owner: str | None,
        offset: int = 0,
        limit: int = 0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        *,
        frame: Frame | None = None,
    ) -> AsyncIterator[bytes]:
        """The bytes of ``name`` from ``offset``, at most ``limit`` (0: to the end), in chunks,
        each inside its ``frame`` if one is given (:data:`aiserver.blobs.protocol.Frame`).

        Errors are raised before the first chunk. ``offset`` equal to the size yields nothing.
        """
        if offset < 0:
            raise invalid_argument("read_offset", "INVALID_READ_OFFSET", "must not be negative")
        if limit < 0:
            raise invalid_argument("read_limit", "INVALID_READ_LIMIT", "must not be negative")
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        ref = await self.get(name, owner)
        rel = self.relative_path(ref.name)
        size = await self.blobs.size(rel)
        if size is None:
            logger.warning("artifact %s is registered but its blob is missing", ref.name)
            raise artifact_not_found(name)
        if offset > size:
            raise ServiceError(
                # The contract says OUT_OF_RANGE; ErrorKind has no such member yet.
                ErrorKind.INVALID_ARGUMENT,
                "READ_OFFSET_OUT_OF_RANGE",
                f"read_offset {offset} is beyond the end ({size} bytes)",
                violations=(FieldViolation("read_offset", f"beyond the end ({size} bytes)"),),
                metadata={"field": "read_offset", "size": str(size)},
            )
        length = size - offset if limit == 0 else min(limit, size - offset)
        if length == 0:
            return
        chunks = self.blobs.read(rel, offset, length, chunk_size, frame=frame)
        try:
            first = await anext(chunks)
        except FileNotFoundError as exc:  # deleted between the size and the read
            raise artifact_not_found(name) from exc
        except StopAsyncIteration:
            return
        yield first
        async for chunk in chunks:
            yield chunk

    @asynccontextmanager
    async def source_file(self, name: str) -> AsyncIterator[Path]:
        """A local file with the bytes of ``name`` for the ``with`` block (decoders in a
        worker pool need a path); NOT_FOUND when it is gone."""
        rel = self.relative_path(name)
        try:
            async with self.blobs.local_file(rel) as path:
                yield path
        except FileNotFoundError as exc:
            raise artifact_not_found(name) from exc

    def add_put_listener(self, listener: PutListener) -> None:
        """Have ``listener`` told of every stored artifact (preset variants are made then)."""
        self._put_listeners.append(listener)

    def add_delete_listener(self, listener: DeleteListener) -> None:
        """Have ``listener`` told of every deleted artifact (the variant cache drops its files)."""
        self._listeners.append(listener)

    async def sweep(
        self,
        max_age_s: float | None,
        max_total_bytes: int | None,
        protect: Callable[[str], bool],
        *,
        fresh_s: float = SWEEP_FRESH_S,
    ) -> list[str]:
        """Delete artifacts, least recently stored first; return the deleted names.

        First everything older than ``max_age_s``, then more until the total size is at most
        ``max_total_bytes``. Names for which ``protect(name)`` is true (still referenced,
        e.g. by a job that is not finished) are kept even if the budget stays exceeded, and
        so are blobs stored less than ``fresh_s`` ago: a put writes its bytes after its row
        (a delete in between would leave bytes no row lists), and with several coordinators
        an output another one just stored is in no job record until that job's next save.
        """
        blobs = await self.index.blobs()
        now = self._clock().timestamp()
        total = sum(b.size for b in blobs)
        victims: list[StoredBlob] = []
        for blob in blobs:
            too_old = max_age_s is not None and now - blob.last_put > max_age_s
            too_big = max_total_bytes is not None and total > max_total_bytes
            if not (too_old or too_big):
                break  # oldest first: the rest are newer, and the total only shrinks
            if protect(blob.name) or now - blob.last_put < fresh_s:
                continue
            victims.append(blob)
            total -= blob.size
        deleted: list[str] = []
        for blob in victims:
            if await self._delete(blob):
                deleted.append(blob.name)
        if deleted:
            logger.info("retention deleted %d artifacts", len(deleted))
        return deleted

    async def _forget_unwritten(self, path: str, sha256: str, last_put: float) -> None:
        async def nothing() -> None:
            return None

        try:  # best effort, even when cancelled: a row left here is swept as a missing blob
            await asyncio.shield(self.index.forget(path, sha256, last_put, nothing))
        except Exception:
            logger.exception("could not take back the row of unwritten blob %s", path)

    async def _delete(self, blob: StoredBlob) -> bool:
        rel = self.relative_path(blob.name)
        if not await self.index.forget(
            rel, blob.sha256, blob.last_put, lambda: self.blobs.delete(rel)
        ):
            return False  # stored again meanwhile: it is new again

        def tell() -> None:
            for listener in self._listeners:
                try:
                    listener(blob.name, blob.sha256)
                except Exception:
                    logger.exception("delete listener failed for %s", blob.name)

        await asyncio.to_thread(tell)
        return True

    async def close(self) -> None:
        """Close the index and the blob store; the store is unusable afterwards."""
        await self.index.close()
        await self.blobs.close()
