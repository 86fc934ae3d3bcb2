"""The SQLite job store's thread: writes on the loop, scans and checkpoints in the thread."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from aiserver.jobs.model import ArtifactRef, JobState
from aiserver.jobs.store import JobQuery, JobRecord, SqliteJobStore
from aiserver.jobs.store.sqlite import _transaction
from aiserver.jobs.store.write_turn import WriteTurn
from tests.storage.test_job_store import T0, make_job


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteJobStore]:
    opened = await SqliteJobStore.open(tmp_path / "jobs.sqlite3")
    try:
        yield opened
    finally:
        await opened.close()


def _hold_thread(store: SqliteJobStore) -> threading.Event:
    """Keep the store's thread busy until the returned event is set (as a long scan or a
    checkpoint on a large WAL would)."""
    gate = threading.Event()
    store._executor.submit(gate.wait, 10)  # the store's one thread
    return gate


def _output(sha: str) -> ArtifactRef:
    name = f"2025/05/01/{sha}.png"
    return ArtifactRef(
        f"artifacts/{name}", f"/artifacts/{name}", "out.png", "image/png",
        8, 8, 100, sha, None, "comfy", T0, "",
    )  # fmt: skip


async def test_writes_do_not_wait_for_a_scan_in_the_thread(store: SqliteJobStore) -> None:
    first = JobRecord(make_job(1))
    await store.create(first)
    gate = _hold_thread(store)
    try:
        listing = asyncio.create_task(store.query(JobQuery(), page_size=10, page_token=""))
        await asyncio.sleep(0)  # the listing is handed to the thread, behind the gate
        # Neither the create nor the save waits for the listing: they run on the loop.
        second = JobRecord(make_job(2))
        made = asyncio.create_task(store.create(second))
        first.job.state = JobState.RUNNING
        saved = asyncio.create_task(store.save(first))
        done, _ = await asyncio.wait({made, saved}, timeout=5)
        assert done == {made, saved}
        assert not listing.done()
    finally:
        gate.set()
    jobs, _ = await listing
    # The listing was issued after the first create: it sees that job, and here also
    # the writes issued after it (they were on disk before it ran).
    assert {j.id for j in jobs} == {first.job.id, second.job.id}
    stored = await store.get(first.job.id)
    assert stored is not None and stored.job.state is JobState.RUNNING


async def test_writes_issued_after_a_write_in_the_thread_follow_it(
    store: SqliteJobStore,
) -> None:
    record = JobRecord(make_job(1))
    old, new = "a" * 64, "b" * 64
    record.job.outputs = [_output(old)]
    await store.create(record)
    await store.save(record)
    gate = _hold_thread(store)
    try:
        forgetting = asyncio.create_task(store.forget_outputs({old, new}))
        await asyncio.sleep(0)  # queued in the thread, on the writing connection
        # Issued after the forget: it must land after it (else the forget would drop
        # the output this save adds).
        record.job.outputs = [_output(new)]
        saved = asyncio.create_task(store.save(record))
        await asyncio.sleep(0.05)
        assert not saved.done()  # waits its turn behind the forget
    finally:
        gate.set()
    assert await forgetting == 1
    await saved
    stored = await store.get(record.job.id)
    assert stored is not None and [o.sha256 for o in stored.job.outputs] == [new]


async def test_the_wal_starts_over_under_steady_writes(
    store: SqliteJobStore, tmp_path: Path
) -> None:
    # Checkpoints run beside the writes; one that a write overtakes copies only part of the
    # WAL, and the file only starts over after one that copied it all. Each job's create
    # and save add ~20 KB to it: 1,600 jobs are ~32 MB without a full checkpoint.
    async def writer(first: int) -> None:
        for n in range(first, 1600, 16):
            record = JobRecord(make_job(n))
            await store.create(record)
            await asyncio.sleep(0)
            record.job.state = JobState.RUNNING
            await store.save(record)

    await asyncio.gather(*(writer(i) for i in range(16)))
    wal = tmp_path / "jobs.sqlite3-wal"
    assert wal.stat().st_size < 12_000_000


async def test_a_cancelled_write_in_the_thread_keeps_the_turn_until_the_thread_is_done(
    store: SqliteJobStore,
) -> None:
    # A caller that stops waiting for a write in the thread (cancelled at shutdown, say)
    # must not let the next write run on the loop inside that thread's open transaction.
    record = JobRecord(make_job(1))
    await store.create(record)
    entered, gate = threading.Event(), threading.Event()
    conn = store._conn

    def long_write() -> None:
        with _transaction(conn):
            conn.execute("UPDATE jobs SET tag = 'slow' WHERE id = ?", (record.job.id,))
            entered.set()
            gate.wait(10)

    writing = asyncio.create_task(store._call(long_write))
    try:
        assert await asyncio.to_thread(entered.wait, 5)
        writing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writing
        record.job.state = JobState.RUNNING
        saved = asyncio.create_task(store.save(record))
        await asyncio.sleep(0.05)
        assert not saved.done()  # its turn comes when the thread has committed
    finally:
        gate.set()
    await asyncio.wait_for(saved, 5)
    stored = await store.get(record.job.id)
    assert stored is not None and stored.job.state is JobState.RUNNING


async def test_a_scan_sees_the_writes_issued_before_it_that_waited_for_their_turn(
    store: SqliteJobStore,
) -> None:
    gate = _hold_thread(store)
    try:
        forgetting = asyncio.create_task(store.forget_outputs({"a" * 64}))  # holds the turn
        await asyncio.sleep(0)
        second = JobRecord(make_job(2))
        made = asyncio.create_task(store.create(second))  # waits for its turn on the loop
        await asyncio.sleep(0)
        listing = asyncio.create_task(store.query(JobQuery(), page_size=10, page_token=""))
        await asyncio.sleep(0.05)
    finally:
        gate.set()
    await forgetting
    await made
    jobs, _ = await listing
    assert second.job.id in {j.id for j in jobs}


async def test_writes_queued_behind_the_thread_run_when_it_gives_the_turn_back(
    store: SqliteJobStore,
) -> None:
    # Handed on one waiter per loop iteration (an asyncio.Lock), the queued writes kept every
    # write after them waiting too: at 16 callers most writes waited a wake-up for their turn.
    gate = _hold_thread(store)
    try:
        forgetting = asyncio.create_task(store.forget_outputs({"a" * 64}))  # holds the turn
        await asyncio.sleep(0)
        queued = [asyncio.create_task(store.create(JobRecord(make_job(n)))) for n in range(2, 8)]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in queued)
    finally:
        gate.set()
    await queued[0]
    # The thread gave the turn back and the queued writes ran with it: a write now runs in
    # its caller's step, not behind the others' wake-ups.
    late = store.create(JobRecord(make_job(9)))
    with pytest.raises(StopIteration):
        late.send(None)
    assert all(not made[1] for made in await asyncio.gather(*queued))
    await forgetting
    jobs, _ = await store.query(JobQuery(), page_size=10, page_token="")
    assert len(jobs) == 7


async def test_a_write_cancelled_while_it_waits_for_its_turn_never_runs(
    store: SqliteJobStore,
) -> None:
    gate = _hold_thread(store)
    try:
        forgetting = asyncio.create_task(store.forget_outputs({"a" * 64}))
        await asyncio.sleep(0)
        dropped = asyncio.create_task(store.create(JobRecord(make_job(2))))
        third = make_job(3)
        kept = asyncio.create_task(store.create(JobRecord(third)))
        await asyncio.sleep(0.05)
        dropped.cancel()
        await asyncio.sleep(0)
    finally:
        gate.set()
    await forgetting
    await kept
    with pytest.raises(asyncio.CancelledError):
        await dropped
    jobs, _ = await store.query(JobQuery(), page_size=10, page_token="")
    assert [j.id for j in jobs] == [third.id]


_caller: contextvars.ContextVar[str] = contextvars.ContextVar("_caller", default="nobody")


class _Abandon(BaseException):
    """Not an ``Exception`` (as ``CancelledError`` or ``GeneratorExit`` are not)."""


async def test_queued_writes_run_in_their_callers_context_and_their_errors_are_theirs() -> None:
    # The thread gives the turn back in a callback of its own: the queued writes run in their
    # callers' contexts, and one that raises a BaseException does not stall the rest.
    with ThreadPoolExecutor(1) as executor:
        turn = WriteTurn(executor)
        gate = threading.Event()
        seen: list[str] = []

        async def write(name: str, fail: bool = False) -> None:
            _caller.set(name)  # e.g. the job id the log lines name

            def run() -> None:
                seen.append(_caller.get())
                if fail:
                    raise _Abandon(name)

            await turn.inline(run)

        holding = asyncio.create_task(turn.in_thread(lambda: gate.wait(10)))
        await asyncio.sleep(0)
        try:
            first = asyncio.create_task(write("first"))
            failing = asyncio.create_task(write("failing", fail=True))
            last = asyncio.create_task(write("last"))
            await asyncio.sleep(0)
            assert turn.busy() and not seen
        finally:
            gate.set()
        await asyncio.wait_for(holding, 5)
        await asyncio.wait_for(first, 5)
        with pytest.raises(_Abandon):
            await asyncio.wait_for(failing, 5)
        await asyncio.wait_for(last, 5)  # the queue went on past it
        assert seen == ["first", "failing", "last"] and not turn.busy()


async def test_a_thread_write_whose_executor_dropped_it_gives_the_turn_on() -> None:
    # An executor shut down with cancel_futures cancels a write before its thread ran it:
    # its caller is cancelled and the writes queued behind it still run.
    executor = ThreadPoolExecutor(1)
    turn = WriteTurn(executor)
    gate = threading.Event()
    busy = executor.submit(gate.wait, 10)  # the executor's only thread is busy
    dropped = asyncio.create_task(turn.in_thread(lambda: "never"))
    await asyncio.sleep(0)
    behind = asyncio.create_task(turn.inline(lambda: "ran"))
    await asyncio.sleep(0)
    executor.shutdown(wait=False, cancel_futures=True)
    gate.set()
    busy.result(5)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(dropped, 5)
    assert await asyncio.wait_for(behind, 5) == "ran"
    assert not turn.busy()
