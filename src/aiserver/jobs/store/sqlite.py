""":class:`JobStore` on one SQLite file: the embedded default, for one process.

The store owns two connections and a dedicated thread. The writes (a create, a save, a lease,
an event, a claim: short statements by key) run on the event loop, one at a time in the order
they were issued (which the manager relies on): a commit in WAL mode with
``synchronous=NORMAL`` does not wait for the disk (~0.1 ms), and the hop to the thread and
back cost more CPU than the statement. The one slow part of a commit, the WAL checkpoint, is
taken off it (``wal_autocheckpoint=0``) and run in the thread every ``CHECKPOINT_EVERY``
writes, in the writes' turn (no write lands during it, so it copies the whole WAL and the
next write starts the file over); writes issued meanwhile wait on the loop for their turn,
not in the thread, and run together when it is given back (:mod:`.write_turn`). So does a
long write (``forget_outputs``), which runs in the thread too.
Scans and listings run in the thread on the second connection: the loop never waits on
them, nor do the writes (WAL readers do not block the writer); a scan sees every write
issued before it, perhaps later ones too. Claims and slot takes run in ``BEGIN IMMEDIATE``
transactions: the write lock makes them exclusive, as ``SKIP LOCKED`` does on PostgreSQL.
Announcements go through an in-process hub: SQLite is one process's database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self, TypeVar

from aiserver.errors import ErrorKind, ServiceError
from aiserver.jobs import codec
from aiserver.jobs.model import Job, WebhookDelivery
from aiserver.jobs.paging import page_size as _page_size
from aiserver.jobs.store import migrations, rows
from aiserver.jobs.store.announce import AnnouncementHub, Listener
from aiserver.jobs.store.protocol import (
    ActiveLimitReached,
    Announcement,
    JobQuery,
    JobRecord,
    Lease,
    LeaseLost,
    NewEvent,
    OutboxItem,
    QueueRanks,
    SlotClaim,
    StoredEvent,
)
from aiserver.jobs.store.write_turn import WriteTurn
from aiserver.tasks import TaskKind

__all__ = ["SqliteJobStore"]

_T = TypeVar("_T")

logger = logging.getLogger(__name__)

CHECKPOINT_EVERY = 200
"""Calls between two WAL checkpoints (a job is about five: the WAL stays near a few MB)."""


def _now_us() -> int:
    return time.time_ns() // 1000


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)


def _enter_wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """``journal_mode=WAL``, waiting for other openers: the switch needs the database to
    itself, and SQLite may answer "locked" at once (no busy handler) while another process
    opening at the same moment holds it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


class SqliteJobStore:
    """:class:`JobStore` on one SQLite file (WAL). Create with :meth:`open`."""

    def __init__(
        self, executor: ThreadPoolExecutor, conn: sqlite3.Connection, reader: sqlite3.Connection
    ) -> None:
        self._executor = executor
        self._conn = conn
        """Every write, by whoever has the turn: on the loop, or in the thread."""
        self._reader = reader
        """Scans, in the thread only."""
        self._closed = False
        self._hub = AnnouncementHub()
        self._turn = WriteTurn(executor)
        """The writes' turn (FIFO): taken at once, in the caller's step, when free."""
        self._writes = 0
        self._checkpoints: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(cls, path: Path, *, busy_timeout_s: float = 5.0) -> Self:
        """Open (and create or migrate) the database at ``path``."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobstore")

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(
                path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            try:
                conn.row_factory = sqlite3.Row
                conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
                # NORMAL in WAL mode: a power cut may lose the last commits, never corrupt.
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA wal_autocheckpoint=0")  # see _after_write
            except BaseException:
                conn.close()
                raise
            return conn

        def open_both() -> tuple[sqlite3.Connection, sqlite3.Connection]:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = connect()
            try:
                _enter_wal(conn, busy_timeout_s)
                conn.execute("PRAGMA foreign_keys=ON")
                _migrate(conn)
                reader = connect()
                reader.execute("PRAGMA query_only=ON")
            except BaseException:
                conn.close()
                raise
            return conn, reader

        try:
            conn, reader = await asyncio.get_running_loop().run_in_executor(executor, open_both)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(executor, conn, reader)

    async def _call(self, fn: Callable[[], _T], *, inline: bool = False) -> _T:
        """Run the write ``fn`` with the writing connection in its turn: on the loop when
        ``inline`` (a short statement), else in the thread. A caller cancelled while its
        write waits for the turn may find it written (see :mod:`.write_turn`)."""
        if self._closed:
            raise ServiceError(ErrorKind.UNAVAILABLE, "STORE_CLOSED", "the job store is closed")
        if inline:
            result = await self._turn.inline(fn)
        else:
            result = await self._turn.in_thread(fn)
        self._after_write()
        return result

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run the scan ``fn`` in the thread on the reading connection, once the writes
        issued before it are done (it sees them; writes issued after go on, on the loop)."""
        if self._closed:
            raise ServiceError(ErrorKind.UNAVAILABLE, "STORE_CLOSED", "the job store is closed")
        await self._turn.after_queued()  # writes wait for their turn: this scan comes after them
        reader = self._reader
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, reader)

    def _after_write(self) -> None:
        self._writes += 1
        if self._writes % CHECKPOINT_EVERY == 0 and not self._closed:
            task = asyncio.create_task(self._checkpoint())
            self._checkpoints.add(task)
            task.add_done_callback(self._checkpoints.discard)

    async def _checkpoint(self) -> None:
        if self._closed:
            return
        conn = self._conn

        def checkpoint() -> None:
            if not self._closed:  # closed while it waited for its turn
                _checkpoint(conn)

        try:
            # PASSIVE: never waits for readers; what it cannot copy now goes next time.
            await self._turn.in_thread(checkpoint)
        except Exception as exc:
            logger.warning("WAL checkpoint of the job database failed: %s", exc)

    # --- records ----------------------------------------------------------------------------

    async def create(
        self,
        record: JobRecord,
        *,
        max_active: int = 0,
        holder: str | None = None,
        lease_s: float = 0.0,
        events: Sequence[NewEvent] = (),
        input_bytes: Mapping[str, bytes] | None = None,
    ) -> tuple[JobRecord, bool]:
        row = rows.row_of(record)
        # A stored input has no spool file, so no reference for the spool's deletions.
        shas = {i.sha256 for i in record.job.inputs if not i.stored}
        kept = [
            (row["id"], i.sha256, _input_bytes(input_bytes, i.sha256))
            for i in record.job.inputs
            if i.stored
        ]
        stored = _event_rows(row["id"], events)

        lease = {
            "lease_holder": holder,
            "lease_expires_us": None if holder is None else _now_us() + _us(lease_s),
        }

        def insert() -> tuple[JobRecord, bool]:
            conn = self._conn

            def existing() -> tuple[JobRecord, bool] | None:
                found = conn.execute(_EXISTING_SQL, (row["owner"], row["ref_id"])).fetchone()
                return None if found is None else (rows.record_of(found), True)

            # BEGIN IMMEDIATE holds the write lock: the count and the insert are one step.
            with _transaction(conn):
                if max_active > 0:
                    active = conn.execute(_ACTIVE_SQL, (row["owner"],)).fetchone()[0]
                    if active >= max_active:
                        if (made := existing()) is not None:  # a retry is no new work
                            return made
                        raise ActiveLimitReached(row["owner"])
                if conn.execute(_CREATE_SQL, {**row, **lease}).rowcount == 0:
                    made = existing()  # (owner, ref_id) is taken
                    assert made is not None
                    return made
                if shas:
                    conn.executemany(
                        "INSERT OR IGNORE INTO job_inputs (job_id, sha256) VALUES (?, ?)",
                        [(row["id"], sha) for sha in shas],
                    )
                if kept:
                    conn.executemany(
                        "INSERT OR IGNORE INTO job_input_bytes (job_id, sha256, data)"
                        " VALUES (?, ?, ?)",
                        kept,
                    )
                if stored:
                    conn.executemany(_INSERT_EVENT_SQL, stored)
            return record, False

        made = await self._call(insert, inline=True)
        if not made[1]:
            self._announce(row["id"], events)
        return made

    async def save(
        self,
        record: JobRecord,
        *,
        holder: str | None = None,
        outbox: Sequence[tuple[str, bytes]] = (),
        events: Sequence[NewEvent] = (),
        release: bool = False,
        prune: str = "",
        announce: bool = True,
    ) -> None:
        row = rows.mutable_row_of(record)
        row["holder"] = holder
        sql = _SAVE_SQL[release, holder is not None]
        stored = _event_rows(row["id"], events) if events else []
        alone = not (outbox or stored or prune)  # one statement: atomic without BEGIN

        def update() -> None:
            conn = self._conn
            with contextlib.nullcontext() if alone else _transaction(conn):
                cur = conn.execute(sql, row)
                if cur.rowcount != 1:
                    if (
                        holder is not None
                        and conn.execute("SELECT 1 FROM jobs WHERE id = ?", (row["id"],)).fetchone()
                    ):
                        raise LeaseLost(row["id"])
                    raise ServiceError(
                        ErrorKind.NOT_FOUND, "JOB_NOT_FOUND", f"job {row['id']} is not stored"
                    )
                if alone:
                    return
                now = _now_us()
                conn.executemany(
                    "INSERT INTO webhook_outbox (job_id, url, body, due_us, created_us)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [(row["id"], url, body, now, now) for url, body in outbox],
                )
                if prune:
                    _prune(conn, row["id"], prune)
                conn.executemany(_INSERT_EVENT_SQL, stored)

        await self._call(update, inline=True)
        if announce:
            self._announce(row["id"], events)

    @property
    def holds_inputs(self) -> bool:
        return True

    async def input_bytes(self, job_id: str, sha256: str) -> bytes | None:
        def select() -> bytes | None:
            found = self._conn.execute(
                "SELECT data FROM job_input_bytes WHERE job_id = ? AND sha256 = ?",
                (job_id, sha256),
            ).fetchone()
            return None if found is None else bytes(found[0])

        return await self._call(select, inline=True)

    def _announce(self, job_id: str, events: Sequence[NewEvent]) -> None:
        if events:
            self._hub.publish(Announcement("event", job_id, max(e.sequence for e in events)))

    async def forget_outputs(self, sha256s: Collection[str]) -> int:
        gone = set(sha256s)
        if not gone:
            return 0

        def rewrite() -> int:
            changed = 0
            conn = self._conn
            with _transaction(conn):
                for sha in gone:
                    # Outputs are JSON; a LIKE on the hash finds the few rows worth decoding.
                    found = conn.execute(
                        "SELECT id, outputs FROM jobs WHERE outputs LIKE ?", (f"%{sha}%",)
                    ).fetchall()
                    for row in found:
                        kept = rows.without_outputs(row["outputs"], gone)
                        if kept is not None:
                            conn.execute(
                                "UPDATE jobs SET outputs = ? WHERE id = ?", (kept, row["id"])
                            )
                            changed += 1
            return changed

        return await self._call(rewrite)

    async def record_webhook(self, job_id: str, delivery: WebhookDelivery) -> None:
        text = rows.dumps(codec.encode_webhook(delivery))

        def update() -> None:
            self._conn.execute("UPDATE jobs SET webhook = ? WHERE id = ?", (text, job_id))

        await self._call(update, inline=True)

    async def get(self, job_id: str) -> JobRecord | None:
        def select() -> JobRecord | None:
            found = self._conn.execute(
                f"SELECT {rows.SELECT_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            return rows.record_of(found) if found is not None else None

        return await self._call(select, inline=True)

    async def query(
        self, query: JobQuery, *, page_size: int, page_token: str
    ) -> tuple[list[Job], str]:
        digest = query.digest()
        after = rows.decode_token(page_token, digest) if page_token else None
        size = _page_size(page_size)
        where: list[str] = []
        args: list[Any] = []
        if query.owner is not None:
            where.append("owner = ?")
            args.append(query.owner)
        if query.states:
            states = sorted(s.value for s in query.states)
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args.extend(states)
        if query.task is not None:
            where.append("task = ?")
            args.append(query.task.value)
        if query.tag:
            where.append("tag = ?")
            args.append(query.tag)
        if query.ref_id:
            where.append("ref_id = ?")
            args.append(query.ref_id)
        if after is not None:
            where.append("(created_us, id) < (?, ?)")  # keyset: stable under inserts
            args.extend(after)
        sql = (
            f"SELECT {rows.SELECT_COLUMNS} FROM jobs"
            f" {'WHERE ' + ' AND '.join(where) if where else ''}"
            " ORDER BY created_us DESC, id DESC LIMIT ?"
        )
        args.append(size + 1)

        def select(conn: sqlite3.Connection) -> tuple[list[Job], str]:
            found = conn.execute(sql, args).fetchall()
            jobs = [rows.record_of(r).job for r in found[:size]]
            if len(found) <= size:
                return jobs, ""
            last = found[size - 1]
            return jobs, rows.encode_token(last["created_us"], last["id"], digest)

        return await self._read(select)

    async def unfinished(self) -> list[JobRecord]:
        def select(conn: sqlite3.Connection) -> list[JobRecord]:
            found = conn.execute(
                f"SELECT {rows.SELECT_COLUMNS} FROM jobs WHERE state IN {rows.UNFINISHED_SQL}"
                " ORDER BY created_us, id"
            ).fetchall()
            return [rows.record_of(r) for r in found]

        return await self._read(select)

    # --- queue, quotas, references ----------------------------------------------------------

    async def count_active(self, owner: str | None = None) -> int:
        def count(conn: sqlite3.Connection) -> int:
            sql = f"SELECT count(*) FROM jobs WHERE state IN {rows.UNFINISHED_SQL}"
            if owner is None:
                return int(conn.execute(sql).fetchone()[0])
            return int(conn.execute(sql + " AND owner = ?", (owner,)).fetchone()[0])

        return await self._read(count)

    async def queue_position(self, job_id: str) -> int:
        def position(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT created_us, id FROM jobs WHERE id = ? AND state = 'QUEUED'", (job_id,)
            ).fetchone()
            if row is None:
                return 0
            ahead = conn.execute(
                "SELECT count(*) FROM jobs WHERE state = 'QUEUED' AND (created_us, id) < (?, ?)",
                (row[0], row[1]),
            ).fetchone()[0]
            return int(ahead) + 1

        return await self._read(position)

    async def inputs_in_use(self, sha256s: Collection[str]) -> set[str]:
        wanted = sorted(set(sha256s))
        if not wanted:
            return set()

        def select(conn: sqlite3.Connection) -> set[str]:
            marks = ", ".join("?" * len(wanted))
            found = conn.execute(
                "SELECT DISTINCT i.sha256 FROM job_inputs i JOIN jobs j ON j.id = i.job_id"
                f" WHERE i.sha256 IN ({marks}) AND j.state IN {rows.UNFINISHED_SQL}",
                wanted,
            ).fetchall()
            return {r[0] for r in found}

        return await self._read(select)

    async def artifacts_in_use(self) -> set[str]:
        def select(conn: sqlite3.Connection) -> set[str]:
            found = conn.execute(
                f"SELECT outputs FROM jobs WHERE state IN {rows.UNFINISHED_SQL} AND outputs != '[]'"
            ).fetchall()
            return {name for r in found for name in rows.output_names(r[0])}

        return await self._read(select)

    # --- one queue across processes: positions, work stealing -------------------------------

    async def queue_ranks(
        self, *, holder: str | None = None, job_ids: Collection[str] = ()
    ) -> QueueRanks:
        wanted = sorted(set(job_ids))

        def rank(conn: sqlite3.Connection) -> QueueRanks:
            marks = ", ".join("?" * len(wanted))
            found = conn.execute(
                "WITH q AS (SELECT id, lease_holder,"
                " row_number() OVER (ORDER BY created_us, id) AS pos"
                " FROM jobs WHERE state = 'QUEUED')"
                f" SELECT id, pos FROM q WHERE lease_holder = ? OR id IN ({marks})"
                " UNION ALL SELECT NULL, count(*) FROM q",
                (holder, *wanted),
            ).fetchall()
            positions = {r[0]: int(r[1]) for r in found if r[0] is not None}
            queued = next(int(r[1]) for r in found if r[0] is None)
            return QueueRanks(positions, queued)

        return await self._read(rank)

    async def stealable(
        self, holder: str, *, waited_s: float, tasks: Collection[TaskKind], limit: int
    ) -> list[tuple[JobRecord, str]]:
        kinds = sorted(t.value for t in tasks)

        def select(conn: sqlite3.Connection) -> list[tuple[JobRecord, str]]:
            now = _now_us()
            found = conn.execute(
                f"SELECT {rows.SELECT_COLUMNS}, lease_holder FROM jobs WHERE state = 'QUEUED'"
                " AND lease_holder <> ? AND lease_expires_us >= ? AND updated_us < ?"
                " AND cancel_requested_us IS NULL"
                f" AND task IN ({', '.join('?' * len(kinds))})"
                " ORDER BY created_us, id LIMIT ?",
                (holder, now, now - _us(waited_s), *kinds, limit),
            ).fetchall()
            return [(rows.record_of(r), r["lease_holder"]) for r in found]

        return await self._read(select)

    async def steal(
        self, job_id: str, holder: str, lease_s: float, *, from_holder: str
    ) -> Lease | None:
        def take() -> Lease | None:
            expires = _now_us() + _us(lease_s)
            cur = self._conn.execute(
                "UPDATE jobs SET lease_holder = ?, lease_expires_us = ? WHERE id = ?"
                " AND state = 'QUEUED' AND lease_holder = ? AND cancel_requested_us IS NULL",
                (holder, expires, job_id, from_holder),
            )
            if cur.rowcount != 1:
                return None
            return Lease(job_id, holder, codec.from_micros(expires), False)

        return await self._call(take, inline=True)

    async def records(self, job_ids: Collection[str]) -> list[JobRecord]:
        wanted = sorted(set(job_ids))

        def select(conn: sqlite3.Connection) -> list[JobRecord]:
            marks = ", ".join("?" * len(wanted))
            found = conn.execute(
                f"SELECT {rows.SELECT_COLUMNS} FROM jobs WHERE id IN ({marks})", wanted
            ).fetchall()
            return [rows.record_of(r) for r in found]

        return await self._read(select) if wanted else []

    async def events_after(self, after: Mapping[str, int]) -> list[StoredEvent]:
        def select(conn: sqlite3.Connection) -> list[StoredEvent]:
            found: list[StoredEvent] = []
            for job_id in sorted(after):  # one thread hop for them all
                stored = conn.execute(
                    "SELECT sequence, kind, payload, created_us FROM job_events"
                    " WHERE job_id = ? AND sequence > ? ORDER BY sequence",
                    (job_id, after[job_id]),
                ).fetchall()
                found.extend(
                    StoredEvent(job_id, r[0], r[1], json.loads(r[2]), codec.from_micros(r[3]))
                    for r in stored
                )
            return found

        return await self._read(select)

    # --- leases -----------------------------------------------------------------------------

    async def claim(
        self,
        holder: str,
        lease_s: float,
        *,
        tasks: Collection[TaskKind] = (),
        job_id: str | None = None,
    ) -> Lease | None:
        kinds = sorted(t.value for t in tasks)

        def take() -> Lease | None:
            now = _now_us()
            conn = self._conn
            with _transaction(conn):
                sql = (
                    f"SELECT id, lease_holder FROM jobs WHERE state IN {rows.UNFINISHED_SQL}"
                    " AND (lease_holder IS NULL OR lease_expires_us < ?)"
                )
                args: list[Any] = [now]
                if kinds:
                    sql += f" AND task IN ({', '.join('?' * len(kinds))})"
                    args.extend(kinds)
                if job_id is not None:
                    sql += " AND id = ?"
                    args.append(job_id)
                row = conn.execute(sql + " ORDER BY created_us, id LIMIT 1", args).fetchone()
                if row is None:
                    return None
                expires = now + _us(lease_s)
                conn.execute(
                    "UPDATE jobs SET lease_holder = ?, lease_expires_us = ? WHERE id = ?",
                    (holder, expires, row[0]),
                )
            return Lease(row[0], holder, codec.from_micros(expires), row[1] is not None)

        return await self._call(take, inline=True)

    async def renew(self, job_id: str, holder: str, lease_s: float) -> Lease | None:
        def extend() -> Lease | None:
            now = _now_us()
            expires = now + _us(lease_s)
            cur = self._conn.execute(
                "UPDATE jobs SET lease_expires_us = ? WHERE id = ? AND lease_holder = ?"
                " AND lease_expires_us >= ?",
                (expires, job_id, holder, now),
            )
            if cur.rowcount != 1:
                return None
            return Lease(job_id, holder, codec.from_micros(expires), False)

        return await self._call(extend, inline=True)

    async def renew_all(self, job_ids: Collection[str], holder: str, lease_s: float) -> set[str]:
        wanted = sorted(set(job_ids))
        if not wanted:
            return set()

        def extend() -> set[str]:
            now = _now_us()
            marks = ", ".join("?" * len(wanted))
            found = self._conn.execute(
                f"UPDATE jobs SET lease_expires_us = ? WHERE id IN ({marks})"
                " AND lease_holder = ? AND lease_expires_us >= ? RETURNING id",
                (now + _us(lease_s), *wanted, holder, now),
            ).fetchall()
            return {r[0] for r in found}

        return await self._call(extend, inline=True)

    async def release(self, job_id: str, holder: str) -> bool:
        def drop() -> bool:
            cur = self._conn.execute(
                "UPDATE jobs SET lease_holder = NULL, lease_expires_us = NULL"
                " WHERE id = ? AND lease_holder = ?",
                (job_id, holder),
            )
            return cur.rowcount == 1

        return await self._call(drop, inline=True)

    # --- cancel -----------------------------------------------------------------------------

    async def request_cancel(self, job_id: str) -> bool:
        def mark() -> bool:
            cur = self._conn.execute(
                "UPDATE jobs SET cancel_requested_us = coalesce(cancel_requested_us, ?)"
                f" WHERE id = ? AND state IN {rows.UNFINISHED_SQL}",
                (_now_us(), job_id),
            )
            return cur.rowcount == 1

        marked = await self._call(mark, inline=True)
        if marked:
            self._hub.publish(Announcement("cancel", job_id))
        return marked

    async def cancel_requested(self, job_id: str) -> bool:
        def select() -> bool:
            row = self._conn.execute(
                "SELECT cancel_requested_us FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            return row is not None and row[0] is not None

        return await self._call(select, inline=True)

    # --- events -----------------------------------------------------------------------------

    async def append_event(
        self, job_id: str, sequence: int, kind: str, payload: Mapping[str, Any]
    ) -> None:
        body = rows.dumps(payload)

        def insert() -> None:
            self._conn.execute(
                "INSERT INTO job_events (job_id, sequence, kind, payload, created_us)"
                " VALUES (?, ?, ?, ?, ?)",
                (job_id, sequence, kind, body, _now_us()),
            )

        await self._call(insert, inline=True)
        self._hub.publish(Announcement("event", job_id, sequence))

    async def append_events(
        self,
        job_id: str,
        events: Sequence[NewEvent],
        *,
        announce: bool = True,
        holder: str | None = None,
    ) -> None:
        if not events:
            return
        stored = _event_rows(job_id, events)

        def insert() -> bool:
            with _transaction(self._conn):
                if (
                    holder is not None
                    and not self._conn.execute(
                        "SELECT 1 FROM jobs WHERE id = ? AND lease_holder = ?", (job_id, holder)
                    ).fetchone()
                ):
                    return False  # no longer that process's job (the protocol's fence)
                self._conn.executemany(_INSERT_EVENT_SQL, stored)
                return True

        if await self._call(insert, inline=True) and announce:
            self._announce(job_id, events)

    async def events(self, job_id: str, after: int = 0) -> list[StoredEvent]:
        def select(conn: sqlite3.Connection) -> list[StoredEvent]:
            found = conn.execute(
                "SELECT sequence, kind, payload, created_us FROM job_events"
                " WHERE job_id = ? AND sequence > ? ORDER BY sequence",
                (job_id, after),
            ).fetchall()
            return [
                StoredEvent(job_id, r[0], r[1], json.loads(r[2]), codec.from_micros(r[3]))
                for r in found
            ]

        return await self._read(select)

    async def prune_events(self, job_id: str, kind: str) -> int:
        return await self._call(lambda: _prune(self._conn, job_id, kind), inline=True)

    async def ping(self) -> None:
        return None  # a file of this process: there while the process is

    async def announcements(self, *, watch: str | None = None, every_job: bool = False) -> Listener:
        return self._hub.listen()  # in process: every announcement is heard

    # --- agent slots and leadership ---------------------------------------------------------

    async def claim_slot(
        self, agent: str, capacity: int, holder: str, lease_s: float
    ) -> SlotClaim | None:
        def take() -> SlotClaim | None:
            now = _now_us()
            conn = self._conn
            with _transaction(conn):
                row = conn.execute(
                    "SELECT slot FROM agent_slots WHERE agent = ? AND slot < ?"
                    " AND (holder IS NULL OR expires_us < ?) ORDER BY slot LIMIT 1",
                    (agent, capacity, now),
                ).fetchone()
                if row is None:
                    used = conn.execute(
                        "SELECT slot FROM agent_slots WHERE agent = ? AND slot < ?",
                        (agent, capacity),
                    ).fetchall()
                    free = sorted(set(range(capacity)) - {r[0] for r in used})
                    if not free:
                        return None
                    slot = free[0]
                else:
                    slot = row[0]
                expires = now + _us(lease_s)
                conn.execute(
                    "INSERT INTO agent_slots (agent, slot, holder, expires_us) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (agent, slot) DO UPDATE SET holder = excluded.holder,"
                    " expires_us = excluded.expires_us",
                    (agent, slot, holder, expires),
                )
            return SlotClaim(agent, slot, holder, codec.from_micros(expires))

        return await self._call(take, inline=True)

    async def renew_slots(
        self, claims: Sequence[SlotClaim], lease_s: float
    ) -> list[SlotClaim | None]:
        def extend() -> list[SlotClaim | None]:
            now = _now_us()
            expires = now + _us(lease_s)
            at = codec.from_micros(expires)
            renewed: list[SlotClaim | None] = []
            with _transaction(self._conn):
                for claim in claims:
                    cur = self._conn.execute(
                        "UPDATE agent_slots SET expires_us = ? WHERE agent = ? AND slot = ?"
                        " AND holder = ? AND expires_us >= ?",
                        (expires, claim.agent, claim.slot, claim.holder, now),
                    )
                    ok = cur.rowcount == 1
                    renewed.append(
                        SlotClaim(claim.agent, claim.slot, claim.holder, at) if ok else None
                    )
            return renewed

        if not claims:
            if self._closed:  # as every call on a closed store (and as on PostgreSQL)
                raise ServiceError(ErrorKind.UNAVAILABLE, "STORE_CLOSED", "the job store is closed")
            return []
        return await self._call(extend, inline=True)

    async def release_slot(self, claim: SlotClaim) -> None:
        def drop() -> None:
            self._conn.execute(
                "UPDATE agent_slots SET holder = NULL WHERE agent = ? AND slot = ? AND holder = ?",
                (claim.agent, claim.slot, claim.holder),
            )

        await self._call(drop, inline=True)

    async def lead(self, role: str, holder: str, lease_s: float) -> bool:
        def take() -> bool:
            now = _now_us()
            cur = self._conn.execute(
                "INSERT INTO leaders (role, holder, expires_us) VALUES (?, ?, ?)"
                " ON CONFLICT (role) DO UPDATE SET holder = excluded.holder,"
                " expires_us = excluded.expires_us"
                " WHERE leaders.holder = excluded.holder OR leaders.expires_us < ?",
                (role, holder, now + _us(lease_s), now),
            )
            return cur.rowcount == 1

        return await self._call(take, inline=True)

    async def resign(self, role: str, holder: str) -> None:
        def drop() -> None:
            self._conn.execute(
                "UPDATE leaders SET expires_us = 0 WHERE role = ? AND holder = ?", (role, holder)
            )

        await self._call(drop, inline=True)

    # --- webhook outbox ---------------------------------------------------------------------

    async def outbox_put(self, job_id: str, url: str, body: bytes) -> int:
        def insert() -> int:
            now = _now_us()
            cur = self._conn.execute(
                "INSERT INTO webhook_outbox (job_id, url, body, due_us, created_us)"
                " VALUES (?, ?, ?, ?, ?)",
                (job_id, url, body, now, now),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

        return await self._call(insert, inline=True)

    async def outbox_claim(self, holder: str, lease_s: float, limit: int) -> list[OutboxItem]:
        def take() -> list[OutboxItem]:
            now = _now_us()
            conn = self._conn
            with _transaction(conn):
                found = conn.execute(
                    "SELECT id, job_id, url, body, attempts FROM webhook_outbox"
                    " WHERE due_us IS NOT NULL AND due_us <= ?"
                    " AND (lease_holder IS NULL OR lease_expires_us < ?)"
                    " ORDER BY due_us, id LIMIT ?",
                    (now, now, limit),
                ).fetchall()
                conn.executemany(
                    "UPDATE webhook_outbox SET lease_holder = ?, lease_expires_us = ? WHERE id = ?",
                    [(holder, now + _us(lease_s), r[0]) for r in found],
                )
            return [OutboxItem(r[0], r[1], r[2], bytes(r[3]), r[4]) for r in found]

        return await self._call(take, inline=True)

    async def outbox_done(self, item_id: int) -> None:
        def drop() -> None:
            self._conn.execute("DELETE FROM webhook_outbox WHERE id = ?", (item_id,))

        await self._call(drop, inline=True)

    async def outbox_failed(self, item_id: int, error: str, retry_in_s: float | None) -> None:
        due = None if retry_in_s is None else _now_us() + _us(retry_in_s)

        def count() -> None:
            self._conn.execute(
                "UPDATE webhook_outbox SET attempts = attempts + 1, last_error = ?, due_us = ?,"
                " lease_holder = NULL, lease_expires_us = NULL WHERE id = ?",
                (error, due, item_id),
            )

        await self._call(count, inline=True)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # calls from now on are refused; those queued run first

        def close_both() -> None:
            self._reader.close()
            self._conn.close()

        await self._turn.in_thread(close_both)
        self._hub.close()
        self._executor.shutdown(wait=False)


_EXISTING_SQL = f"SELECT {rows.SELECT_COLUMNS} FROM jobs WHERE owner = ? AND ref_id = ?"
_ACTIVE_SQL = f"SELECT count(*) FROM jobs WHERE owner = ? AND state IN {rows.UNFINISHED_SQL}"
_CREATE_SQL = (
    f"INSERT INTO jobs ({rows.SELECT_COLUMNS}, lease_holder, lease_expires_us)"
    f" VALUES ({', '.join(f':{c}' for c in rows.COLUMNS)}, :lease_holder, :lease_expires_us)"
    " ON CONFLICT (owner, ref_id) DO NOTHING"
)
_SAVE_SQL = {
    (release, fenced): "UPDATE jobs SET "
    + ", ".join(f"{c} = :{c}" for c in rows.MUTABLE)
    + (", lease_holder = NULL, lease_expires_us = NULL" if release else "")
    + " WHERE id = :id"
    + (" AND lease_holder = :holder" if fenced else "")
    for release in (False, True)
    for fenced in (False, True)
}
"""A save's statement: with the lease's release or not, fenced by the holder or not."""
_INSERT_EVENT_SQL = (
    "INSERT OR IGNORE INTO job_events (job_id, sequence, kind, payload, created_us)"
    " VALUES (?, ?, ?, ?, ?)"
)
"""Idempotent: a write that failed after storing its events may send them again."""


def _checkpoint(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _event_rows(job_id: str, events: Sequence[NewEvent]) -> list[tuple[Any, ...]]:
    now = _now_us()
    return [(job_id, e.sequence, e.kind, rows.dumps(e.payload), now) for e in events]


def _prune(conn: sqlite3.Connection, job_id: str, kind: str) -> int:
    cur = conn.execute(
        "DELETE FROM job_events WHERE job_id = ? AND kind = ? AND sequence <"
        " (SELECT max(sequence) FROM job_events WHERE job_id = ? AND kind = ?)",
        (job_id, kind, job_id, kind),
    )
    return cur.rowcount


class _transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rollback on error) on an autocommit connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        # IMMEDIATE takes the write lock up front: no upgrade deadlock with another writer.
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")


def _input_bytes(given: Mapping[str, bytes] | None, sha256: str) -> bytes:
    data = None if given is None else given.get(sha256)
    if data is None:  # a stored input must be durable with its job, or the job is not made
        raise ValueError(f"the bytes of stored input {sha256} are missing")
    return data


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to the newest version recorded in ``schema_migrations``.

    Each step reads the version and applies the next step inside one ``BEGIN IMMEDIATE``
    transaction (the write lock), so processes opening the file at once apply it once."""
    with _transaction(conn):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (version INTEGER PRIMARY KEY, applied_us INTEGER NOT NULL) STRICT"
        )
        # Databases from before the version table counted their steps in user_version.
        legacy = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.executemany(
            "INSERT OR IGNORE INTO schema_migrations (version, applied_us) VALUES (?, ?)",
            [(v, _now_us()) for v in range(1, legacy + 1)],
        )
    while True:
        with _transaction(conn):
            version = conn.execute(
                "SELECT coalesce(max(version), 0) FROM schema_migrations"
            ).fetchone()[0]
            if version > len(migrations.SQLITE):
                raise migrations.SchemaTooNew(version, len(migrations.SQLITE))
            if version == len(migrations.SQLITE):
                return
            for statement in migrations.statements(migrations.SQLITE[version]):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_us) VALUES (?, ?)",
                (version + 1, _now_us()),
            )
