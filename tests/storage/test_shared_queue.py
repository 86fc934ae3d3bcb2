"""One queue across processes, on every backend: ranks among every queued job, and work
stealing (an idle process takes a queued job a live one holds, exactly once)."""

from __future__ import annotations

import asyncio

from aiserver.jobs.model import JobState
from aiserver.jobs.store import JobRecord, LeaseLost
from aiserver.tasks import TaskKind
from tests.storage.backends import JobStoreBackend
from tests.storage.test_job_store import make_job

ALL = tuple(TaskKind)


async def test_ranks_place_each_holders_jobs_among_every_queued_job(
    backend: JobStoreBackend,
) -> None:
    a, b = await backend.open(), await backend.open()
    jobs = [make_job(i) for i in range(6)]
    jobs[2].state = JobState.RUNNING
    for job in jobs:
        await a.create(JobRecord(job))
    for i, job in enumerate(jobs):
        store, name = (a, "A") if i % 2 == 0 else (b, "B")
        assert await store.claim(name, 30, job_id=job.id) is not None
    ranks = await a.queue_ranks(holder="A")
    # Queued, oldest first: 0 (A), 1 (B), 3 (B), 4 (A), 5 (B); 2 runs.
    assert ranks.positions == {jobs[0].id: 1, jobs[4].id: 4}
    assert ranks.queued == 5
    asked = await b.queue_ranks(job_ids=[jobs[5].id, jobs[2].id, "missing"])
    assert asked.positions == {jobs[5].id: 5}
    both = await b.queue_ranks(holder="B", job_ids=[jobs[0].id])
    assert both.positions == {jobs[0].id: 1, jobs[1].id: 2, jobs[3].id: 3, jobs[5].id: 5}
    jobs[0].state = JobState.RUNNING
    await a.save(JobRecord(jobs[0]))
    after = await b.queue_ranks(holder="B")
    assert after.positions == {jobs[1].id: 1, jobs[3].id: 2, jobs[5].id: 4}
    assert after.queued == 4
    assert (await a.queue_ranks(holder="nobody")).positions == {}


async def test_stealable_is_the_oldest_waiting_work_of_other_live_holders(
    backend: JobStoreBackend,
) -> None:
    store = await backend.open()
    old, text, mine, cancelled, running = (
        make_job(1),
        make_job(2, task=TaskKind.IMAGE_TO_TEXT),
        make_job(3),
        make_job(4),
        make_job(5, state=JobState.RUNNING),
    )
    unheld = make_job(6)
    for job in (old, text, mine, cancelled, running, unheld):
        await store.create(JobRecord(job))
    for job in (old, text, cancelled, running):
        assert await store.claim("A", 30, job_id=job.id) is not None
    assert await store.claim("B", 30, job_id=mine.id) is not None
    await store.request_cancel(cancelled.id)
    found = await store.stealable("B", waited_s=1.0, tasks=ALL, limit=10)
    assert [(r.job.id, holder) for r, holder in found] == [(old.id, "A"), (text.id, "A")]
    assert found[0][0].job.spec == old.spec  # whole records: the taker checks it can run it
    only_text = await store.stealable("B", waited_s=1.0, tasks=[TaskKind.IMAGE_TO_TEXT], limit=9)
    assert [r.job.id for r, _ in only_text] == [text.id]
    assert len(await store.stealable("B", waited_s=1.0, tasks=ALL, limit=1)) == 1
    # Saved just now: its holder may be about to start it.
    old.updated = old.updated.now(old.updated.tzinfo)
    await store.save(JobRecord(old), holder="A")
    fresh = await store.stealable("B", waited_s=60.0, tasks=ALL, limit=10)
    assert [r.job.id for r, _ in fresh] == [text.id]


async def test_a_stealable_job_of_a_dead_holder_is_left_to_adoption(
    backend: JobStoreBackend,
) -> None:
    store = await backend.open()
    job = make_job(1)
    await store.create(JobRecord(job))
    assert await store.claim("A", 0.05, job_id=job.id) is not None
    await asyncio.sleep(0.1)
    assert await store.stealable("B", waited_s=0.0, tasks=ALL, limit=10) == []


async def test_steal_moves_the_lease_once_and_fences_the_old_holder(
    backend: JobStoreBackend,
) -> None:
    a, b = await backend.open(), await backend.open()
    job = make_job(1)
    await a.create(JobRecord(job))
    assert await a.claim("A", 30, job_id=job.id) is not None
    stolen = await asyncio.gather(
        b.steal(job.id, "B", 30, from_holder="A"), a.steal(job.id, "C", 30, from_holder="A")
    )
    winners = [lease for lease in stolen if lease is not None]
    assert len(winners) == 1 and not winners[0].takeover
    winner = winners[0].holder
    job.state = JobState.RUNNING
    try:
        await a.save(JobRecord(job), holder="A")
        raise AssertionError("the old holder's dispatch must be refused")
    except LeaseLost:
        pass
    assert await a.renew(job.id, "A", 30) is None
    await b.save(JobRecord(job), holder=winner)  # the new holder starts it
    assert await b.steal(job.id, "D", 30, from_holder=winner) is None  # running: not stealable


async def test_a_started_or_cancelled_job_is_not_stolen(backend: JobStoreBackend) -> None:
    store = await backend.open()
    started, cancelled = make_job(1), make_job(2)
    for job in (started, cancelled):
        await store.create(JobRecord(job))
        assert await store.claim("A", 30, job_id=job.id) is not None
    started.state = JobState.RUNNING
    await store.save(JobRecord(started), holder="A")
    await store.request_cancel(cancelled.id)
    assert await store.steal(started.id, "B", 30, from_holder="A") is None
    assert await store.steal(cancelled.id, "B", 30, from_holder="A") is None
    assert await store.steal(cancelled.id, "B", 30, from_holder="X") is None


async def test_events_with_a_holder_are_stored_only_while_it_holds_the_job(
    backend: JobStoreBackend,
) -> None:
    from aiserver.jobs.store import NewEvent

    store = await backend.open()
    job = make_job(1)
    await store.create(JobRecord(job), holder="A", lease_s=30.0)
    await store.append_events(job.id, [NewEvent(2, "progress", {})], holder="A")
    assert await store.steal(job.id, "B", 30, from_holder="A") is not None
    await store.append_events(job.id, [NewEvent(3, "progress", {})], holder="A")  # stale
    await store.append_events(job.id, [NewEvent(3, "output", {})], holder="B")
    await store.append_events(job.id, [NewEvent(4, "progress", {})])  # no holder: no fence
    assert [(e.sequence, e.kind) for e in await store.events(job.id)] == [
        (2, "progress"),
        (3, "output"),
        (4, "progress"),
    ]
