"""What a job's writes cost PostgreSQL: saves that keep a job unfinished are HOT updates
(no index entry written), storing an event does not lock its job's row (no foreign key
check), and the hot statements read rows by index on a table that grew after their plans
were cached (migration 5, ``PLANNER_SETTINGS``), planned once per connection
(``GENERIC_PLANS``)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from aiserver.artifacts.index import NewRef, PostgresArtifactIndex
from aiserver.jobs.model import JobState
from aiserver.jobs.store import JobRecord, NewEvent
from aiserver.jobs.store.pg_shelf import ConnectionShelf
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
                await asyncio.wait_for(
                    store.append_events(job.id, [NewEvent(2, "progress", {"p": 0.5})]), 5.0
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
    finally:
        await backend.close()


async def _plans(shelf: ConnectionShelf) -> dict[str, tuple[int, int]]:
    """(generic, custom) plans of each statement prepared on the shelf's next connection
    (calls one after another take the one last given back)."""
    async with shelf.acquire() as conn:
        found = await conn.fetch(
            "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements"
        )
    return {r[0]: (int(r[1]), int(r[2])) for r in found}


async def test_statements_are_planned_once_per_connection(tmp_path: Path) -> None:
    # By default a prepared statement is planned with its values at each of its first 5
    # runs (and at every run while that looks cheaper): a fifth of the backends' CPU per job.
    backend = JobStoreBackend("postgres", tmp_path)
    try:
        store = await backend.open()
        assert isinstance(store, PostgresJobStore)
        job = make_job(1)
        await store.create(JobRecord(job), holder="h", lease_s=30.0)
        for n in range(8):
            job.progress = n / 10
            await store.save(JobRecord(job), holder="h")
            assert await store.get(job.id) is not None
        plans = await _plans(store._pool)
        get = next(p for sql, p in plans.items() if sql.endswith("FROM jobs WHERE id = $1"))
        assert get == (8, 0), plans
        assert all(custom == 0 for _, custom in plans.values()), plans

        index = await PostgresArtifactIndex.open(PG_URL, schema=backend.schema)
        try:
            sha = "ab" * 32
            ref = NewRef(
                f"ab/{sha}.png", sha, "image/png", 10, 1, 1, 1.0, "alice", job.id, "a.png",
                None, "test",
            )  # fmt: skip
            await index.register(ref)
            for _ in range(8):
                assert await index.lookup(ref.path, "alice") is not None
            shelf = await index._connect()
            plans = await _plans(shelf)
            async with shelf.acquire() as conn:  # its tables grow under cached plans too
                assert await conn.fetchval("SHOW enable_seqscan") == "off"
            assert any(generic >= 8 for generic, _ in plans.values()), plans
            assert all(custom == 0 for _, custom in plans.values()), plans
        finally:
            await index.close()
    finally:
        await backend.close()


async def test_a_group_save_carries_only_the_parts_its_saves_have(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each data-modifying part of a statement costs the backend its set-up even when it
    # writes nothing: a group without events, prunes or outbox rows sends none of them.
    backend = JobStoreBackend("postgres", tmp_path)
    try:
        store = await backend.open()
        assert isinstance(store, PostgresJobStore)
        jobs = [make_job(n) for n in range(10)]
        for job in jobs:
            await store.create(JobRecord(job), holder="h", lease_s=30.0)
        await store.append_events(
            jobs[6].id, [NewEvent(2, "progress", {}), NewEvent(3, "progress", {})], holder="h"
        )
        groups: list[str] = []
        fetch = store._pool.fetch

        async def recorded(sql: str, *args: object, timeout_s: float | None = None) -> object:
            if sql.startswith("WITH v AS MATERIALIZED (SELECT * FROM unnest($1::text[]"):
                groups.append(sql)
            return await fetch(sql, *args, timeout_s=timeout_s)

        monkeypatch.setattr(store._pool, "fetch", recorded)

        def save(n: int, **parts: object) -> Any:
            jobs[n].progress = 0.5
            return store.save(JobRecord(jobs[n]), holder="h", **parts)  # type: ignore[arg-type]

        await asyncio.gather(*(save(n) for n in range(5)))  # the first alone, then a group
        assert groups, "no group formed"
        assert not any(p in sql for sql in groups for p in ("stored", "pruned", "queued"))
        groups.clear()
        done = [("https://example.test/h", b"done")]
        await asyncio.gather(
            save(7),
            save(5, outbox=done),
            save(6, events=[NewEvent(4, "finished", {})], prune="progress"),
            save(8, events=[NewEvent(2, "output", {})]),
            save(9, events=[NewEvent(2, "output", {})], outbox=done),
        )
        assert groups, "no group formed"
        for job in jobs:
            found = await store.get(job.id)
            assert found is not None and found.job.progress == 0.5
        queued = await store.outbox_claim("h", 30, 10)
        assert sorted(item.job_id for item in queued) == sorted([jobs[5].id, jobs[9].id])
        assert [e.sequence for e in await store.events(jobs[6].id)] == [3, 4]
        assert [e.kind for e in await store.events(jobs[8].id)] == ["output"]
        assert [e.kind for e in await store.events(jobs[9].id)] == ["output"]
    finally:
        await backend.close()


async def test_claiming_a_named_job_reads_it_by_its_key_under_a_generic_plan(
    tmp_path: Path,
) -> None:
    # A generic plan cannot drop an "$n IS NULL OR id = $n" branch: the named claim (a
    # takeover, a resume) walked every queued job in created order before finding its own.
    backend = JobStoreBackend("postgres", tmp_path)
    try:
        store = await backend.open()
        assert isinstance(store, PostgresJobStore)
        jobs = [make_job(n) for n in range(300)]  # a queue deep enough to walk
        for job in jobs:
            await store.create(JobRecord(job))
        sent: list[str] = []
        fetchrow = store._fetchrow

        async def recorded(sql: str, *args: Any) -> Any:
            sent.append(sql)
            return await fetchrow(sql, *args)

        store._fetchrow = recorded  # type: ignore[method-assign]
        last = jobs[-1].id
        lease = await store.claim("h", 30.0, job_id=last)
        assert lease is not None and lease.job_id == last
        (sql,) = [s for s in sent if "FOR UPDATE SKIP LOCKED" in s]
        async with store._pool.acquire() as conn, conn.transaction():
            assert await conn.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
            await conn.execute(f"PREPARE named_claim AS {sql}")
            plan = "\n".join(
                r[0]
                for r in await conn.fetch(
                    f"EXPLAIN EXECUTE named_claim('h2', 1, '{{}}'::text[], '{last}')"
                )
            )
            await conn.execute("DEALLOCATE named_claim")
        scan = plan.split("CTE next")[1].split("Nested Loop")[0]
        assert "jobs_pkey" in scan, plan
    finally:
        await backend.close()
