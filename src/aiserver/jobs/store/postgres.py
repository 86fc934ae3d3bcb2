""":class:`JobStore` on PostgreSQL (asyncpg): several processes share one database.

asyncpg was chosen by measurement (``bench/store_driver.py``, docs/scale-out.md): about 30%
less client CPU per create+event+get cycle than psycopg 3 on this machine. Claims use
``FOR UPDATE SKIP LOCKED``, so concurrent claimers never wait on each other nor take the same
row. Announcements are ``pg_notify`` on one channel per schema, sent in the same statement as
the write they announce (delivered at commit, to every listening process, this one included),
and received on one dedicated ``LISTEN`` connection per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import re
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Self

import asyncpg

from aiserver.errors import ErrorKind, ServiceError
from aiserver.jobs import codec
from aiserver.jobs.model import Job, WebhookDelivery
from aiserver.jobs.paging import page_size as _page_size
from aiserver.jobs.store import migrations, rows
from aiserver.jobs.store.announce import AnnouncementHub, Listener
from aiserver.jobs.store.group_commit import GroupCommit
from aiserver.jobs.store.group_sql import (
    DB_NOW_US,
    GROUP_SLOT_CLAIM_SQL,
    GROUP_SLOT_RELEASE_SQL,
    GROUP_SLOT_RENEW_SQL,
    PendingCreate,
    PendingSave,
    PendingSlotClaim,
    group_create_args,
    group_create_sql,
    group_save_args,
    group_save_parts,
    group_save_sql,
)
from aiserver.jobs.store.pg_shelf import ConnectionShelf
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
from aiserver.outage import BackendBusy
from aiserver.tasks import TaskKind

__all__ = [
    "PLANNER_SETTINGS",
    "MigrationLockTimeout",
    "PostgresJobStore",
    "keep_session",
    "migrate",
]

logger = logging.getLogger(__name__)

GENERIC_PLANS = {"plan_cache_mode": "force_generic_plan"}
"""Each prepared statement is planned once per connection, not at each run: by default
PostgreSQL plans a statement's first 5 runs with their values and then keeps planning it per
run whenever that plan looks cheaper than the generic one, which the group statements' CTEs
(counts per owner, ``unnest`` of arrays) nearly always do. That planning was a fifth of the
backends' CPU per job, steady state included (bench/README.md, "pgcost2"). The store's
statements find rows by key or by the index their filter names, so the value-blind plan is
the plan they want."""

PLANNER_SETTINGS = {"enable_seqscan": "off", **GENERIC_PLANS}
"""Every statement of the job store finds its rows by an index, but PostgreSQL plans on
estimates: a prepared statement's generic plan, cached while a table was small (new, or
never analyzed: autovacuum off), kept scanning the whole table as it grew (a group save read
every job row; bench/README.md, "PostgreSQL's CPU per job"). Off, a sequential scan is only
the last resort (a statement no index serves still runs). The artifact index's pool plans
the same way (its tables grow under cached plans too)."""
_OWNER_LOCK = 0x6169  # first key of per-owner create locks (pg_advisory_xact_lock(int, int))
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


DEFAULT_TIMEOUT_S = 5.0
SWEEP_STATEMENT_S = 600.0
"""The bound of retention's statements, which scan whole tables: not a statement's
``timeout_s`` (a sweep over a large table is slow, not a sign of an outage)."""
_FORGET_BATCH = 8
"""Hashes per ``forget_outputs`` statement (each one a scan of ``jobs``)."""


def bounded_pool_options(
    timeout_s: float, server_settings: Mapping[str, str], *, idle_in_transaction_s: float = 0.0
) -> dict[str, Any]:
    """``asyncpg.create_pool`` options that bound every wait on the server: a database that
    drops packets (a partition, a host gone without a reset) never answers, and without a
    bound a statement or a connect would wait for the kernel's TCP timeouts (minutes to
    hours). A statement past ``timeout_s`` raises ``TimeoutError`` (an outage for
    :mod:`aiserver.outage`); asyncpg then cancels it within ``timeout_s`` more, or closes
    the connection. The server gets a bound too: a session left idle inside a transaction
    (its client cut off mid-transaction, its locks held) is ended after
    ``idle_in_transaction_s`` (at least ``2 * timeout_s`` and 10 s)."""
    idle_s = max(idle_in_transaction_s, 2 * timeout_s, 10.0)
    return {
        "timeout": timeout_s,  # each new connection
        "command_timeout": timeout_s,
        "server_settings": {
            **server_settings,
            "idle_in_transaction_session_timeout": str(int(idle_s * 1000)),
        },
    }


def _now_us() -> int:
    return time.time_ns() // 1000


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)


async def keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release, minus asyncpg's default reset query (``RESET ALL``,
    ``UNLISTEN *``, ``pg_advisory_unlock_all()``...): a round trip and a transaction for every
    statement, and the store leaves no session state behind (its locks are transaction
    locks, it listens on a connection of its own). Open transactions are still rolled back.
    Measured: 42 transactions per job before, see docs/scale-out.md."""
    return None


class PostgresJobStore:
    """:class:`JobStore` on a PostgreSQL database. Create with :meth:`open`."""

    def __init__(
        self, pool: asyncpg.Pool, url: str, schema: str, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        # Statements borrow connections from the shelf, not the pool (pg_shelf.py).
        self._pool = ConnectionShelf(pool)
        self._url = url
        self._schema = schema
        self._timeout_s = timeout_s
        self._channel = f"aiserver_{schema}"[:63]
        # The LISTEN connections of this schema's coordinators carry one of these names: the
        # second while the coordinator follows every job's events (``every_job``), so each
        # can see whether another does (pg_stat_activity) before announcing events.
        self._listen_name = f"aiserver-listen:{schema}"[:63]
        self._feed_name = f"aiserver-feed:{schema}"[:63]
        self._feeds = 0  # this process's open every_job streams
        self._named_feed = False  # the LISTEN connection's name is the feed one
        self._renaming: asyncio.Task[None] | None = None
        self._others_follow = True  # until counted: announce
        self._others_counted = -1e9  # when the last count came back
        self._others_count: asyncio.Task[None] | None = None
        self._hub = AnnouncementHub()
        self._listener: asyncpg.Connection | None = None
        self._listener_lock = asyncio.Lock()
        self._listener_check: asyncio.Task[None] | None = None
        self._reconnect: asyncio.Future[None] | None = None
        self._closed = False
        self._slot_rows: set[tuple[str, int]] = set()  # (agent, capacity) known to have rows
        # Writes of several jobs that meet go in one statement (group_commit.py).
        self._saves = GroupCommit(self._save_one, self._save_group, lambda s: s.job_id)
        self._creates = GroupCommit(self._create_one, self._create_group, lambda c: c.key)
        self._slot_claims = GroupCommit(self._claim_slot_one, self._claim_slot_group, id)
        self._slot_releases = GroupCommit(
            self._release_slot_one, self._release_slot_group, lambda c: (c.agent, c.slot)
        )

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        schema: str = "public",
        pool_size: int = 8,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> Self:
        """Connect to ``url``, create ``schema`` if missing, and migrate it. ``timeout_s``
        bounds each statement and each new connection (:func:`bounded_pool_options`), and sets
        the migration's lock waits (:func:`migrate`)."""
        if _SCHEMA_NAME.fullmatch(schema) is None:
            raise ValueError(f"schema {schema!r}: lower-case letters, digits and _ only")
        await migrate(url, schema, connect_timeout_s=timeout_s, lock_timeout_s=timeout_s)
        pool = await asyncpg.create_pool(
            url,
            min_size=1,
            max_size=pool_size,
            reset=keep_session,
            **bounded_pool_options(timeout_s, {"search_path": schema, **PLANNER_SETTINGS}),
        )
        return cls(pool, url, schema, timeout_s)

    def _check(self) -> None:
        if self._closed:
            raise ServiceError(ErrorKind.UNAVAILABLE, "STORE_CLOSED", "the job store is closed")

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        self._check()
        return await self._pool.fetch(sql, *args)

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        self._check()
        return await self._pool.fetchrow(sql, *args)

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        self._check()
        return await self._pool.fetchval(sql, *args)

    def _others_follow_all(self) -> bool:
        """Whether another coordinator follows every job's events (a WatchJobs stream:
        counted at most once a second, in the background): every event write is announced
        only then; otherwise only the writes of jobs a watcher elsewhere follows (``watched``
        on the row). Each notification costs every listening backend a transaction (and
        all of them listen: cancels) and its process a wake-up, so announcing every job's
        events made a job's cost grow with the coordinators (bench/README.md). A stream
        that opens is seen within a second (a count older than 2 s is not trusted); an
        announcement missed meanwhile costs its list latency, never an event. Cancels are
        always announced."""
        now = time.monotonic()
        if self._others_count is None and now - self._others_counted >= 1.0:
            self._others_count = asyncio.get_running_loop().create_task(self._count_others())
        # A count older than that (this store was idle) is not trusted: announce.
        return self._others_follow or now - self._others_counted > 2.0

    async def _count_others(self) -> None:
        started = time.monotonic()  # the count is as old as its snapshot, not its answer
        try:
            found = await self._fetchrow(
                "SELECT count(*) FILTER (WHERE application_name = $2), count(*)"
                " FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name IN ($1, $2)",
                self._listen_name,
                self._feed_name,
            )
            assert found is not None
            feeds, named = int(found[0]), int(found[1])
            mine = self._listener is not None and not self._listener.is_closed()
            # Our own LISTEN not seen by name (a proxy that drops application_name): nobody
            # can be counted, so announce.
            self._others_follow = feeds > int(mine and self._named_feed) or (mine and not named)
        except Exception:
            self._others_follow = True
        finally:
            self._others_counted = started
            self._others_count = None

    def _notice(self, announcement: Announcement) -> str:
        return json.dumps([announcement.kind, announcement.job_id, announcement.sequence])

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
        self._check()
        if any(i.stored for i in record.job.inputs):
            raise ValueError("this store keeps no input bytes (holds_inputs is False)")
        row = rows.row_of(record)
        # A new job has no watcher elsewhere yet: only a follower of every job wants it.
        announce = bool(events) and self._others_follow_all()
        events_notice = self._event_notice(row["id"], events) if announce else None
        item = PendingCreate(
            record,
            row,
            sorted({i.sha256 for i in record.job.inputs}),
            holder,
            _us(lease_s) if holder is not None else None,
            max(max_active, 0),
            events,
            events_notice,
        )
        made = await self._creates.write(item)
        return made if made is not None else await self._create_one(item)

    @property
    def holds_inputs(self) -> bool:
        # Inputs stay in the spool and the shared blob store: every coordinator reads them
        # there (bytea rows in the creates' grouped statement are left for later).
        return False

    async def input_bytes(self, job_id: str, sha256: str) -> bytes | None:
        return None

    async def _create_one(self, item: PendingCreate) -> tuple[JobRecord, bool]:
        self._check()
        row = item.row
        args = [*(row[c] for c in rows.COLUMNS), item.holder, item.lease_us, list(item.shas)]
        if item.max_active > 0:
            args.append(item.max_active)
        sql = _create_sql(item.max_active > 0, bool(item.events), item.notice is not None)
        if item.events:
            args += _event_arrays(item.events, _now_us())
        if item.notice is not None:
            args += [self._channel, item.notice]
        if item.max_active <= 0:
            # One statement: the insert, its input references and events (announced), and
            # nothing when (owner, ref_id) exists.
            if await self._fetchval(sql, *args) is not None:
                return item.record, False
        else:
            async with self._pool.acquire() as conn, conn.transaction():
                # Creates of one owner take turns (until commit): the count in the insert,
                # a statement after the lock (its own snapshot), stays true.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock($1, hashtext($2))", _OWNER_LOCK, row["owner"]
                )
                if await conn.fetchval(sql, *args) is not None:
                    return item.record, False
                found = await conn.fetchrow(_EXISTING_SQL, row["owner"], row["ref_id"])
                if found is not None:  # a retry of a job it has is no new work
                    return rows.record_of(found), True
                raise ActiveLimitReached(row["owner"])
        # (owner, ref_id) exists, maybe committed by a racing transaction meanwhile.
        again = await self._fetchrow(_EXISTING_SQL, row["owner"], row["ref_id"])
        assert again is not None
        return rows.record_of(again), True

    async def _create_group(
        self, group: Sequence[PendingCreate]
    ) -> list[tuple[JobRecord, bool] | None]:
        """Several creates in one statement; ``None`` for each that did not go in (a lone
        create answers it: an existing ``ref_id`` or the limit)."""
        self._check()
        args = group_create_args(group, _now_us(), self._channel)
        owners = sorted({c.row["owner"] for c in group if c.max_active > 0})
        if not owners:
            found = await self._pool.fetch(group_create_sql(), *args)
        else:
            async with self._pool.acquire() as conn, conn.transaction():
                # Every owner's lock, in one order (by key: a group takes several).
                await conn.execute(
                    "SELECT pg_advisory_xact_lock($1, k) FROM (SELECT DISTINCT hashtext(o) AS k"
                    " FROM unnest($2::text[]) AS o ORDER BY k) AS keys",
                    _OWNER_LOCK,
                    owners,
                )
                found = await conn.fetch(group_create_sql(), *args)
        made = {r[0] for r in found}
        return [(c.record, False) if c.row["id"] in made else None for c in group]

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
        self._check()
        # Sent by the statement if the job is watched elsewhere or every job is followed.
        notice = self._event_notice(record.job.id, events) if announce and events else None
        item = PendingSave(
            rows.mutable_row_of(record),
            holder,
            events,
            release,
            prune,
            outbox,
            notice,
        )
        if not await self._saves.write(item):
            await self._not_saved(item.job_id, holder)

    async def _save_one(self, item: PendingSave) -> bool:
        """One save as one statement (one round trip, one transaction): the update, fenced
        by the lease, and whatever goes with it only when the update found its row."""
        self._check()
        row = item.row
        now = _now_us()
        args: list[Any] = [row["id"], item.holder, *(row[c] for c in rows.MUTABLE)]
        sql = _save_sql(
            bool(item.events), item.release, bool(item.prune), bool(item.outbox), bool(item.notice)
        )
        if item.events:
            args += _event_arrays(item.events, now)
        if item.notice is not None:
            args += [self._channel, item.notice, self._others_follow_all()]
        if item.prune:
            args.append(item.prune)
        if item.outbox:
            args += [[url for url, _ in item.outbox], [body for _, body in item.outbox], now]
        return await self._fetchval(sql, *args) is not None

    async def _save_group(self, group: Sequence[PendingSave]) -> list[bool]:
        """Several saves as one statement (``group_commit.py``): whether each was saved."""
        self._check()
        args = group_save_args(group, _now_us(), self._channel, self._others_follow_all())
        sql = group_save_sql(*group_save_parts(group))
        saved = {r[0] for r in await self._pool.fetch(sql, *args)}
        return [s.job_id in saved for s in group]

    def _event_notice(self, job_id: str, events: Sequence[NewEvent]) -> str:
        # One announcement for the batch: watchers read the table from their own last.
        return self._notice(Announcement("event", job_id, max(e.sequence for e in events)))

    async def _not_saved(self, job_id: str, holder: str | None) -> None:
        if holder is not None and await self._fetchval("SELECT 1 FROM jobs WHERE id = $1", job_id):
            raise LeaseLost(job_id)
        raise ServiceError(ErrorKind.NOT_FOUND, "JOB_NOT_FOUND", f"job {job_id} is not stored")

    async def forget_outputs(self, sha256s: Collection[str]) -> int:
        gone = set(sha256s)
        if not gone:
            return 0
        self._check()
        patterns = [f"%{sha}%" for sha in sorted(gone)]
        changed = 0
        # A scan of the whole table per batch (no index serves LIKE on the outputs): in
        # batches, each its own transaction, under the sweep's bound, not a statement's
        # (measured: 10 hashes 1.5 s, 100 hashes 16 s over 200k jobs).
        for start in range(0, len(patterns), _FORGET_BATCH):
            async with self._pool.acquire() as conn, conn.transaction():
                found = await conn.fetch(
                    # In id order, as group saves and renew_all lock rows: no deadlock.
                    "SELECT id, outputs FROM jobs WHERE outputs LIKE ANY($1::text[])"
                    " ORDER BY id FOR UPDATE",
                    patterns[start : start + _FORGET_BATCH],
                    timeout=SWEEP_STATEMENT_S,
                )
                for row in found:
                    kept = rows.without_outputs(row["outputs"], gone)
                    if kept is not None:
                        await conn.execute(
                            "UPDATE jobs SET outputs = $1 WHERE id = $2", kept, row["id"]
                        )
                        changed += 1
        return changed

    async def record_webhook(self, job_id: str, delivery: WebhookDelivery) -> None:
        self._check()
        text = rows.dumps(codec.encode_webhook(delivery))
        async with self._pool.acquire() as conn:
            await conn.execute("UPDATE jobs SET webhook = $1 WHERE id = $2", text, job_id)

    async def get(self, job_id: str) -> JobRecord | None:
        found = await self._fetchrow(
            f"SELECT {rows.SELECT_COLUMNS} FROM jobs WHERE id = $1", job_id
        )
        return rows.record_of(found) if found is not None else None

    async def query(
        self, query: JobQuery, *, page_size: int, page_token: str
    ) -> tuple[list[Job], str]:
        digest = query.digest()
        after = rows.decode_token(page_token, digest) if page_token else None
        size = _page_size(page_size)
        where: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if query.owner is not None:
            where.append(f"owner = {arg(query.owner)}")
        if query.states:
            where.append(f"state = ANY({arg(sorted(s.value for s in query.states))}::text[])")
        if query.task is not None:
            where.append(f"task = {arg(query.task.value)}")
        if query.tag:
            where.append(f"tag = {arg(query.tag)}")
        if query.ref_id:
            where.append(f"ref_id = {arg(query.ref_id)}")
        if after is not None:
            where.append(f"(created_us, id) < ({arg(after[0])}, {arg(after[1])})")
        sql = (
            f"SELECT {rows.SELECT_COLUMNS} FROM jobs"
            f" {'WHERE ' + ' AND '.join(where) if where else ''}"
            f" ORDER BY created_us DESC, id DESC LIMIT {arg(size + 1)}"
        )
        found = await self._fetch(sql, *args)
        jobs = [rows.record_of(r).job for r in found[:size]]
        if len(found) <= size:
            return jobs, ""
        last = found[size - 1]
        return jobs, rows.encode_token(last["created_us"], last["id"], digest)

    async def unfinished(self) -> list[JobRecord]:
        found = await self._fetch(
            f"SELECT {rows.SELECT_COLUMNS} FROM jobs WHERE unfinished ORDER BY created_us, id"
        )
        return [rows.record_of(r) for r in found]

    # --- queue, quotas, references ----------------------------------------------------------

    async def count_active(self, owner: str | None = None) -> int:
        sql = "SELECT count(*) FROM jobs WHERE unfinished"
        if owner is None:
            return int(await self._fetchval(sql))
        return int(await self._fetchval(sql + " AND owner = $1", owner))

    async def queue_position(self, job_id: str) -> int:
        found = await self._fetchval(
            "SELECT (SELECT count(*) FROM jobs q WHERE q.unfinished AND q.state = 'QUEUED'"
            " AND (q.created_us, q.id) < (j.created_us, j.id)) + 1"
            " FROM jobs j WHERE j.id = $1 AND j.state = 'QUEUED'",
            job_id,
        )
        return 0 if found is None else int(found)

    async def inputs_in_use(self, sha256s: Collection[str]) -> set[str]:
        wanted = sorted(set(sha256s))
        if not wanted:
            return set()
        found = await self._fetch(
            "SELECT DISTINCT i.sha256 FROM job_inputs i JOIN jobs j ON j.id = i.job_id"
            " WHERE i.sha256 = ANY($1::text[]) AND j.unfinished",
            wanted,
        )
        return {r[0] for r in found}

    async def artifacts_in_use(self) -> set[str]:
        found = await self._fetch("SELECT outputs FROM jobs WHERE unfinished AND outputs != '[]'")
        return {name for r in found for name in rows.output_names(r[0])}

    # --- one queue across processes: positions, work stealing -------------------------------

    async def queue_ranks(
        self, *, holder: str | None = None, job_ids: Collection[str] = ()
    ) -> QueueRanks:
        # One pass over the queued rows (the partial index): the ranks asked for, then the
        # total in a row of its own (id NULL).
        found = await self._fetch(
            "WITH q AS (SELECT id, lease_holder,"
            " row_number() OVER (ORDER BY created_us, id) AS pos"
            " FROM jobs WHERE unfinished AND state = 'QUEUED')"
            " SELECT id, pos FROM q WHERE lease_holder = $1 OR id = ANY($2::text[])"
            " UNION ALL SELECT NULL, count(*) FROM q",
            holder,
            sorted(set(job_ids)),
        )
        positions = {r[0]: int(r[1]) for r in found if r[0] is not None}
        queued = next(int(r[1]) for r in found if r[0] is None)
        return QueueRanks(positions, queued)

    async def stealable(
        self, holder: str, *, waited_s: float, tasks: Collection[TaskKind], limit: int
    ) -> list[tuple[JobRecord, str]]:
        # How long a job waited is judged by the writers' clocks (a skew shifts when a
        # job is stolen); whether its holder lives, by the database's (the lease).
        found = await self._fetch(
            f"SELECT {rows.SELECT_COLUMNS}, lease_holder FROM jobs WHERE unfinished"
            " AND state = 'QUEUED'"
            f" AND lease_holder <> $1 AND lease_expires_us >= {DB_NOW_US} AND updated_us < $2"
            " AND cancel_requested_us IS NULL AND task = ANY($3::text[])"
            " ORDER BY created_us, id LIMIT $4",
            holder,
            _now_us() - _us(waited_s),
            sorted(t.value for t in tasks),
            limit,
        )
        return [(rows.record_of(r), r["lease_holder"]) for r in found]

    async def steal(
        self, job_id: str, holder: str, lease_s: float, *, from_holder: str
    ) -> Lease | None:
        found = await self._fetchval(
            f"UPDATE jobs SET lease_holder = $1, lease_expires_us = {DB_NOW_US} + $2 WHERE id = $3"
            " AND state = 'QUEUED' AND lease_holder = $4 AND cancel_requested_us IS NULL"
            " RETURNING lease_expires_us",
            holder,
            _us(lease_s),
            job_id,
            from_holder,
        )
        return None if found is None else Lease(job_id, holder, codec.from_micros(found), False)

    async def records(self, job_ids: Collection[str]) -> list[JobRecord]:
        found = await self._fetch(
            f"SELECT {rows.SELECT_COLUMNS} FROM jobs WHERE id = ANY($1::text[])",
            sorted(set(job_ids)),
        )
        return [rows.record_of(r) for r in found]

    async def events_after(self, after: Mapping[str, int]) -> list[StoredEvent]:
        ids = sorted(after)
        found = await self._fetch(
            "SELECT e.job_id, e.sequence, e.kind, e.payload, e.created_us FROM job_events e"
            " JOIN unnest($1::text[], $2::bigint[]) AS a (job_id, after)"
            " ON e.job_id = a.job_id AND e.sequence > a.after ORDER BY e.job_id, e.sequence",
            ids,
            [after[i] for i in ids],
        )
        return [
            StoredEvent(r[0], r[1], r[2], json.loads(r[3]), codec.from_micros(r[4])) for r in found
        ]

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
        # The inner SELECT locks one claimable row, skipping rows other claimers hold; the
        # outer UPDATE returns the previous holder (a takeover when there was one). A named
        # job is its own statement: a generic plan (GENERIC_PLANS) of "$4 IS NULL OR id = $4"
        # could not use the key and would walk the whole queue in created order.
        named = job_id is not None
        found = await self._fetchrow(
            "WITH next AS ("
            " SELECT id, lease_holder FROM jobs WHERE "
            + ("id = $4 AND unfinished" if named else "unfinished")
            + f" AND (lease_holder IS NULL OR lease_expires_us < {DB_NOW_US})"
            " AND (cardinality($3::text[]) = 0 OR task = ANY($3::text[]))"
            " ORDER BY created_us, id LIMIT 1 FOR UPDATE SKIP LOCKED)"
            f" UPDATE jobs SET lease_holder = $1, lease_expires_us = {DB_NOW_US} + $2 FROM next"
            " WHERE jobs.id = next.id"
            " RETURNING jobs.id, next.lease_holder AS previous, jobs.lease_expires_us",
            holder,
            _us(lease_s),
            kinds,
            *((job_id,) if named else ()),
        )
        if found is None:
            return None
        expires = codec.from_micros(found["lease_expires_us"])
        return Lease(found["id"], holder, expires, found["previous"] is not None)

    async def renew(self, job_id: str, holder: str, lease_s: float) -> Lease | None:
        found = await self._fetchval(
            f"UPDATE jobs SET lease_expires_us = {DB_NOW_US} + $1 WHERE id = $2"
            f" AND lease_holder = $3 AND lease_expires_us >= {DB_NOW_US}"
            " RETURNING lease_expires_us",
            _us(lease_s),
            job_id,
            holder,
        )
        return None if found is None else Lease(job_id, holder, codec.from_micros(found), False)

    async def renew_all(self, job_ids: Collection[str], holder: str, lease_s: float) -> set[str]:
        if not job_ids:
            return set()
        # Rows locked in id order, as a group save locks them: no deadlock between the two.
        found = await self._fetch(
            "WITH locked AS MATERIALIZED (SELECT id FROM jobs WHERE id = ANY($2::text[])"
            " ORDER BY id FOR UPDATE)"
            f" UPDATE jobs SET lease_expires_us = {DB_NOW_US} + $1"
            " WHERE id IN (SELECT id FROM locked)"
            f" AND lease_holder = $3 AND lease_expires_us >= {DB_NOW_US} RETURNING id",
            _us(lease_s),
            list(job_ids),
            holder,
        )
        return {r[0] for r in found}

    async def release(self, job_id: str, holder: str) -> bool:
        found = await self._fetchval(
            "UPDATE jobs SET lease_holder = NULL, lease_expires_us = NULL"
            " WHERE id = $1 AND lease_holder = $2 RETURNING id",
            job_id,
            holder,
        )
        return found is not None

    # --- cancel -----------------------------------------------------------------------------

    async def request_cancel(self, job_id: str) -> bool:
        marked = await self._fetchval(
            "WITH marked AS (UPDATE jobs SET cancel_requested_us = coalesce(cancel_requested_us,"
            f" $1) WHERE id = $2 AND state IN {rows.UNFINISHED_SQL} RETURNING id)"
            " SELECT count(*) FROM (SELECT pg_notify($3, $4) FROM marked) sent",
            _now_us(),
            job_id,
            self._channel,
            self._notice(Announcement("cancel", job_id)),
        )
        return bool(marked)

    async def cancel_requested(self, job_id: str) -> bool:
        found = await self._fetchval(
            "SELECT cancel_requested_us IS NOT NULL FROM jobs WHERE id = $1", job_id
        )
        return bool(found)

    # --- events -----------------------------------------------------------------------------

    async def append_event(
        self, job_id: str, sequence: int, kind: str, payload: Mapping[str, Any]
    ) -> None:
        self._check()
        await self._pool.execute(
            "WITH stored AS (INSERT INTO job_events (job_id, sequence, kind, payload,"
            " created_us) VALUES ($1, $2, $3, $4, $5) RETURNING 1)"
            " SELECT pg_notify($6, $7) FROM stored",
            job_id,
            sequence,
            kind,
            rows.dumps(payload),
            _now_us(),
            self._channel,
            self._notice(Announcement("event", job_id, sequence)),
        )

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
        self._check()
        # The row's share lock orders this write with a watcher's marking (an update): this
        # commits first, so the watcher reads the rows, or it sees ``watched``. The holder
        # fence reads the row without locking it (a row lock writes the row, per event): a
        # steal committing during this very statement is not seen, as with any snapshot.
        sql = (
            "WITH stored AS (INSERT INTO job_events (job_id, sequence, kind, payload, created_us)"
            " SELECT $1, e.sequence, e.kind, e.payload, $5"
            " FROM unnest($2::bigint[], $3::text[], $4::text[]) AS e(sequence, kind, payload)"
            " WHERE $10::text IS NULL"
            " OR EXISTS (SELECT 1 FROM jobs WHERE id = $1 AND lease_holder = $10)"
            " ON CONFLICT DO NOTHING RETURNING 1)"
            " SELECT pg_notify($6, $7) WHERE EXISTS (SELECT 1 FROM stored) AND $8"
            " AND ($9 OR (SELECT watched FROM jobs WHERE id = $1 FOR SHARE))"
        )
        await self._pool.execute(
            sql,
            job_id,
            *_event_arrays(events, _now_us()),
            self._channel,
            self._event_notice(job_id, events),
            announce,
            self._others_follow_all(),
            holder,
        )

    async def events(self, job_id: str, after: int = 0) -> list[StoredEvent]:
        found = await self._fetch(
            "SELECT sequence, kind, payload, created_us FROM job_events"
            " WHERE job_id = $1 AND sequence > $2 ORDER BY sequence",
            job_id,
            after,
        )
        return [
            StoredEvent(job_id, r[0], r[1], json.loads(r[2]), codec.from_micros(r[3]))
            for r in found
        ]

    async def prune_events(self, job_id: str, kind: str) -> int:
        found = await self._fetchval(
            "WITH gone AS (DELETE FROM job_events WHERE job_id = $1 AND kind = $2 AND sequence <"
            " (SELECT max(sequence) FROM job_events WHERE job_id = $1 AND kind = $2)"
            " RETURNING 1) SELECT count(*) FROM gone",
            job_id,
            kind,
        )
        return int(found)

    async def _ensure_listener(self) -> None:
        async with self._listener_lock:
            if self._listener is not None and not self._listener.is_closed():
                return
            feed = self._feeds > 0
            conn = await asyncpg.connect(
                self._url,
                server_settings={
                    "application_name": self._feed_name if feed else self._listen_name
                },
                timeout=self._timeout_s,
                command_timeout=self._timeout_s,
            )
            try:
                await conn.add_listener(self._channel, self._on_notify)
            except BaseException:
                conn.terminate()
                raise
            conn.add_termination_listener(self._on_listener_lost)
            self._listener = conn
            self._named_feed = feed
            if self._listener_check is not None:
                self._listener_check.cancel()
            self._listener_check = asyncio.get_running_loop().create_task(
                self._check_listener(conn), name="listen-check"
            )

    async def _check_listener(self, conn: asyncpg.Connection) -> None:
        """A LISTEN connection only reads: if the database stops answering (packets dropped,
        no reset), nothing tells it, and announcements stop for good (cancels from other
        coordinators never reach the jobs here). So it is asked something every
        ``2 * timeout_s``; no answer within ``timeout_s`` closes it, and it is opened again
        (then ``resync``: every watcher re-reads the table)."""
        while not conn.is_closed():
            await asyncio.sleep(2 * self._timeout_s)
            try:
                # Under the lock: the connection runs one operation at a time (a rename
                # for a feed may be under way).
                async with self._listener_lock:
                    if conn.is_closed():
                        return
                    await conn.fetchval("SELECT 1", timeout=self._timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("LISTEN connection not answering (%s); reopening it", exc)
                conn.terminate()  # its termination listener reopens it
                return

    def _on_listener_lost(self, _conn: object) -> None:
        # Notifications sent while no LISTEN runs are gone: reconnect, then tell every
        # listener to re-read what it follows ("resync").
        if not self._closed:
            self._reconnect = asyncio.ensure_future(self._relisten())

    async def _relisten(self) -> None:
        delay = 0.1
        while not self._closed:
            try:
                await self._ensure_listener()
            except Exception as exc:  # whatever it is, giving up would end announcements
                logger.warning("LISTEN connection lost; retrying in %.1f s: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._hub.publish(Announcement("resync", ""))
            return

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            kind, job_id, sequence = json.loads(str(payload))
        except (ValueError, TypeError):
            logger.warning("ignoring a malformed announcement %r", payload)
            return
        self._hub.publish(Announcement(kind, job_id, sequence))

    async def ping(self) -> None:
        """One round trip on the pool, within ``timeout_s`` (a free connection included)."""
        async with asyncio.timeout(self._timeout_s):
            await self._fetchval("SELECT 1")

    async def announcements(self, *, watch: str | None = None, every_job: bool = False) -> Listener:
        self._check()
        # Registered before LISTEN: nothing in between is lost.
        listener = self._hub.listen(self._feed_closed if every_job else None)
        if every_job:
            self._feeds += 1
        try:
            await self._ensure_listener()
            if every_job:
                await self._name_listener()
            if watch is not None:
                # Once committed, every write of the job that commits later sees the mark (a
                # save updates the row, an event append share-locks it: both wait for this
                # update) and announces; the watcher reads the table after this returns.
                await self._fetchval(
                    "UPDATE jobs SET watched = true WHERE id = $1 AND NOT watched", watch
                )
        except BaseException:
            await listener.aclose()
            raise
        return listener

    def _feed_closed(self) -> None:
        self._feeds -= 1
        if self._feeds == 0 and not self._closed and self._renaming is None:
            self._renaming = asyncio.get_running_loop().create_task(self._name_listener())

    async def _name_listener(self) -> None:
        """The LISTEN connection's name says whether this process follows every job."""
        try:
            async with self._listener_lock:
                feed = self._feeds > 0
                conn = self._listener
                if conn is None or conn.is_closed() or feed == self._named_feed:
                    return
                name = self._feed_name if feed else self._listen_name
                await conn.execute(f"SET application_name = '{name}'")
                self._named_feed = feed
        finally:
            if asyncio.current_task() is self._renaming:
                self._renaming = None

    # --- agent slots and leadership ---------------------------------------------------------

    async def claim_slot(
        self, agent: str, capacity: int, holder: str, lease_s: float
    ) -> SlotClaim | None:
        self._check()
        item = PendingSlotClaim(agent, capacity, holder, lease_s)
        found = await self._slot_claims.write(item)
        if found is None and (agent, capacity) not in self._slot_rows:
            found = await self._claim_slot_one(item)  # makes the agent's rows first
        return found

    async def _claim_slot_one(self, item: PendingSlotClaim) -> SlotClaim | None:
        self._check()
        args = (item.agent, item.capacity, item.holder, _us(item.lease_s))
        # Rows for every slot exist once (made by this process's first miss, remembered);
        # then taking one is a single SKIP LOCKED statement.
        found = await self._fetchrow(_CLAIM_SLOT_SQL, *args)
        if found is None and (item.agent, item.capacity) not in self._slot_rows:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO agent_slots (agent, slot, holder, expires_us)"
                    " SELECT $1, s, NULL, 0 FROM generate_series(0, $2 - 1) s"
                    " ON CONFLICT DO NOTHING",
                    item.agent,
                    item.capacity,
                )
                found = await conn.fetchrow(_CLAIM_SLOT_SQL, *args)
            self._slot_rows.add((item.agent, item.capacity))
        if found is None:
            return None
        return SlotClaim(item.agent, int(found[0]), item.holder, codec.from_micros(found[1]))

    async def _claim_slot_group(self, group: Sequence[PendingSlotClaim]) -> list[SlotClaim | None]:
        """Several claims in one statement; a claim the group could not serve gets ``None``
        (the agent is full, or its rows are not made yet: ``claim_slot`` sees to that)."""
        self._check()
        capacities = {c.agent: c.capacity for c in group}
        if len({(c.holder, c.lease_s) for c in group}) > 1 or any(
            capacities[c.agent] != c.capacity for c in group
        ):  # one process has one holder; an agent's capacity changed between two claims
            return [await self._claim_slot_one(c) for c in group]
        found = await self._pool.fetch(
            GROUP_SLOT_CLAIM_SQL,
            [c.agent for c in group],
            [c.capacity for c in group],
            group[0].holder,
            _us(group[0].lease_s),
        )
        taken: dict[str, list[tuple[int, int]]] = {}
        for r in sorted(found, key=lambda r: (r[0], r[1])):
            taken.setdefault(r[0], []).append((int(r[1]), int(r[2])))
        results: list[SlotClaim | None] = []
        for c in group:
            slots = taken.get(c.agent)
            if not slots:
                results.append(None)
                continue
            slot, expires = slots.pop(0)
            results.append(SlotClaim(c.agent, slot, c.holder, codec.from_micros(expires)))
        return results

    async def renew_slots(
        self, claims: Sequence[SlotClaim], lease_s: float
    ) -> list[SlotClaim | None]:
        self._check()
        if not claims:
            return []
        found = await self._fetch(
            GROUP_SLOT_RENEW_SQL,
            _us(lease_s),
            [c.agent for c in claims],
            [c.slot for c in claims],
            [c.holder for c in claims],
        )
        kept = {(r[0], int(r[1]), r[2]): int(r[3]) for r in found}
        renewed: list[SlotClaim | None] = []
        for c in claims:
            expires = kept.get((c.agent, c.slot, c.holder))
            renewed.append(
                None
                if expires is None
                else SlotClaim(c.agent, c.slot, c.holder, codec.from_micros(expires))
            )
        return renewed

    async def release_slot(self, claim: SlotClaim) -> None:
        self._check()
        await self._slot_releases.write(claim)

    async def _release_slot_one(self, claim: SlotClaim) -> None:
        await self._fetchval(
            "UPDATE agent_slots SET holder = NULL WHERE agent = $1 AND slot = $2 AND holder = $3",
            claim.agent,
            claim.slot,
            claim.holder,
        )

    async def _release_slot_group(self, group: Sequence[SlotClaim]) -> list[None]:
        self._check()
        # Each row is changed only by its own holder's release: no two groups wait on
        # each other's rows, and claims skip locked rows.
        await self._pool.execute(
            GROUP_SLOT_RELEASE_SQL,
            [c.agent for c in group],
            [c.slot for c in group],
            [c.holder for c in group],
        )
        return [None] * len(group)

    async def lead(self, role: str, holder: str, lease_s: float) -> bool:
        found = await self._fetchval(
            f"INSERT INTO leaders (role, holder, expires_us) VALUES ($1, $2, {DB_NOW_US} + $3)"
            " ON CONFLICT (role) DO UPDATE SET holder = excluded.holder,"
            " expires_us = excluded.expires_us"
            " WHERE leaders.holder = excluded.holder"
            f" OR leaders.expires_us < {DB_NOW_US} RETURNING role",
            role,
            holder,
            _us(lease_s),
        )
        return found is not None

    async def resign(self, role: str, holder: str) -> None:
        self._check()
        await self._pool.execute(
            "UPDATE leaders SET expires_us = 0 WHERE role = $1 AND holder = $2", role, holder
        )

    # --- webhook outbox ---------------------------------------------------------------------

    async def outbox_put(self, job_id: str, url: str, body: bytes) -> int:
        now = _now_us()
        found = await self._fetchval(
            "INSERT INTO webhook_outbox (job_id, url, body, due_us, created_us)"
            " VALUES ($1, $2, $3, $4, $4) RETURNING id",
            job_id,
            url,
            body,
            now,
        )
        return int(found)

    async def outbox_claim(self, holder: str, lease_s: float, limit: int) -> list[OutboxItem]:
        # When a row is due is the writers' clocks' (a skew shifts a retry); whether
        # another runner's lease on it still runs, the database's.
        found = await self._fetch(
            "WITH due AS (SELECT id FROM webhook_outbox WHERE due_us IS NOT NULL"
            f" AND due_us <= $1 AND (lease_holder IS NULL OR lease_expires_us < {DB_NOW_US})"
            " ORDER BY due_us, id LIMIT $2 FOR UPDATE SKIP LOCKED)"
            f" UPDATE webhook_outbox o SET lease_holder = $3, lease_expires_us = {DB_NOW_US} + $4"
            " FROM due WHERE o.id = due.id"
            " RETURNING o.id, o.job_id, o.url, o.body, o.attempts, o.due_us",
            _now_us(),
            limit,
            holder,
            _us(lease_s),
        )
        ordered = sorted(found, key=lambda r: (r["due_us"], r["id"]))
        return [OutboxItem(r[0], r[1], r[2], bytes(r[3]), r[4]) for r in ordered]

    async def outbox_done(self, item_id: int) -> None:
        await self._fetchval("DELETE FROM webhook_outbox WHERE id = $1", item_id)

    async def outbox_failed(self, item_id: int, error: str, retry_in_s: float | None) -> None:
        due = None if retry_in_s is None else _now_us() + _us(retry_in_s)
        await self._fetchval(
            "UPDATE webhook_outbox SET attempts = attempts + 1, last_error = $1, due_us = $2,"
            " lease_holder = NULL, lease_expires_us = NULL WHERE id = $3",
            error,
            due,
            item_id,
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._hub.close()
        for task in (self._others_count, self._renaming):
            if task is not None:
                task.cancel()
        if self._reconnect is not None:
            self._reconnect.cancel()
        if self._listener_check is not None:
            self._listener_check.cancel()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
        await self._pool.close()


_CLAIM_SLOT_SQL = (
    "WITH free AS (SELECT slot FROM agent_slots WHERE agent = $1 AND slot < $2"
    f" AND (holder IS NULL OR expires_us < {DB_NOW_US}) ORDER BY slot LIMIT 1"
    " FOR UPDATE SKIP LOCKED)"
    f" UPDATE agent_slots a SET holder = $3, expires_us = {DB_NOW_US} + $4 FROM free"
    " WHERE a.agent = $1 AND a.slot = free.slot RETURNING a.slot, a.expires_us"
)
_EXISTING_SQL = f"SELECT {rows.SELECT_COLUMNS} FROM jobs WHERE owner = $1 AND ref_id = $2"


@functools.cache
def _create_sql(limited: bool, events: bool, announce: bool) -> str:
    """The insert of a job with its input references and, when new, what goes with it, as
    one statement. Parameters: the columns, the lease (holder, expiry), the input hashes,
    then for each part present: the active limit (``limited``: inserted only while the owner
    has fewer unfinished jobs; run under the owner's lock), the events (sequences, kinds,
    payloads, time), the announcement (``announce``: channel, notice). Returns the id only
    when it inserted."""
    n = len(rows.COLUMNS) + 3
    # The columns, the holder, and the lease's end: its length from the database's time.
    values = ", ".join(f"${i}" for i in range(1, n - 1)) + f", ${n - 1}::bigint + {DB_NOW_US}"
    source = f"VALUES ({values})"
    if limited:
        n += 1
        source = (
            f"SELECT {values} WHERE (SELECT count(*) FROM jobs"
            f" WHERE owner = ${rows.COLUMNS.index('owner') + 1}"
            f" AND unfinished) < ${n}"
        )
    sql = (
        f"WITH made AS (INSERT INTO jobs ({rows.SELECT_COLUMNS}, lease_holder,"
        f" lease_expires_us) {source} ON CONFLICT (owner, ref_id) DO NOTHING RETURNING id),"
        " inputs AS (INSERT INTO job_inputs (job_id, sha256)"
        f" SELECT made.id, unnest(${len(rows.COLUMNS) + 3}::text[]) FROM made"
        " ON CONFLICT DO NOTHING)"
    )
    if not events:
        return sql + " SELECT id FROM made"
    return sql + (
        ", stored AS (INSERT INTO job_events (job_id, sequence, kind, payload, created_us)"
        f" SELECT made.id, e.sequence, e.kind, e.payload, ${n + 4} FROM made,"
        f" unnest(${n + 1}::bigint[], ${n + 2}::text[], ${n + 3}::text[])"
        " AS e(sequence, kind, payload) ON CONFLICT DO NOTHING)"
        + (
            f" SELECT id, pg_notify(${n + 5}, ${n + 6}) FROM made"
            if announce
            else " SELECT id FROM made"
        )
    )


def _event_arrays(events: Sequence[NewEvent], now_us: int) -> list[Any]:
    """Events as the columns ``unnest`` takes (sequences, kinds, payloads), then the time."""
    return [
        [e.sequence for e in events],
        [e.kind for e in events],
        [rows.dumps(e.payload) for e in events],
        now_us,
    ]


@functools.cache
def _save_sql(events: bool, release: bool, prune: bool, outbox: bool, announce: bool) -> str:
    """The fenced update of a job and what goes with it, as one statement. Parameters: $1 id,
    $2 holder (NULL: unfenced), the mutable columns, then for each part present in order:
    events (sequences, kinds, payloads, time), with ``announce`` (events only) the channel,
    the notice and whether every job's events are followed, the pruned kind, the outbox (urls,
    bodies, time). A part runs only when the update found its row (``FROM saved``). The
    notice goes only when every job's events are followed or the row says ``watched`` (every
    listening backend spends a transaction on each notification it receives)."""
    n = 2 + len(rows.MUTABLE)
    sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(rows.MUTABLE, start=3))
    if release:
        sets += ", lease_holder = NULL, lease_expires_us = NULL"
    sql = (
        f"WITH saved AS (UPDATE jobs SET {sets}"
        " WHERE id = $1 AND ($2::text IS NULL OR lease_holder = $2) RETURNING id, watched)"
    )
    notify = ""
    if events:
        sql += (
            ", stored AS (INSERT INTO job_events (job_id, sequence, kind, payload, created_us)"
            f" SELECT saved.id, e.sequence, e.kind, e.payload, ${n + 4} FROM saved,"
            f" unnest(${n + 1}::bigint[], ${n + 2}::text[], ${n + 3}::text[])"
            " AS e(sequence, kind, payload) ON CONFLICT DO NOTHING)"
        )
        n += 4
        if announce:
            notify = f", CASE WHEN watched OR ${n + 3} THEN pg_notify(${n + 1}, ${n + 2}) END"
            n += 3
    if prune:
        # The statement's snapshot: rows stored by ``stored`` above are not seen (kept).
        sql += (
            ", pruned AS (DELETE FROM job_events WHERE job_id = $1"
            f" AND kind = ${n + 1} AND EXISTS (SELECT 1 FROM saved) AND sequence <"
            f" (SELECT max(sequence) FROM job_events WHERE job_id = $1 AND kind = ${n + 1}))"
        )
        n += 1
    if outbox:
        sql += (
            ", queued AS (INSERT INTO webhook_outbox (job_id, url, body, due_us, created_us)"
            f" SELECT saved.id, o.url, o.body, ${n + 3}, ${n + 3} FROM saved,"
            f" unnest(${n + 1}::text[], ${n + 2}::bytea[]) AS o(url, body))"
        )
        n += 3
    return sql + f" SELECT id{notify} FROM saved"


MIGRATION_WAIT_S = 600.0
"""How long a process waits for another one's migration (under the migration lock) to end:
a step rewriting a large table is slow, not a sign of an outage."""

MIGRATION_ATTEMPT_S = 1.0
"""The longest one attempt of a step waits for a table lock (less when the database timeout
is short: a quarter of it). Meanwhile the step holds the locks its earlier statements took
(ACCESS EXCLUSIVE for an ALTER), and every other session's statement on those tables queues
behind it: short attempts keep that queueing short for the coordinators already running."""

MIGRATION_BUDGET_TIMEOUTS = 6
"""Each step retries its attempts (rolled back whole, with backoff and jitter) for up to
this many database timeouts (AISERVER_DATABASE_TIMEOUT_S) of waiting for table locks: a lock
held for a while (a long transaction) delays the start, one held longer is reported. Time
spent queued behind another process's migration (the advisory lock) does not count."""


class MigrationLockTimeout(BackendBusy):
    """A migration gave up waiting for a lock (nothing of its step was applied): at start-up
    the process does not start; met in a call it answers UNAVAILABLE."""


OPEN_FAILURES = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    MigrationLockTimeout,
    migrations.SchemaTooNew,
)
"""What opening a PostgreSQL store (connect, migrate) raises when the database cannot be
used: the caller reports it as StoreUnavailable (one line at start-up)."""


class _LockBusy(Exception):
    """One attempt of a step met a lock held past its lock_timeout, or a deadlock (and
    rolled back); ``queued_s``: how long it first waited behind another migration."""

    def __init__(self, what: str, statement: str) -> None:
        super().__init__(what)
        self.what = what
        self.statement = statement
        self.queued_s = 0.0


async def migrate(
    url: str,
    schema: str,
    *,
    connect_timeout_s: float = DEFAULT_TIMEOUT_S,
    lock_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Create ``schema`` if needed and bring its tables to the newest version. The connect
    is bounded, and so are the table locks a step waits for: attempts of at most
    :data:`MIGRATION_ATTEMPT_S` (a quarter of ``lock_timeout_s`` when shorter), retried for
    up to :data:`MIGRATION_BUDGET_TIMEOUTS` x ``lock_timeout_s`` (a step altering a table
    another session holds would otherwise wait forever, and meanwhile every other session's
    statement on the tables it already altered queues behind it); another process's
    migration is waited for up to :data:`MIGRATION_WAIT_S`. Either wait running out raises
    :class:`MigrationLockTimeout` with what was waited for."""
    if _SCHEMA_NAME.fullmatch(schema) is None:
        raise ValueError(f"schema {schema!r}: lower-case letters, digits and _ only")
    conn = await asyncpg.connect(url, timeout=connect_timeout_s)
    try:
        while await _migrate_step(conn, schema, lock_timeout_s):
            pass
    finally:
        await conn.close()


def _lock_timeout(seconds: float) -> str:
    # SET takes no parameters; a whole number of milliseconds, at least 1 (0 = forever).
    return f"SET LOCAL lock_timeout = {max(1, round(seconds * 1000))}"


async def _migrate_step(conn: asyncpg.Connection, schema: str, timeout_s: float) -> bool:
    """Apply the next pending step, retrying its attempts while a table lock is busy: True
    when one was applied, False when the schema is up to date."""
    attempt_s = min(MIGRATION_ATTEMPT_S, timeout_s / 4)
    budget_s = MIGRATION_BUDGET_TIMEOUTS * timeout_s
    deadline = time.monotonic() + budget_s
    pause_s = attempt_s / 4
    attempts = 0
    while True:
        attempts += 1
        wait_s = max(0.001, min(attempt_s, deadline - time.monotonic()))
        try:
            return await _attempt_step(conn, schema, wait_s)
        except _LockBusy as busy:
            deadline += busy.queued_s  # behind another migration: not this step's waiting
            if time.monotonic() + pause_s / 2 >= deadline:
                shown = " ".join(busy.statement.split())[:80]
                raise MigrationLockTimeout(
                    f"job database schema {schema}: {busy.what} waited more than"
                    f" {budget_s:g} s ({MIGRATION_BUDGET_TIMEOUTS} x AISERVER_DATABASE_TIMEOUT_S;"
                    f" {attempts} attempts, lock_timeout {attempt_s:g} s) for a lock another"
                    f" session holds, at {shown!r}; nothing of the step was applied. End that"
                    " session's transaction (pg_stat_activity, pg_locks) and start again"
                ) from None
        # Jitter: processes starting at once do not retry in step with each other.
        await asyncio.sleep(random.uniform(pause_s / 2, pause_s))
        pause_s = min(2 * pause_s, attempt_s)


async def _attempt_step(conn: asyncpg.Connection, schema: str, lock_wait_s: float) -> bool:
    """One attempt of the next step, in a transaction under the migration advisory lock."""
    async with conn.transaction():
        await conn.execute(_lock_timeout(MIGRATION_WAIT_S))
        # Held to commit: a second process starting now waits, then sees the new version.
        asked = time.monotonic()
        try:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", migrations.MIGRATION_LOCK)
        except asyncpg.LockNotAvailableError:
            raise MigrationLockTimeout(
                f"job database schema {schema}: another session has held the migration"
                f" lock for more than {MIGRATION_WAIT_S:g} s (lock_timeout); is a"
                " migration stuck? (pg_locks: advisory lock"
                f" {migrations.MIGRATION_LOCK})"
            ) from None
        queued_s = time.monotonic() - asked
        await conn.execute(_lock_timeout(lock_wait_s))
        try:
            version = await _migration_step(conn, schema)
        except _LockBusy as busy:
            busy.queued_s = queued_s
            raise
        if version is None:
            return False
        await conn.execute(
            "INSERT INTO schema_migrations (version, applied_us) VALUES ($1, $2)",
            version,
            _now_us(),
        )
        return True


async def _migration_step(conn: asyncpg.Connection, schema: str) -> int | None:
    """Apply the next pending step (in the caller's transaction): its version, or None when
    the schema is up to date. A lock wait running out raises :class:`_LockBusy` (the
    transaction is then rolled back whole)."""
    what = f"creating schema {schema} and its schema_migrations table"
    statement = f"CREATE SCHEMA IF NOT EXISTS {schema}"
    try:
        await conn.execute(statement)
        await conn.execute(f"SET search_path = {schema}")
        statement = (
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (version INTEGER PRIMARY KEY, applied_us BIGINT NOT NULL)"
        )
        await conn.execute(statement)
        what = "reading the schema version"
        statement = "SELECT coalesce(max(version), 0) FROM schema_migrations"
        version = int(await conn.fetchval(statement))
        if version > len(migrations.POSTGRES):
            raise migrations.SchemaTooNew(version, len(migrations.POSTGRES))
        if version == len(migrations.POSTGRES):
            return None
        what = f"migration to version {version + 1}"
        for statement in migrations.statements(migrations.POSTGRES[version]):
            await conn.execute(statement)
    except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError):
        # A deadlock: a running coordinator of the release before took the step's tables in
        # the other order (a rolling upgrade); PostgreSQL chose this side: try again.
        raise _LockBusy(what, statement) from None
    return version + 1
