"""The job store's and the artifact index's connections on PostgreSQL: lent by a shelf
(``jobs/store/pg_shelf.py``) instead of acquired from asyncpg's pool per statement."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from aiserver.artifacts.index import NewRef, PostgresArtifactIndex
from aiserver.jobs.model import JobState
from aiserver.jobs.store import JobRecord
from aiserver.jobs.store.postgres import PostgresJobStore
from tests.storage.backends import PG_URL, JobStoreBackend
from tests.storage.test_job_store import make_job


@pytest.fixture
async def pg(tmp_path: Path) -> Any:
    found = JobStoreBackend("postgres", tmp_path)
    try:
        yield found
    finally:
        await found.close()


def _pool_of(lender: Any) -> asyncpg.Pool:
    return lender if isinstance(lender, asyncpg.Pool) else lender.pool


def _count_acquires(monkeypatch: pytest.MonkeyPatch, pool: asyncpg.Pool) -> list[int]:
    """How many times ``pool`` is asked for a connection from now on."""
    counted = [0]
    acquire = asyncpg.Pool.acquire

    def counting(self: asyncpg.Pool, *args: Any, **kwargs: Any) -> Any:
        counted[0] += self is pool
        return acquire(self, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Pool, "acquire", counting)
    return counted


async def test_statements_borrow_a_connection_without_the_pools_acquire(
    pg: JobStoreBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncpg's acquire and release per statement cost a coordinator about as much CPU as
    the statement's round trip (bench/README.md, "pgfeed"): one statement after another
    takes the pool's connection once."""
    store = await pg.open()
    assert isinstance(store, PostgresJobStore)
    job = make_job(1)
    await store.create(JobRecord(job))
    acquires = _count_acquires(monkeypatch, _pool_of(store._pool))
    for _ in range(20):
        assert await store.get(job.id) is not None
    job.state = JobState.RUNNING
    await store.save(JobRecord(job))
    assert await store.count_active() == 1
    assert acquires[0] <= 1


async def test_more_statements_at_once_than_connections_all_answer(pg: JobStoreBackend) -> None:
    store = await pg.open()  # a pool of 4
    assert isinstance(store, PostgresJobStore)
    jobs = [make_job(i) for i in range(3)]
    for job in jobs:
        await store.create(JobRecord(job))
    for _ in range(3):
        found = await asyncio.wait_for(
            asyncio.gather(*(store.get(jobs[i % 3].id) for i in range(40))), 30
        )
        assert all(r is not None for r in found)
        # A transaction (a claim of a slot) among them too.
        got = await asyncio.wait_for(
            asyncio.gather(
                *(store.count_active() for _ in range(10)),
                store.claim("A", 30),
                *(store.queue_position(j.id) for j in jobs),
            ),
            30,
        )
        assert got[:10] == [3] * 10


async def test_a_connection_lost_while_shelved_is_replaced(pg: JobStoreBackend) -> None:
    """The server ends an idle connection (a restart, an admin): the next statement gets
    another connection, not the dead one's error."""
    store = await pg.open()
    assert isinstance(store, PostgresJobStore)
    job = make_job(1)
    await store.create(JobRecord(job))
    pids = await asyncio.gather(
        *(store._fetchval("SELECT pg_backend_pid() FROM pg_sleep(0.05)") for _ in range(3))
    )
    admin = await asyncpg.connect(PG_URL)
    try:
        for pid in set(pids):
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    await asyncio.sleep(0.2)  # the terminations reach the clients
    for _ in range(5):
        assert await store.get(job.id) is not None


async def test_a_failed_statement_or_transaction_leaves_a_usable_store(pg: JobStoreBackend) -> None:
    store = await pg.open()
    assert isinstance(store, PostgresJobStore)
    job = make_job(1)
    await store.create(JobRecord(job))
    for _ in range(6):  # more than the pool's connections
        with pytest.raises(asyncpg.PostgresError):
            await store._fetchval("SELECT no_such_column FROM jobs")
        with pytest.raises(ZeroDivisionError):
            async with store._pool.acquire() as conn, conn.transaction():
                await conn.execute("UPDATE jobs SET tag = 'rolled back' WHERE id = $1", job.id)
                raise ZeroDivisionError
    found = await store.get(job.id)
    assert found is not None and found.job.tag != "rolled back"
    # A block that leaves its transaction open does not lend it to the next statement.
    async with store._pool.acquire() as conn:
        await conn.execute("BEGIN")
        await conn.execute("UPDATE jobs SET tag = 'left open' WHERE id = $1", job.id)
    found = await store.get(job.id)
    assert found is not None and found.job.tag != "left open"


async def test_the_artifact_index_borrows_from_its_shelf_too(
    pg: JobStoreBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    await pg.open()  # migrates the schema
    index = await PostgresArtifactIndex.open(PG_URL, schema=pg.schema)
    try:
        shelf = await index._connect()
        acquires = _count_acquires(monkeypatch, _pool_of(shelf))
        for n in range(5):
            sha = f"{n:064x}"
            ref = NewRef(
                f"{sha[:2]}/{sha}.png", sha, "image/png", 10, 1, 1, 1.0, "alice",
                f"job{n}", "a.png", None, "test",
            )  # fmt: skip
            await index.register(ref)
            assert await index.lookup(ref.path, "alice") is not None
        assert acquires[0] <= 1
    finally:
        await index.close()
