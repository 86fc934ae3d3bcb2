"""What a job's writes cost PostgreSQL: saves that keep a job unfinished are HOT updates
(no index entry written), storing an event does not lock its job's row (no foreign key
check), and the hot statements read rows by index on a table that grew after their plans
were cached (migration 5, ``PLANNER_SETTINGS``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from aiserver.jobs.model import JobState
from aiserver.jobs.store import JobRecord, NewEvent
from aiserver.jobs.store.postgres import PostgresJobStore
from tests.storage.backends import PG_URL, JobStoreBackend
from tests.storage.test_job_store import make_job


async def _update_counts(backend: JobStoreBackend) -> tuple[int, int]:
    """(updates, HOT updates) of ``jobs``, once the store's backends reported them."""
    conn = await asyncpg.connect(PG_URL)
    try:
        for _ in range(100):
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            found = await conn.fetchrow(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
                " WHERE schemaname = $1 AND relname = 'jobs'",
                backend.schema,
            )
            if found is not None and found[0] >= 3:
                return int(found[0]), int(found[1])
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    raise AssertionError("the store's updates were never reported")


async def test_saves_that_keep_a_job_unfinished_write_no_index(tmp_path: Path) -> None:
    backend = JobStoreBackend("postgres", tmp_path)
    try:
        store = await backend.open()
        job = make_job(1)
        await store.create(JobRecord(job), holder="h", lease_s=30.0)
        job.state = JobState.RUNNING  # QUEUED -> RUNNING: `state` changes, `unfinished` not
        await store.save(JobRecord(job), holder="h")
        job.resume = {"agent": "a", "prompt_id": "p"}
        await store.save(JobRecord(job), holder="h")
        job.progress = 0.5
        await store.save(JobRecord(job), holder="h")
        await store.close()  # its backends exit and report their counts
        assert await _update_counts(backend) == (3, 3)
    finally:
        await backend.close()


async def test_hot_statements_use_indexes_on_a_table_never_analyzed(tmp_path: Path) -> None:
    backend = JobStoreBackend("postgres", tmp_path)
    try:
        store = await backend.open()
        assert isinstance(store, PostgresJobStore)
        for n in range(400):  # one owner's history, all finished: nothing counts for the quota
            await store.create(JobRecord(make_job(n, state=JobState.SUCCEEDED)))
        async with store._pool.acquire() as conn:
            counted = "\n".join(
                r[0]
                for r in await conn.fetch(
                    "EXPLAIN SELECT count(*) FROM jobs WHERE owner = 'alice' AND unfinished"
                )
            )
            locked = "\n".join(
                r[0]
                for r in await conn.fetch(
                    "EXPLAIN SELECT id FROM jobs WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE",
                    ["a", "b"],
                )
            )
        # The quota reads the owner's unfinished jobs only, not the owner's history.
        assert "jobs_unfinished_by_owner" in counted, counted
        assert "Seq Scan" not in locked, locked
    finally:
        await backend.close()


async def test_storing_events_does_not_lock_the_job_row(tmp_path: Path) -> None:
    backend = JobStoreBackend("postgres", tmp_path)
    try:
        store = await backend.open()
        job = make_job(1)
        await store.create(JobRecord(job), holder="h", lease_s=30.0)
        other = await asyncpg.connect(PG_URL, server_settings={"search_path": backend.schema})
        try:
            async with other.transaction():
                # Another transaction holds the row (a foreign key check would wait for it).
                await other.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", job.id)
                # Not announced: an announced append share-locks the row to see `watched`.
                await asyncio.wait_for(
                    store.append_events(
                        job.id, [NewEvent(2, "progress", {"p": 0.5})], announce=False
                    ),
                    5.0,
                )
        finally:
            await other.close()
        assert [e.sequence for e in await store.events(job.id)] == [2]
    finally:
        await backend.close()


async def test_a_former_holders_late_progress_is_not_stored(tmp_path: Path) -> None:
    # A held progress leaves on its timer (append_events), after any save: after a steal it
    # must not land in the new holder's event sequence.
    from datetime import UTC, datetime

    from aiserver.jobs.event_log import EventLog
    from aiserver.jobs.model import JobEvent, Progress
    from aiserver.stages import Stage

    backend = JobStoreBackend("postgres", tmp_path)
    try:
        a, b = await backend.open(), await backend.open()
        job = make_job(1)
        await a.create(JobRecord(job), holder="A", lease_s=30.0)
        # Watched from B: progress rows are stored for it (for nobody they would not be).
        watching = await b.announcements(watch=job.id)
        log = EventLog(a, progress_interval_s=0.05, event_delay_s=0.05, holder="A")
        log.record(JobEvent(job.id, 2, datetime.now(UTC), Progress(Stage.QUEUED, 0.1)))
        await log.drain(5.0)  # still A's: stored
        assert [e.sequence for e in await b.events(job.id)] == [2]
        assert await b.steal(job.id, "B", 30, from_holder="A") is not None
        log.record(JobEvent(job.id, 3, datetime.now(UTC), Progress(Stage.QUEUED, 0.2)))
        await log.drain(5.0)  # B's now: A's late progress is dropped
        assert [e.sequence for e in await b.events(job.id)] == [2]
        # the new holder's own events go in
        await b.append_events(job.id, [NewEvent(3, "progress", {})], holder="B")
        assert [e.sequence for e in await b.events(job.id)] == [2, 3]
        await watching.aclose()
    finally:
        await backend.close()


async def _row_version(store: PostgresJobStore, job_id: str) -> tuple[str, str]:
    """The job row's ``xmin`` and ``xmax``: a row lock or an update changes one of them."""
    async with store._pool.acquire() as conn:
        found = await conn.fetchrow("SELECT xmin::text, xmax::text FROM jobs WHERE id = $1", job_id)
    assert found is not None
    return found[0], found[1]


async def test_progress_alone_for_nobody_writes_nothing(tmp_path: Path) -> None:
    # A timer's flush of progress alone (the event log's) stores rows only for a reader
    # elsewhere; for nobody it writes nothing at all (its commit waits for no flush), and the
    # job's next ones are not even sent until the finding is ``recheck_s`` old.
    from aiserver.jobs.event_codec import PROGRESS

    backend = JobStoreBackend("postgres", tmp_path)
    try:
        store, other = await backend.open(), await backend.open()
        assert isinstance(store, PostgresJobStore)
        store._unwatched.recheck_s = 0.3
        sent: list[str] = []
        fetchval = store._fetchval

        async def counted(sql: str, *args: object) -> object:
            sent.append(sql)
            return await fetchval(sql, *args)

        store._fetchval = counted  # type: ignore[method-assign]
        # The store counts who follows every job (nobody here) once its LISTEN is open.
        own = await store.announcements()
        await store._count_others()
        assert not store._others_follow_all()
        job = make_job(1)
        await store.create(JobRecord(job), holder="A", lease_s=30.0)
        before = await _row_version(store, job.id)

        async def progress(sequence: int) -> None:
            await store.append_events(
                job.id, [NewEvent(sequence, PROGRESS, {})], holder="A", progress_kind=PROGRESS
            )

        asked = len(sent)
        await progress(2)  # a job just created is watched by nobody: not sent
        assert len(sent) == asked
        await asyncio.sleep(0.4)
        await progress(3)  # asked again, found unwatched: nothing written
        assert len(sent) == asked + 1
        assert await store.events(job.id) == []
        assert await _row_version(store, job.id) == before  # not even locked
        await progress(3)  # found unwatched a moment ago: not sent
        assert len(sent) == asked + 1
        # Another event kind in the batch: all go in (the progress row too), as always.
        await store.append_events(
            job.id,
            [NewEvent(4, PROGRESS, {"p": 0.2}), NewEvent(5, "output", {"index": 0})],
            holder="A",
            progress_kind=PROGRESS,
        )
        assert [e.sequence for e in await store.events(job.id)] == [4, 5]
        # Watched from another process: stored once the finding is old, and announced to it.
        watching = await other.announcements(watch=job.id)
        try:
            await asyncio.sleep(0.4)
            await progress(6)
            assert [e.sequence for e in await store.events(job.id)] == [4, 5, 6]
            heard = await asyncio.wait_for(anext(aiter(watching)), 5.0)
            assert (heard.kind, heard.job_id) == ("event", job.id)
            await progress(7)  # watched: asked (and stored) every time
            assert [e.sequence for e in await store.events(job.id)] == [4, 5, 6, 7]
        finally:
            await watching.aclose()
        # Without ``progress_kind`` (a caller that wants every row): stored as before.
        second = make_job(2)
        await store.create(JobRecord(second), holder="A", lease_s=30.0)
        await store.append_events(second.id, [NewEvent(2, PROGRESS, {})], holder="A")
        assert [e.sequence for e in await store.events(second.id)] == [2]
        await own.aclose()
    finally:
        await backend.close()
