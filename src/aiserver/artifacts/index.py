"""The artifact index: which blobs exist and who references them, next to the jobs.

Two twins with one behaviour: :class:`SqliteArtifactIndex` (the embedded default, its own file
``artifacts.sqlite3`` beside the blobs, as before) and :class:`PostgresArtifactIndex` (tables
``artifact_blobs`` and ``artifact_refs`` in the job database, migrated with the jobs).

A put and a retention delete of the same bytes never lose them, whichever processes run them:
:meth:`ArtifactIndex.register` is one statement and the caller writes the bytes after it;
:meth:`ArtifactIndex.forget` deletes the bytes before a register of the same hash can return
(PostgreSQL: the deleted row stays locked until the bytes are gone, and an insert of a
conflicting key waits for that lock; SQLite serves one process: a lock in memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, Protocol, Self, TypeVar

from aiserver.artifacts.locks import KeyedLock
from aiserver.jobs.store.group_commit import GroupCommit
from aiserver.jobs.store.pg_shelf import ConnectionShelf

__all__ = [
    "ArtifactIndex",
    "IndexedRef",
    "NewRef",
    "PostgresArtifactIndex",
    "SqliteArtifactIndex",
    "StoredBlob",
    "open_artifact_index",
]

logger = logging.getLogger(__name__)

_DROP_S = 30.0
"""The longest a PostgreSQL delete keeps its blob's row locked while the bytes are deleted."""
_P = ParamSpec("_P")
_T = TypeVar("_T")

Drop = Callable[[], Awaitable[None]]
"""Deletes a blob's bytes (:meth:`ArtifactIndex.forget` calls it at the right moment)."""


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
    new_blob: bool = False
    """Set by :meth:`ArtifactIndex.register` when its row for these bytes is new: nothing is
    stored under ``path`` yet, most likely (no need to look before writing)."""


@dataclass(frozen=True, slots=True)
class NewRef:
    """What :meth:`ArtifactIndex.register` records. ``path`` is the key for bytes never
    stored before; bytes indexed already keep their first key (and its MIME type)."""

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
    async def register(self, ref: NewRef) -> IndexedRef:
        """Record the blob (or refresh its ``last_put``) and the owner's reference to it, in
        one statement. If the same bytes are indexed already, under whichever key, the
        reference goes to that key: the returned ``path`` is where the bytes belong.

        The caller writes the bytes under the returned ``path`` afterwards (write-once per
        key): a :meth:`forget` of these bytes has deleted them before this returns."""
        ...

    async def lookup(
        self, path: str, owner: str | None, job_id: str | None = None
    ) -> IndexedRef | None:
        """The newest reference to ``path`` by ``owner`` (``None``: anyone's)."""
        ...

    async def blobs(self) -> list[StoredBlob]:
        """Every blob, least recently stored first."""
        ...

    async def forget(self, path: str, sha256: str, last_put: float, drop: Drop) -> bool:
        """Drop the blob and its references if nobody stored it again since ``last_put``,
        and its bytes with ``drop``: a :meth:`register` of the same bytes, from any process,
        returns only once ``drop`` is done, so its caller's write comes after the delete.

        An error of ``drop`` propagates; PostgreSQL then keeps the row (the next sweep tries
        again), SQLite has dropped it already (the bytes stay unindexed, as before)."""
        ...

    async def start(self) -> None:
        """Connect (and, in PostgreSQL, migrate) now, at server start, rather than in the
        first request: :class:`~aiserver.jobs.store.StoreUnavailable` when it cannot."""
        ...

    async def close(self) -> None: ...


_REF_COLUMNS = (
    "b.path, b.sha256, b.mime_type, b.size, b.width, b.height, r.owner, r.job_id,"
    " r.file_name, r.seed, r.provider, r.created"
)
_SELECT_REF = f"SELECT {_REF_COLUMNS} AS ref_created"
# The blob's columns a register returns (an existing row's, when the bytes are known), and
# the reference's: together an IndexedRef, with no read-back.
_BLOB_RETURNING = "RETURNING path, sha256, mime_type, size, width, height"
_REF_RETURNING = "RETURNING owner, job_id, file_name, seed, provider, created"
_REF_UPSERT = (
    " ON CONFLICT (path, owner, job_id) DO UPDATE SET file_name = excluded.file_name,"
    " seed = excluded.seed, provider = excluded.provider, created = excluded.created"
)


def _ref_of(row: Any, new_blob: bool = False) -> IndexedRef:
    r = row
    return IndexedRef(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11],
                      new_blob)  # fmt: skip


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


CHECKPOINT_EVERY = 200
"""SQLite index writes between two WAL checkpoints (run in a thread, off the commits)."""
LOOKUPS_KEPT = 4096
"""References found by :meth:`SqliteArtifactIndex.lookup` kept until the next write."""


class SqliteArtifactIndex:
    """The index in one SQLite file (WAL); one connection, one thread at a time.

    SQLite serves one process, so a register and a forget of the same bytes take turns on
    a lock in memory (per hash).

    Short statements run on the event loop when the connection is free: a commit in WAL mode
    with ``synchronous=NORMAL`` does not wait for the disk, and a thread hop costs more CPU
    than the statement. The one part of a commit that waits for the disk, the WAL
    checkpoint, is taken off it (``wal_autocheckpoint=0``) and run in a thread every
    :data:`CHECKPOINT_EVERY` writes, holding the connection: no write lands during it, so
    it copies the whole WAL and the next write starts the file over.

    References found are kept until the next write (every warm variant and artifact read
    begins with a lookup; the statement cost more than the rest of a warm variant's
    handler). The file changes only through this object, and each write empties them
    first, holding the connection's lock: a lookup answered from them is one that could
    have run just before that write."""

    def __init__(self, path: Path) -> None:
        self._holds = KeyedLock()
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA wal_autocheckpoint=0")
        self._conn.executescript(_SQLITE_SCHEMA)
        self._writes = 0
        self._closed = False
        self._found: dict[tuple[str, str | None, str | None], IndexedRef] = {}

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
        if row is None:
            return None  # not kept: a put may come
        found = _ref_of(row)
        if len(self._found) >= LOOKUPS_KEPT:
            self._found.clear()  # bounded; refilled by the next lookups
        self._found[(path, owner, job_id)] = found  # under the lock, as writes empty it
        return found

    async def register(self, ref: NewRef) -> IndexedRef:
        async with self._holds.hold(ref.sha256):
            row = await self._read(self._register, ref)
        await self._after_write()
        return row

    async def register_and_write(
        self,
        ref: NewRef,
        write_now: Callable[[str], None],
        present: Callable[[str], bool],
    ) -> IndexedRef:
        """:meth:`register`, then ``write_now(path)`` unless the bytes are there already.

        Bytes indexed already whose file is ``present`` are registered on the loop when the
        connection is free: no thread hop. New bytes are registered and written in one
        worker thread (the write waits for the disk; a register on the loop beside such
        threads cost more in GIL hand-offs than it saved)."""

        def both() -> IndexedRef:
            with self._lock:
                row = self._register(ref)
            if row.new_blob or not present(row.path):
                write_now(row.path)
            return row

        async with self._holds.hold(ref.sha256):
            row = None
            if self._lock.acquire(blocking=False):
                try:
                    known = self._conn.execute(
                        "SELECT path FROM blobs WHERE sha256 = ?", (ref.sha256,)
                    ).fetchone()
                    if known is not None and present(known[0]):
                        row = self._register(ref)
                finally:
                    self._lock.release()
            if row is None or (row.new_blob and not present(row.path)):
                row = await asyncio.get_running_loop().run_in_executor(None, both)
        await self._after_write()
        return row

    async def _after_write(self) -> None:
        """Every CHECKPOINT_EVERY writes, the write that makes it due waits for a checkpoint
        in a thread (the loop does not): the WAL then starts over within about that many
        writes, however busy the machine (a checkpoint left to run whenever its thread got
        the GIL let the WAL grow with the writes made meanwhile)."""
        self._writes += 1
        if self._writes % CHECKPOINT_EVERY:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._checkpoint)
        except Exception as exc:  # the write itself is done; the next due one tries again
            logger.warning("WAL checkpoint of the artifact index failed: %s", exc)

    def _checkpoint(self) -> None:
        with self._lock:  # writes meanwhile wait (a register on the loop goes to a thread)
            if not self._closed:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _register(self, ref: NewRef) -> IndexedRef:
        self._found.clear()  # before the change: see the class docstring
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            blob = c.execute(
                "INSERT INTO blobs (path, sha256, mime_type, size, width, height, created,"
                " last_put) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (sha256) DO UPDATE SET last_put = excluded.last_put "
                # New row: created = last_put (an old one put again at the very same
                # instant looks new too; its caller then writes without looking first)
                + _BLOB_RETURNING
                + ", created = last_put",
                (ref.path, ref.sha256, ref.mime_type, ref.size, ref.width, ref.height,
                 ref.now, ref.now),
            ).fetchone()  # fmt: skip
            mine = c.execute(
                "INSERT INTO refs (path, owner, job_id, file_name, seed, provider, created)"
                f" VALUES (?, ?, ?, ?, ?, ?, ?){_REF_UPSERT} {_REF_RETURNING}",
                (blob[0], ref.owner, ref.job_id, ref.file_name, ref.seed, ref.provider,
                 ref.now),
            ).fetchone()  # fmt: skip
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return _ref_of(blob[:6] + mine, bool(blob[6]))

    async def lookup(
        self, path: str, owner: str | None, job_id: str | None = None
    ) -> IndexedRef | None:
        # Every artifact and variant read asks this first (the hop was most of a warm variant).
        found = self._found.get((path, owner, job_id))
        if found is not None:
            return found
        return await self._read(self._lookup, path, owner, job_id)

    async def blobs(self) -> list[StoredBlob]:
        def select() -> list[StoredBlob]:
            rows = self._conn.execute(
                "SELECT path, sha256, size, last_put FROM blobs ORDER BY last_put, path"
            ).fetchall()
            return [StoredBlob(f"artifacts/{r[0]}", r[1], r[2], r[3]) for r in rows]

        return await self._db(select)

    async def forget(self, path: str, sha256: str, last_put: float, drop: Drop) -> bool:
        def delete() -> bool:
            self._found.clear()  # before the change: see the class docstring
            cur = self._conn.execute(
                "DELETE FROM blobs WHERE path = ? AND last_put = ?", (path, last_put)
            )
            return cur.rowcount == 1

        async with self._holds.hold(sha256):  # a register of these bytes waits for the drop
            if not await self._db(delete):
                return False
            await self._after_write()
            await drop()
        return True

    async def start(self) -> None:
        pass  # opened in the constructor (a bad file is a start-up error there)

    async def close(self) -> None:
        def close() -> None:
            with self._lock, contextlib.suppress(sqlite3.Error):
                self._closed = True
                self._conn.close()

        await asyncio.to_thread(close)


# One statement, one round trip: the blob row (inserted, or the known bytes' row with its
# last_put refreshed: ON CONFLICT on the hash keeps the first key) and the reference to it.
# An insert that meets a row being deleted by an open forget waits for its commit.
_PG_REGISTER = (
    "WITH b AS (INSERT INTO artifact_blobs (path, sha256, mime_type, size, width, height,"
    " created, last_put) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)"
    f" ON CONFLICT (sha256) DO UPDATE SET last_put = excluded.last_put {_BLOB_RETURNING},"
    " xmax = 0 AS inserted),"  # an updated row has the updater's id in xmax
    " r AS (INSERT INTO artifact_refs (path, owner, job_id, file_name, seed, provider, created)"
    f" SELECT path, $8, $9, $10, $11, $12, $7 FROM b{_REF_UPSERT} {_REF_RETURNING})"
    f" SELECT {_REF_COLUMNS}, b.inserted FROM b, r"
)
# Several registers (of different bytes) as one statement, as the job store groups its
# writes (jobs/store/group_commit.py): one round trip and one commit for the puts that meet.
# Blob rows are inserted in hash order: two groups meeting on the same bytes wait in one order.
_PG_REGISTER_GROUP = (
    "WITH v AS MATERIALIZED (SELECT * FROM unnest($1::text[], $2::text[], $3::text[],"
    " $4::bigint[], $5::integer[], $6::integer[], $7::double precision[], $8::text[],"
    " $9::text[], $10::text[], $11::bigint[], $12::text[]) AS v(path, sha256, mime_type,"
    " size, width, height, now, owner, job_id, file_name, seed, provider)),"
    " b AS (INSERT INTO artifact_blobs (path, sha256, mime_type, size, width, height,"
    " created, last_put) SELECT path, sha256, mime_type, size, width, height, now, now"
    " FROM v ORDER BY sha256"
    f" ON CONFLICT (sha256) DO UPDATE SET last_put = excluded.last_put {_BLOB_RETURNING},"
    " xmax = 0 AS inserted),"
    " r AS (INSERT INTO artifact_refs (path, owner, job_id, file_name, seed, provider, created)"
    " SELECT b.path, v.owner, v.job_id, v.file_name, v.seed, v.provider, v.now"
    f" FROM b JOIN v ON v.sha256 = b.sha256{_REF_UPSERT}"
    " RETURNING path, owner, job_id, file_name, seed, provider, created)"
    f" SELECT {_REF_COLUMNS}, b.inserted FROM b JOIN r ON r.path = b.path"
)


class PostgresArtifactIndex:
    """The index in the job database (tables from the job store's migrations). Connects in
    :meth:`start` (the service's start, so a request never waits for a migration), or on
    first use when not started; a service can build it before its event loop runs."""

    def __init__(
        self, url: str, *, schema: str = "public", pool_size: int = 4, timeout_s: float = 5.0
    ) -> None:
        self._url = url
        self._schema = schema
        self._pool_size = pool_size
        self._timeout_s = timeout_s
        self._pool_: ConnectionShelf | None = None
        self._opening = asyncio.Lock()
        # Registers of different bytes that meet go in one statement.
        self._registers = GroupCommit(self._register_one, self._register_group, _sha256)

    @classmethod
    async def open(
        cls, url: str, *, schema: str = "public", pool_size: int = 4, timeout_s: float = 5.0
    ) -> Self:
        index = cls(url, schema=schema, pool_size=pool_size, timeout_s=timeout_s)
        await index._connect()
        return index

    async def _connect(self) -> ConnectionShelf:
        if self._pool_ is not None:
            return self._pool_
        async with self._opening:
            if self._pool_ is None:
                import asyncpg

                from aiserver.jobs.store.postgres import (
                    PLANNER_SETTINGS,
                    bounded_pool_options,
                    keep_session,
                    migrate,
                )

                await migrate(
                    self._url,
                    self._schema,
                    connect_timeout_s=self._timeout_s,
                    lock_timeout_s=self._timeout_s,
                )
                pool = await asyncpg.create_pool(
                    self._url,
                    min_size=1,
                    max_size=self._pool_size,
                    reset=keep_session,  # no session state: no advisory locks, no LISTEN
                    # A delete holds its transaction open while the bytes go (_DROP_S).
                    **bounded_pool_options(
                        self._timeout_s,
                        {"search_path": self._schema, **PLANNER_SETTINGS},
                        idle_in_transaction_s=_DROP_S + self._timeout_s,
                    ),
                )
                # Statements borrow connections from the shelf, not the pool (pg_shelf.py).
                self._pool_ = ConnectionShelf(pool)
            return self._pool_

    async def start(self) -> None:
        from aiserver.jobs.store import StoreUnavailable, redacted
        from aiserver.jobs.store.postgres import OPEN_FAILURES

        try:
            await self._connect()
        except OPEN_FAILURES as exc:
            raise StoreUnavailable(
                f"cannot open the artifact index in the job database {redacted(self._url)}"
                f" (schema {self._schema}): {exc}"
            ) from exc

    async def register(self, ref: NewRef) -> IndexedRef:
        return await self._registers.write(ref)

    def _register_timeout(self) -> float:
        # A register of bytes being deleted waits for that delete's commit, up to _DROP_S:
        # a wait on a row lock, not an outage.
        return _DROP_S + self._timeout_s

    async def _register_one(self, ref: NewRef) -> IndexedRef:
        row = await (await self._connect()).fetchrow(
            _PG_REGISTER,
            ref.path, ref.sha256, ref.mime_type, ref.size, ref.width, ref.height, ref.now,
            ref.owner, ref.job_id, ref.file_name, ref.seed, ref.provider,
            timeout_s=self._register_timeout(),
        )  # fmt: skip
        assert row is not None  # both inserts return their row (DO UPDATE has no WHERE)
        return _ref_of(row, row[12])

    async def _register_group(self, group: Sequence[NewRef]) -> list[IndexedRef]:
        rows = await (await self._connect()).fetch(
            _PG_REGISTER_GROUP,
            *([getattr(ref, name) for ref in group] for name in _NEW_REF_FIELDS),
            timeout_s=self._register_timeout(),
        )
        by_sha = {row[1]: row for row in rows}
        # Both inserts return every row: a missing one fails the group (each goes alone).
        return [_ref_of(by_sha[ref.sha256], by_sha[ref.sha256][12]) for ref in group]

    async def lookup(
        self, path: str, owner: str | None, job_id: str | None = None
    ) -> IndexedRef | None:
        row = await (await self._connect()).fetchrow(
            f"{_SELECT_REF} FROM artifact_blobs b JOIN artifact_refs r ON r.path = b.path"
            " WHERE b.path = $1 AND ($2::text IS NULL OR r.owner = $2)"
            " AND ($3::text IS NULL OR r.job_id = $3) ORDER BY r.created DESC LIMIT 1",
            path,
            owner,
            job_id,
        )
        return None if row is None else _ref_of(row)

    async def blobs(self) -> list[StoredBlob]:
        from aiserver.jobs.store.postgres import SWEEP_STATEMENT_S

        rows = await (await self._connect()).fetch(
            "SELECT path, sha256, size, last_put FROM artifact_blobs ORDER BY last_put, path",
            timeout_s=SWEEP_STATEMENT_S,  # the whole table: slow when large, not an outage
        )
        return [StoredBlob(f"artifacts/{r[0]}", r[1], r[2], r[3]) for r in rows]

    async def forget(self, path: str, sha256: str, last_put: float, drop: Drop) -> bool:
        # The deleted row stays locked until the bytes are gone: a register of the same
        # bytes (an insert meeting the row's key) waits for this commit, then inserts anew
        # and its caller writes the bytes again. Should the drop fail, nothing is deleted.
        async with (await self._connect()).acquire() as conn, conn.transaction():
            found = await conn.fetchval(
                "DELETE FROM artifact_blobs WHERE path = $1 AND last_put = $2 RETURNING path",
                path,
                last_put,
            )
            if found is None:
                return False
            # Bounded: the row lock stalls every register of these bytes, on any process.
            # Past the bound the delete rolls back (the row stays) and the next sweep retries.
            async with asyncio.timeout(_DROP_S):
                await drop()
        return True

    async def close(self) -> None:
        async with self._opening:
            if self._pool_ is not None:
                await self._pool_.close()
                self._pool_ = None


_NEW_REF_FIELDS = (
    "path", "sha256", "mime_type", "size", "width", "height", "now",
    "owner", "job_id", "file_name", "seed", "provider",
)  # fmt: skip
"""The arrays of :data:`_PG_REGISTER_GROUP`, in order."""


def _sha256(ref: NewRef) -> str:
    return ref.sha256


def open_artifact_index(
    database_url: str, schema: str, folder: Path, *, timeout_s: float = 5.0
) -> ArtifactIndex:
    """In the PostgreSQL job database when ``database_url`` names one (``timeout_s`` bounds
    each statement and connect there), else SQLite in ``folder`` (the embedded default)."""
    if database_url.startswith(("postgresql://", "postgres://")):
        return PostgresArtifactIndex(database_url, schema=schema or "public", timeout_s=timeout_s)
    return SqliteArtifactIndex(folder / "artifacts.sqlite3")
