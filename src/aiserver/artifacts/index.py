"""The artifact index: which blobs exist and who references them, next to the jobs.

Two twins with one behaviour: :class:`SqliteArtifactIndex` (the embedded default, its own file
``artifacts.sqlite3`` beside the blobs, as before) and :class:`PostgresArtifactIndex` (tables
``artifact_blobs`` and ``artifact_refs`` in the job database, migrated with the jobs).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, Self, TypeVar

from aiserver.artifacts.locks import KeyedLock

if TYPE_CHECKING:
    import asyncpg

__all__ = [
    "ArtifactIndex",
    "IndexedRef",
    "NewRef",
    "PostgresArtifactIndex",
    "SqliteArtifactIndex",
    "StoredBlob",
    "open_artifact_index",
]

_P = ParamSpec("_P")
_BLOB_LOCK = 0x6162  # first key of per-hash advisory locks (pg_advisory_lock(int, int))
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """One stored blob, as retention sees it."""

    name: str
    sha256: str
    size: int
    last_put: float


@dataclass(frozen=True, slots=True)
class IndexedRef:
    """One owner's reference to a blob, with the blob's metadata."""

    path: str
    sha256: str
    mime_type: str
    size: int
    width: int
    height: int
    owner: str
    job_id: str
    file_name: str
    seed: int | None
    provider: str
    ref_created: float


@dataclass(frozen=True, slots=True)
class NewRef:
    """What :meth:`ArtifactIndex.register` records."""

    path: str
    sha256: str
    mime_type: str
    size: int
    width: int
    height: int
    now: float
    owner: str
    job_id: str
    file_name: str
    seed: int | None
    provider: str


class ArtifactIndex(Protocol):
    async def path_of_hash(self, sha256: str) -> str | None:
        """The key under which these bytes were first stored, if they were."""
        ...

    async def register(self, ref: NewRef) -> IndexedRef:
        """Record the blob (or refresh its ``last_put``) and the owner's reference to it.

        If the same bytes are indexed under another key already, the reference goes to that
        key: the returned ``path`` is the one to use."""
        ...

    async def lookup(
        self, path: str, owner: str | None, job_id: str | None = None
    ) -> IndexedRef | None:
        """The newest reference to ``path`` by ``owner`` (``None``: anyone's)."""
        ...

    async def blobs(self) -> list[StoredBlob]:
        """Every blob, least recently stored first."""
        ...

    def hold(self, sha256: str) -> AbstractAsyncContextManager[None]:
        """Exclusive use of these bytes across every process sharing the index, for the
        span of a put or a delete (so a delete never removes bytes a put just counted on)."""
        ...

    async def forget(self, path: str, last_put: float) -> bool:
        """Drop the blob and its references if nobody stored it again since ``last_put``."""
        ...

    async def close(self) -> None: ...


_SELECT_REF = (
    "SELECT b.path, b.sha256, b.mime_type, b.size, b.width, b.height, r.owner, r.job_id,"
    " r.file_name, r.seed, r.provider, r.created AS ref_created"
)


def _ref_of(row: Any) -> IndexedRef:
    return IndexedRef(*(row[i] for i in range(12)))


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    path TEXT PRIMARY KEY,            -- {yyyy}/{mm}/{dd}/{sha256}.{ext}
    sha256 TEXT NOT NULL UNIQUE,
    mime_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    created REAL NOT NULL,
    last_put REAL NOT NULL            -- retention age counts from the latest reference
);
CREATE INDEX IF NOT EXISTS blobs_last_put ON blobs (last_put);
CREATE TABLE IF NOT EXISTS refs (
    path TEXT NOT NULL REFERENCES blobs (path) ON DELETE CASCADE,
    owner TEXT NOT NULL,
    job_id TEXT NOT NULL,
    file_name TEXT NOT NULL,
    seed INTEGER,
    provider TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (path, owner, job_id)
);
"""


class SqliteArtifactIndex:
    """The index in one SQLite file (WAL); one connection, one thread at a time."""

    def __init__(self, path: Path) -> None:
        self._holds = KeyedLock()
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.executescript(_SQLITE_SCHEMA)

    async def _db(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        # Commits can wait on the disk; one connection, used by one thread at a time.
        def locked() -> _T:
            with self._lock:
                return fn(*args, **kwargs)

        return await asyncio.to_thread(locked)

    async def _read(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        # A read by key in WAL mode takes microseconds and does not wait for writers: when
        # the connection is free it is done here, saving the thread hop (the larger cost).
        if self._lock.acquire(blocking=False):
            try:
                return fn(*args, **kwargs)
            finally:
                self._lock.release()
        return await self._db(fn, *args, **kwargs)

    def _path_of_hash(self, sha256: str) -> str | None:
        row = self._conn.execute("SELECT path FROM blobs WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None else str(row[0])

    async def path_of_hash(self, sha256: str) -> str | None:
        return await self._read(self._path_of_hash, sha256)

    def _lookup(self, path: str, owner: str | None, job_id: str | None) -> IndexedRef | None:
        sql = f"{_SELECT_REF} FROM blobs b JOIN refs r ON r.path = b.path WHERE b.path = ?"
        args: list[str] = [path]
        if owner is not None:
            sql += " AND r.owner = ?"
            args.append(owner)
        if job_id is not None:
            sql += " AND r.job_id = ?"
            args.append(job_id)
        row = self._conn.execute(sql + " ORDER BY r.created DESC LIMIT 1", args).fetchone()
        return None if row is None else _ref_of(row)

    async def register(self, ref: NewRef) -> IndexedRef:
        try:
            return await self._db(self._register, ref)
        except sqlite3.IntegrityError:
            first = await self.path_of_hash(ref.sha256)  # same bytes, indexed under another key
            if first is None or first == ref.path:
                raise
            return await self._db(self._register, replace(ref, path=first))

    def register_now(self, ref: NewRef) -> IndexedRef:
        """:meth:`register` in the calling thread (a worker's: the commit may wait on the
        disk), for a caller that has other blocking work to do in the same hop.
        ``sqlite3.IntegrityError`` where :meth:`register` would look for the other key."""
        with self._lock:
            return self._register(ref)

    def _register(self, ref: NewRef) -> IndexedRef:
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.execute(
                "INSERT INTO blobs (path, sha256, mime_type, size, width, height, created,"
                " last_put) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (path) DO UPDATE SET last_put = excluded.last_put",
                (ref.path, ref.sha256, ref.mime_type, ref.size, ref.width, ref.height,
                 ref.now, ref.now),
            )  # fmt: skip
            c.execute(
                "INSERT INTO refs (path, owner, job_id, file_name, seed, provider, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (path, owner, job_id) DO UPDATE"
                " SET file_name = excluded.file_name, seed = excluded.seed,"
                " provider = excluded.provider, created = excluded.created",
                (ref.path, ref.owner, ref.job_id, ref.file_name, ref.seed, ref.provider,
                 ref.now),
            )  # fmt: skip
            found = self._lookup(ref.path, ref.owner, ref.job_id)
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        assert found is not None
        return found

    async def lookup(
        self, path: str, owner: str | None, job_id: str | None = None
    ) -> IndexedRef | None:
        # Every artifact and variant read asks this first (the hop was most of a warm variant).
        return await self._read(self._lookup, path, owner, job_id)

    @contextlib.asynccontextmanager
    async def hold(self, sha256: str) -> AsyncIterator[None]:
        async with self._holds.hold(sha256):  # SQLite serves one process: a lock in memory
            yield

    async def blobs(self) -> list[StoredBlob]:
        def select() -> list[StoredBlob]:
            rows = self._conn.execute(
                "SELECT path, sha256, size, last_put FROM blobs ORDER BY last_put, path"
            ).fetchall()
            return [StoredBlob(f"artifacts/{r[0]}", r[1], r[2], r[3]) for r in rows]

        return await self._db(select)

    async def forget(self, path: str, last_put: float) -> bool:
        def delete() -> bool:
            cur = self._conn.execute(
                "DELETE FROM blobs WHERE path = ? AND last_put = ?", (path, last_put)
            )
            return cur.rowcount == 1

        return await self._db(delete)

    async def close(self) -> None:
        def close() -> None:
            with self._lock, contextlib.suppress(sqlite3.Error):
                self._conn.close()

        await asyncio.to_thread(close)


class PostgresArtifactIndex:
    """The index in the job database (tables from the job store's migrations). Connects on
    first use, so a service can build it before its event loop runs."""

    def __init__(self, url: str, *, schema: str = "public", pool_size: int = 4) -> None:
        self._url = url
        self._schema = schema
        self._pool_size = pool_size
        self._pool_: asyncpg.Pool | None = None
        self._locks: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    @classmethod
    async def open(cls, url: str, *, schema: str = "public", pool_size: int = 4) -> Self:
        index = cls(url, schema=schema, pool_size=pool_size)
        await index._connect()
        return index

    async def _connect(self) -> asyncpg.Pool:
        async with self._opening:
            if self._pool_ is None:
                import asyncpg

                from aiserver.jobs.store.postgres import keep_session, migrate

                await migrate(self._url, self._schema)
                self._pool_ = await asyncpg.create_pool(
                    self._url,
                    min_size=1,
                    max_size=self._pool_size,
                    server_settings={"search_path": self._schema},
                    reset=keep_session,  # no session state here (the locks have their pool)
                )
                self._locks = await asyncpg.create_pool(
                    self._url, min_size=0, max_size=self._pool_size
                )
            return self._pool_

    async def path_of_hash(self, sha256: str) -> str | None:
        found = await (await self._connect()).fetchval(
            "SELECT path FROM artifact_blobs WHERE sha256 = $1", sha256
        )
        return None if found is None else str(found)

    async def register(self, ref: NewRef) -> IndexedRef:
        import asyncpg

        try:
            return await self._register(ref)
        except asyncpg.UniqueViolationError:
            # Another process stored the same bytes first, under another date's key: the
            # first key is the name for good (the caller drops its own copy).
            first = await self.path_of_hash(ref.sha256)
            if first is None or first == ref.path:
                raise
            return await self._register(replace(ref, path=first))

    async def _register(self, ref: NewRef) -> IndexedRef:
        async with (await self._connect()).acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO artifact_blobs (path, sha256, mime_type, size, width, height,"
                " created, last_put) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)"
                " ON CONFLICT (path) DO UPDATE SET last_put = excluded.last_put",
                ref.path, ref.sha256, ref.mime_type, ref.size, ref.width, ref.height, ref.now,
            )  # fmt: skip
            await conn.execute(
                "INSERT INTO artifact_refs (path, owner, job_id, file_name, seed, provider,"
                " created) VALUES ($1, $2, $3, $4, $5, $6, $7)"
                " ON CONFLICT (path, owner, job_id) DO UPDATE SET file_name = excluded.file_name,"
                " seed = excluded.seed, provider = excluded.provider, created = excluded.created",
                ref.path, ref.owner, ref.job_id, ref.file_name, ref.seed, ref.provider, ref.now,
            )  # fmt: skip
            found = await self._lookup(conn, ref.path, ref.owner, ref.job_id)
        assert found is not None
        return found

    async def _lookup(
        self, conn: Any, path: str, owner: str | None, job_id: str | None
    ) -> IndexedRef | None:
        row = await conn.fetchrow(
            f"{_SELECT_REF} FROM artifact_blobs b JOIN artifact_refs r ON r.path = b.path"
            " WHERE b.path = $1 AND ($2::text IS NULL OR r.owner = $2)"
            " AND ($3::text IS NULL OR r.job_id = $3) ORDER BY r.created DESC LIMIT 1",
            path,
            owner,
            job_id,
        )
        return None if row is None else _ref_of(row)

    async def lookup(
        self, path: str, owner: str | None, job_id: str | None = None
    ) -> IndexedRef | None:
        return await self._lookup(await self._connect(), path, owner, job_id)

    @contextlib.asynccontextmanager
    async def hold(self, sha256: str) -> AsyncIterator[None]:
        # A session advisory lock on a connection kept for the with block. Lock connections
        # come from their own pool: a holder also queries, and nesting two acquires from one
        # pool would deadlock once every connection is held by a waiting holder.
        await self._connect()
        assert self._locks is not None
        async with self._locks.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1, hashtext($2))", _BLOB_LOCK, sha256)
            try:
                yield
            finally:
                await conn.execute(
                    "SELECT pg_advisory_unlock($1, hashtext($2))", _BLOB_LOCK, sha256
                )

    async def blobs(self) -> list[StoredBlob]:
        rows = await (await self._connect()).fetch(
            "SELECT path, sha256, size, last_put FROM artifact_blobs ORDER BY last_put, path"
        )
        return [StoredBlob(f"artifacts/{r[0]}", r[1], r[2], r[3]) for r in rows]

    async def forget(self, path: str, last_put: float) -> bool:
        found = await (await self._connect()).fetchval(
            "DELETE FROM artifact_blobs WHERE path = $1 AND last_put = $2 RETURNING path",
            path,
            last_put,
        )
        return found is not None

    async def close(self) -> None:
        async with self._opening:
            if self._pool_ is not None:
                await self._pool_.close()
                self._pool_ = None
            if self._locks is not None:
                await self._locks.close()
                self._locks = None


def open_artifact_index(database_url: str, schema: str, folder: Path) -> ArtifactIndex:
    """In the PostgreSQL job database when ``database_url`` names one, else SQLite in
    ``folder`` (the embedded default)."""
    if database_url.startswith(("postgresql://", "postgres://")):
        return PostgresArtifactIndex(database_url, schema=schema or "public")
    return SqliteArtifactIndex(folder / "artifacts.sqlite3")
