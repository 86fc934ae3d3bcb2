"""The PostgreSQL statements that store several jobs' writes at once (``group_commit.py``):
each job's values go in as arrays (``unnest``), one element per write."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiserver.jobs.store import rows
from aiserver.jobs.store.protocol import JobRecord, NewEvent

__all__ = [
    "DB_NOW_US",
    "GROUP_SLOT_CLAIM_SQL",
    "GROUP_SLOT_RELEASE_SQL",
    "GROUP_SLOT_RENEW_SQL",
    "PendingCreate",
    "PendingSave",
    "PendingSlotClaim",
    "group_create_args",
    "group_create_sql",
    "group_save_args",
    "group_save_parts",
    "group_save_sql",
]

DB_NOW_US = "(extract(epoch FROM statement_timestamp()) * 1000000)::bigint"
"""The database's time (microseconds) in a statement: every lease - jobs, agent slots,
leaders, outbox rows - is set and judged by this one clock, so a coordinator whose own clock
is off neither takes a lease still running nor writes one that lapses early
(docs/scale-out.md, "Clocks")."""

_TYPES = {
    "id": "text",
    "owner": "text",
    "ref_id": "text",
    "task": "text",
    "spec": "text",
    "state": "text",
    "tag": "text",
    "reply_to": "text",
    "provider": "text",
    "agent": "text",
    "attempts": "integer",
    "created_us": "bigint",
    "updated_us": "bigint",
    "started_us": "bigint",
    "ended_us": "bigint",
    "progress": "double precision",
    "inputs": "text",
    "outputs": "text",
    "texts": "text",
    "error": "text",
    "resume": "text",
    "retries": "text",
    "last_sequence": "bigint",
    "webhook": "text",
}
assert set(_TYPES) == set(rows.COLUMNS)


@dataclass(slots=True)
class PendingSave:
    """One job's save: its mutable row and what goes with it."""

    row: dict[str, Any]
    holder: str | None
    events: Sequence[NewEvent]
    release: bool
    prune: str
    outbox: Sequence[tuple[str, bytes]]
    notice: str | None
    """The announcement sent when saved, if the job is watched from another process or every
    job's events are followed (``None``: none)."""

    @property
    def job_id(self) -> str:
        return str(self.row["id"])


@dataclass(slots=True)
class PendingCreate:
    """One job's create: its row, input hashes, lease and events."""

    record: JobRecord
    row: dict[str, Any]
    shas: Sequence[str]
    holder: str | None
    lease_us: int | None
    """The lease's length: it runs from the database's time of the insert."""
    max_active: int
    events: Sequence[NewEvent]
    notice: str | None

    @property
    def key(self) -> tuple[str, str]:
        return (str(self.row["owner"]), str(self.row["ref_id"]))


def _unnest(first: int, columns: Sequence[str], types: Sequence[str]) -> tuple[str, str]:
    """``unnest`` of arrays ``$first...`` (typed) and its column list."""
    arrays = ", ".join(f"${i}::{t}[]" for i, t in enumerate(types, start=first))
    return f"unnest({arrays})", ", ".join(columns)


def _events_cte(first: int, now: int, made: str) -> str:
    """Insert the events (arrays $first.. of job ids, sequences, kinds, payloads) of the
    jobs in ``made``."""
    source, names = _unnest(first, ("job_id", "sequence", "kind", "payload"), _EVENT_TYPES)
    return (
        " stored AS (INSERT INTO job_events (job_id, sequence, kind, payload, created_us)"
        f" SELECT e.job_id, e.sequence, e.kind, e.payload, ${now} FROM {source} AS e({names})"
        f" WHERE e.job_id IN (SELECT id FROM {made}) ON CONFLICT DO NOTHING)"
    )


_EVENT_TYPES = ("text", "bigint", "text", "text")


def _event_args(items: Sequence[tuple[str, Sequence[NewEvent]]]) -> list[Any]:
    events = [(job_id, e) for job_id, batch in items for e in batch]
    return [
        [job_id for job_id, _ in events],
        [e.sequence for _, e in events],
        [e.kind for _, e in events],
        [rows.dumps(e.payload) for _, e in events],
    ]


def group_save_parts(group: Sequence[PendingSave]) -> tuple[bool, bool, bool]:
    """Which optional parts :func:`group_save_sql` needs for ``group``: events, prunes,
    outbox rows. A part no save of the group has is left out of the statement: each part is a
    data-modifying CTE, which PostgreSQL sets up, runs and finishes even when it has nothing
    to write (most groups carry no prune and no outbox row)."""
    return (
        any(s.events for s in group),
        any(s.prune for s in group),
        any(s.outbox for s in group),
    )


@functools.cache
def group_save_sql(events: bool, prune: bool, outbox: bool) -> str:
    """Several fenced saves as one statement. Parameters: per save $1 ids, $2 holders (NULL:
    unfenced), $3 releases, $4 pruned kinds (NULL: none), $5 notices (NULL: not announced),
    then each mutable column; then for each part present (:func:`group_save_parts`): the
    events (4 arrays), the time (with events or outbox), the outbox (job ids, urls, bodies),
    and with events the channel and whether every job's events are followed (else a notice
    goes only for a job watched from another process). Returns the ids saved: only rows
    still held by the holder their save names change, and only their events, prunes and
    outbox rows go in.

    Rows are locked in id order first: two statements locking several rows each in
    different orders could deadlock (``renew_all`` locks in id order too)."""
    n = 5 + len(rows.MUTABLE)
    source, names = _unnest(
        1,
        ("id", "holder", "release", "prune", "notice", *rows.MUTABLE),
        ("text", "text", "boolean", "text", "text", *(_TYPES[c] for c in rows.MUTABLE)),
    )
    sets = ", ".join(f"{c} = v.{c}" for c in rows.MUTABLE)
    sql = (
        f"WITH v AS MATERIALIZED (SELECT * FROM {source} AS v({names})),"
        " locked AS MATERIALIZED (SELECT id FROM jobs WHERE id = ANY($1::text[])"
        " ORDER BY id FOR UPDATE),"
        f" saved AS (UPDATE jobs j SET {sets},"
        " lease_holder = CASE WHEN v.release THEN NULL ELSE j.lease_holder END,"
        " lease_expires_us = CASE WHEN v.release THEN NULL ELSE j.lease_expires_us END"
        " FROM v WHERE j.id = v.id AND j.id IN (SELECT id FROM locked)"
        " AND (v.holder IS NULL OR j.lease_holder = v.holder)"
        " RETURNING j.id, v.prune, v.notice, j.watched)"
    )
    first_event, now = n + 1, (n + 5 if events else n + 1)
    n = now if events or outbox else n
    if events:
        sql += "," + _events_cte(first_event, now, "saved")
    if prune:
        # The statement's snapshot: rows stored by ``stored`` above are not seen (kept).
        sql += (
            ", pruned AS (DELETE FROM job_events d USING saved s WHERE s.prune IS NOT NULL"
            " AND d.job_id = s.id AND d.kind = s.prune AND d.sequence < (SELECT max(m.sequence)"
            " FROM job_events m WHERE m.job_id = s.id AND m.kind = s.prune))"
        )
    if outbox:
        sql += (
            ", queued AS (INSERT INTO webhook_outbox (job_id, url, body, due_us, created_us)"
            f" SELECT o.job_id, o.url, o.body, ${now}, ${now} FROM unnest(${n + 1}::text[],"
            f" ${n + 2}::text[], ${n + 3}::bytea[]) AS o(job_id, url, body)"
            " WHERE o.job_id IN (SELECT id FROM saved))"
        )
        n += 3
    if not events:  # no event: no notice
        return sql + " SELECT id FROM saved"
    return sql + (
        " SELECT id, CASE WHEN notice IS NOT NULL AND (watched OR"
        f" ${n + 2}::boolean) THEN pg_notify(${n + 1}, notice) END FROM saved"
    )


def group_save_args(
    group: Sequence[PendingSave], now_us: int, channel: str, everyone: bool
) -> list[Any]:
    """The parameters of :func:`group_save_sql` for ``group`` (its parts as
    :func:`group_save_parts` says)."""
    events, _, outbox = group_save_parts(group)
    args: list[Any] = [
        [s.job_id for s in group],
        [s.holder for s in group],
        [s.release for s in group],
        [s.prune or None for s in group],
        [s.notice for s in group],
        *([s.row[c] for s in group] for c in rows.MUTABLE),
    ]
    if events:
        args += _event_args([(s.job_id, s.events) for s in group])
    if events or outbox:
        args.append(now_us)
    if outbox:
        queued = [(s.job_id, url, body) for s in group for url, body in s.outbox]
        args += [[o[0] for o in queued], [o[1] for o in queued], [o[2] for o in queued]]
    if events:
        args += [channel, everyone]
    return args


@functools.cache
def group_create_sql() -> str:
    """Several creates as one statement. Parameters: per create the columns, the lease
    (holder, expiry), the active limit (0: none) and the notice (NULL: none); then the input
    references (job ids, hashes), the events (4 arrays), the time and the channel. Returns
    the ids inserted.

    A limited create goes in only while its owner's unfinished jobs, plus the group's
    creates of the same owner before it, stay under the limit: run after the owners'
    locks, like a lone create. A create that did not go in (its ``ref_id`` exists, or the
    limit) is then answered by a lone create, which says which (and how the limit stands
    once the group's own are counted)."""
    columns = (*rows.COLUMNS, "lease_holder", "lease_expires_us", "max_active", "notice")
    types = (*(_TYPES[c] for c in rows.COLUMNS), "text", "bigint", "integer", "text")
    source, names = _unnest(1, columns, types)
    n = len(columns)
    inputs, events, now, channel = n + 1, n + 3, n + 7, n + 8
    insert = ", ".join((*rows.COLUMNS, "lease_holder", "lease_expires_us"))
    select = ", ".join((*rows.COLUMNS, "lease_holder", f"lease_expires_us + {DB_NOW_US}"))
    return (
        f"WITH v AS MATERIALIZED (SELECT *, row_number() OVER () AS ord FROM {source}"
        f" AS v({names})),"
        " ok AS (SELECT * FROM v WHERE v.max_active <= 0 OR (SELECT count(*) FROM jobs j"
        " WHERE j.owner = v.owner AND j.unfinished)"
        " + (SELECT count(*) FROM v w WHERE w.owner = v.owner AND w.ord < v.ord)"
        " < v.max_active),"
        # In (owner, ref_id) order: two groups racing on the same ref_ids wait in one order.
        f" made AS (INSERT INTO jobs ({insert}) SELECT {select} FROM ok ORDER BY owner, ref_id"
        " ON CONFLICT (owner, ref_id) DO NOTHING RETURNING id),"
        " inputs AS (INSERT INTO job_inputs (job_id, sha256) SELECT i.job_id, i.sha256"
        f" FROM unnest(${inputs}::text[], ${inputs + 1}::text[]) AS i(job_id, sha256)"
        " WHERE i.job_id IN (SELECT id FROM made) ON CONFLICT DO NOTHING),"
        + _events_cte(events, now, "made")
        + f" SELECT m.id, CASE WHEN v.notice IS NOT NULL THEN pg_notify(${channel}, v.notice)"
        " END FROM made m JOIN v ON v.id = m.id"
    )


def group_create_args(group: Sequence[PendingCreate], now_us: int, channel: str) -> list[Any]:
    """The parameters of :func:`group_create_sql` for ``group``."""
    inputs = [(c.row["id"], sha) for c in group for sha in c.shas]
    return [
        *([c.row[col] for c in group] for col in rows.COLUMNS),
        [c.holder for c in group],
        [c.lease_us for c in group],
        [c.max_active for c in group],
        [c.notice for c in group],
        [i[0] for i in inputs],
        [i[1] for i in inputs],
        *_event_args([(c.row["id"], c.events) for c in group]),
        now_us,
        channel,
    ]


@dataclass(eq=False, slots=True)
class PendingSlotClaim:
    """A slot wanted on ``agent`` (one of its first ``capacity``)."""

    agent: str
    capacity: int
    holder: str
    lease_s: float


GROUP_SLOT_CLAIM_SQL = (
    # Per agent, as many free slots as the group wants there (SKIP LOCKED: never waits).
    "WITH want AS (SELECT agent, capacity, count(*) AS n"
    " FROM unnest($1::text[], $2::integer[]) AS w(agent, capacity) GROUP BY agent, capacity),"
    " free AS (SELECT s.agent, s.slot FROM want, LATERAL (SELECT agent, slot FROM agent_slots"
    " WHERE agent = want.agent AND slot < want.capacity"
    f" AND (holder IS NULL OR expires_us < {DB_NOW_US})"
    " ORDER BY slot LIMIT want.n FOR UPDATE SKIP LOCKED) AS s)"
    f" UPDATE agent_slots a SET holder = $3, expires_us = {DB_NOW_US} + $4 FROM free"
    " WHERE a.agent = free.agent AND a.slot = free.slot RETURNING a.agent, a.slot, a.expires_us"
)
"""Several slot claims of one holder (``$3``, lease ``$4`` µs) as one statement: the (agent,
slot, expiry) taken."""

GROUP_SLOT_RELEASE_SQL = (
    # Rows locked in (agent, slot) order, as a renewal locks them: the two multi-row
    # statements of one holder never wait on each other in a cycle.
    "WITH locked AS MATERIALIZED (SELECT a.agent, a.slot FROM agent_slots a"
    " JOIN unnest($1::text[], $2::integer[], $3::text[]) AS v(agent, slot, holder)"
    " ON a.agent = v.agent AND a.slot = v.slot AND a.holder = v.holder"
    " ORDER BY a.agent, a.slot FOR UPDATE OF a)"
    " UPDATE agent_slots a SET holder = NULL FROM locked"
    " WHERE a.agent = locked.agent AND a.slot = locked.slot"
)
"""Several slot releases as one statement (each row only by its own holder)."""

GROUP_SLOT_RENEW_SQL = (
    # One holder's renewal timer: every slot it holds in one statement, rows locked in
    # (agent, slot) order (as a group release locks them). A row whose lease lapsed (and
    # may be another's now) or was released is not renewed: that claim is lost.
    "WITH v AS (SELECT * FROM unnest($2::text[], $3::integer[], $4::text[])"
    " AS v(agent, slot, holder)),"
    " locked AS MATERIALIZED (SELECT a.agent, a.slot FROM agent_slots a"
    " JOIN v ON a.agent = v.agent AND a.slot = v.slot AND a.holder = v.holder"
    f" WHERE a.expires_us >= {DB_NOW_US} ORDER BY a.agent, a.slot FOR UPDATE OF a)"
    f" UPDATE agent_slots a SET expires_us = {DB_NOW_US} + $1 FROM locked"
    " WHERE a.agent = locked.agent AND a.slot = locked.slot"
    " RETURNING a.agent, a.slot, a.holder, a.expires_us"
)
"""Every slot one process holds, renewed for ``$1`` µs in one statement: the (agent, slot,
holder, expiry) kept."""
