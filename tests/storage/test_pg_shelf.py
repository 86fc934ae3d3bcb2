"""The job store's and the artifact index's connections on PostgreSQL: lent by a shelf
(``jobs/store/pg_shelf.py``) instead of acquired from asyncpg's pool per statement."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from aiserver.artifacts.index import NewRef, PostgresArtifactIndex
from aiserver.jobs.model import JobState
from aiserver.jobs.store import JobRecord, pg_shelf
from aiserver.jobs.store.pg_shelf import ConnectionShelf
from aiserver.jobs.store.postgres import PostgresJobStore
from aiserver.outage import backend_outage
from tests.storage.backends import PG_URL, JobStoreBackend
from tests.storage.test_job_store import make_job


@pytest.fixture
async def pg(tmp_path: Path) -> Any:
    found = JobStoreBackend("postgres", tmp_path)
    try:
        yield found
    finally:
        await found.close()


async def _until(done: Callable[[], bool], bound_s: float = 10.0) -> None:
    async with asyncio.timeout(bound_s):
        while not done():
            await asyncio.sleep(0.01)


@pytest.fixture
async def shelf_of() -> AsyncIterator[Callable[..., Any]]:
    """A shelf on a pool of its own (``create_pool`` options as given), closed afterwards."""
    shelves: list[ConnectionShelf] = []

    async def make(**options: Any) -> ConnectionShelf:
        pool = await asyncpg.create_pool(PG_URL, **{"min_size": 1, **options})
        shelves.append(ConnectionShelf(pool))
        return shelves[-1]

    try:
        yield make
    finally:
        for shelf in shelves:
            await asyncio.wait_for(shelf.close(), 30)


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
    shelf = store._pool
    await _until(
        lambda: not any(pg_shelf._usable(c) for c, _, _ in shelf._idle)
    )  # the ends reached us
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


async def _hand_over_then(
    shelf: ConnectionShelf, between: Callable[[Any, asyncio.Task[Any]], Any]
) -> asyncio.Task[Any]:
    """One connection (a pool of 1) lent; a second caller queues for it; the first gives it
    back (handing it to the second, which has not run yet), then ``between(conn, second)``."""
    held, go = asyncio.Event(), asyncio.Event()
    second: asyncio.Task[Any] | None = None

    async def first() -> None:
        async with shelf.acquire() as conn:
            await conn.fetchval("SELECT 1")
            raw = conn._con
            held.set()
            await go.wait()
        assert second is not None and not second.done()
        between(raw, second)

    task = asyncio.create_task(first())
    await held.wait()
    second = asyncio.create_task(shelf.fetchval("SELECT 2"))
    await _until(lambda: len(shelf._waiters) == 1)
    go.set()
    await task
    return second


async def test_a_connection_that_dies_as_it_is_handed_over_is_replaced(
    shelf_of: Callable[..., Any],
) -> None:
    """The server ends the connection between its hand-over to a queued caller and that
    caller running: the caller gets a new connection, not "released back to the pool"."""
    shelf = await shelf_of(max_size=1)
    second = await _hand_over_then(shelf, lambda raw, _: raw.terminate())
    assert await asyncio.wait_for(second, 10) == 2
    assert await shelf.fetchval("SELECT 3") == 3
    assert shelf._out == 1


async def test_close_does_not_hang_on_a_connection_handed_to_a_cancelled_caller(
    shelf_of: Callable[..., Any],
) -> None:
    """A shutdown cancels the request tasks, then closes the store, in one step: the
    connection handed to a cancelled caller goes back to the pool, which then closes."""
    shelf = await shelf_of(max_size=1)
    second = await _hand_over_then(shelf, lambda _, second: second.cancel())
    async with asyncio.timeout(5):
        await shelf.close(timeout_s=60)  # returns at once, not by its bound
    assert second.cancelled()
    assert shelf.pool._closed and shelf._out == 0


async def test_close_turns_away_queued_callers_as_an_outage(shelf_of: Callable[..., Any]) -> None:
    shelf = await shelf_of(max_size=2)
    running = [asyncio.create_task(shelf.fetchval("SELECT 7 FROM pg_sleep(0.3)")) for _ in range(2)]
    await _until(lambda: shelf._out == 2)
    queued = [asyncio.create_task(shelf.fetchval("SELECT 1")) for _ in range(4)]
    await _until(lambda: len(shelf._waiters) == 4)
    async with asyncio.timeout(10):
        await shelf.close()
    assert await asyncio.gather(*running) == [7, 7]  # those lent finish
    for outcome in await asyncio.gather(*queued, return_exceptions=True):
        assert isinstance(outcome, asyncpg.InterfaceError) and backend_outage(outcome)
    with pytest.raises(asyncpg.InterfaceError) as raised:
        await shelf.fetchval("SELECT 1")
    assert backend_outage(raised.value) is not None


async def test_close_is_bounded_by_a_connection_still_lent(shelf_of: Callable[..., Any]) -> None:
    shelf = await shelf_of(max_size=1)
    stuck = asyncio.create_task(shelf.fetchval("SELECT pg_sleep(30)"))
    await _until(lambda: shelf._out == 1)
    async with asyncio.timeout(10):
        await shelf.close(timeout_s=0.5)
    with pytest.raises(Exception) as raised:
        await stuck  # the pool terminated it
    assert backend_outage(raised.value) is not None


async def test_cancelled_callers_queued_or_running_leave_the_shelf_whole(
    shelf_of: Callable[..., Any],
) -> None:
    shelf = await shelf_of(max_size=2)
    running = [asyncio.create_task(shelf.fetchval("SELECT pg_sleep(5)")) for _ in range(2)]
    await _until(lambda: shelf._out == 2)
    queued = [asyncio.create_task(shelf.fetchval("SELECT 1")) for _ in range(3)]
    await _until(lambda: len(shelf._waiters) == 3)
    queued[1].cancel()  # one in line
    running[0].cancel()  # one mid-statement: its connection goes back to the pool
    results = await asyncio.wait_for(
        asyncio.gather(queued[0], queued[2], return_exceptions=True), 10
    )
    assert results == [1, 1]
    running[1].cancel()
    await asyncio.gather(*running, queued[1], return_exceptions=True)
    assert not shelf._waiters
    # Both connections still there: two statements at once both answer.
    got = await asyncio.wait_for(
        asyncio.gather(
            *(shelf.fetchval("SELECT pg_backend_pid() FROM pg_sleep(0.1)") for _ in range(2))
        ),
        10,
    )
    assert len(set(got)) == 2 and shelf._out == 2


async def test_a_connection_goes_back_to_the_pool_after_its_statements(
    shelf_of: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After ``RECYCLE_AFTER`` statements, as the pool's ``max_queries``: the pool closes it
    and the shelf takes a new one."""
    monkeypatch.setattr(pg_shelf, "RECYCLE_AFTER", 3)
    shelf = await shelf_of(max_size=1, max_queries=3)
    pids = [await shelf.fetchval("SELECT pg_backend_pid()") for _ in range(9)]
    assert len(set(pids)) == 3 and pids[:3] == [pids[0]] * 3


async def test_a_connection_idle_on_the_shelf_is_closed_as_the_pool_would(
    shelf_of: Callable[..., Any],
) -> None:
    """The pool's ``max_inactive_connection_lifetime``: unused that long, a connection goes
    back to the pool, which closes it after that long again unless needed."""
    name = "shelf-idle-" + uuid.uuid4().hex[:8]
    shelf = await shelf_of(
        min_size=0,  # else the pool keeps one open
        max_size=2,
        max_inactive_connection_lifetime=0.2,
        server_settings={"application_name": name},
    )
    await asyncio.gather(*(shelf.fetchval("SELECT pg_sleep(0.05)") for _ in range(2)))
    admin = await asyncpg.connect(PG_URL)
    try:
        sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
        assert await admin.fetchval(sql, name) == 2
        async with asyncio.timeout(10):
            while await admin.fetchval(sql, name) > 0:
                await asyncio.sleep(0.05)
    finally:
        await admin.close()
    assert not shelf._idle and shelf._out == 0
    assert await shelf.fetchval("SELECT 5") == 5  # a new one when needed


async def test_statements_while_the_server_ends_their_connections_fail_only_as_outages(
    pg: JobStoreBackend,
) -> None:
    """An admin (or a restart) ends the store's connections again and again under load:
    every error a caller meets is an outage (UNAVAILABLE for a gRPC client), none a bug
    (INTERNAL), and the store serves afterwards."""
    store = await pg.open()
    assert isinstance(store, PostgresJobStore)
    job = make_job(1)
    await store.create(JobRecord(job))
    pool = store._pool.pool
    errors: list[BaseException] = []
    stop = asyncio.Event()

    async def caller() -> None:
        while not stop.is_set():
            try:
                await store.get(job.id)
            except Exception as exc:
                errors.append(exc)
                await asyncio.sleep(0.01)
            await asyncio.sleep(0)

    callers = [asyncio.create_task(caller()) for _ in range(12)]
    admin = await asyncpg.connect(PG_URL)
    try:
        for n in range(30):
            await asyncio.sleep(0.02 + 0.003 * (n % 10))
            for holder in pool._holders:  # this store's connections only: the server is shared
                if holder._con is not None:
                    pid = holder._con.get_server_pid()
                    await admin.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        stop.set()
        await asyncio.gather(*callers)
        await admin.close()
    assert errors  # the ends were met
    not_outages = [e for e in errors if backend_outage(e) is None]
    assert not not_outages, not_outages[:3]
    assert await store.get(job.id) is not None
