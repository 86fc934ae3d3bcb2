"""Two job managers as two coordinators on one job store (docs/scale-out.md).

Each manager has its own holder id and, on PostgreSQL, its own store (its own pool and
LISTEN connection), so everything between them goes through the database. On SQLite both
share one store object: its announcements are in-process, which is all SQLite serves.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from aiserver.jobs.event_codec import encode_event
from aiserver.jobs.manager import JobManager
from aiserver.jobs.model import (
    Accepted,
    Finished,
    JobEvent,
    JobState,
    OutputStored,
    Progress,
    Stage,
)
from aiserver.jobs.scheduler import SchedulerSettings
from aiserver.jobs.store import JobStore, new_holder_id
from aiserver.jobs.store_watch import StoreWatch
from aiserver.providers.base import ProviderProgress
from tests.jobs.helpers import (
    FAST,
    Env,
    ScriptedProvider,
    collect,
    final_job,
    gated,
    produce_image,
    submit,
    within,
)
from tests.storage.backends import JobStoreBackend


class Pair:
    """Coordinators on one backing store."""

    def __init__(self, backend: JobStoreBackend, env: Env) -> None:
        self.backend = backend
        self.env = env
        self.shared_sqlite: JobStore | None = None
        self.managers: list[JobManager] = []

    async def store(self) -> JobStore:
        if self.backend.kind == "sqlite":
            if self.shared_sqlite is None:
                self.shared_sqlite = await self.backend.open()
            return self.shared_sqlite
        return await self.backend.open()

    async def manager(self, provider: ScriptedProvider, **settings: Any) -> JobManager:
        manager = JobManager(
            await self.store(),
            self.env.spool,
            self.env.artifacts,
            [provider],
            SchedulerSettings(**{**FAST, **settings}),
            holder=new_holder_id(),
            lease_s=1.5,
        )
        self.managers.append(manager)
        await manager.start()
        return manager

    async def close(self) -> None:
        for manager in self.managers:
            await manager.stop(0.1)


@pytest.fixture(params=["sqlite", "postgres"])
async def pair(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Pair]:
    backend = JobStoreBackend(request.param, tmp_path)
    env = Env(tmp_path / "env")
    found = Pair(backend, env)
    try:
        yield found
    finally:
        await found.close()
        await env.artifacts.close()
        await backend.close()


async def test_watch_and_cancel_from_the_other_coordinator(pair: Pair) -> None:
    runner = ScriptedProvider("p1", gated)
    a = await pair.manager(runner)
    b = await pair.manager(_serves_nothing())  # never adopts: the job stays on a
    job = await submit(a, pair.env)
    run = await runner.next_run()
    watch = b.subscribe(job.id)
    assert isinstance(watch, StoreWatch)  # b does not hold it: through the store
    first = await within(anext(watch))
    assert isinstance(first.kind, Accepted)
    assert (await b.get(job.id, "alice")).state is JobState.RUNNING
    cancelled = await within(b.cancel(job.id, "alice"))
    assert cancelled.state is JobState.CANCELLED
    assert run.cancelled
    events = await collect(watch)
    assert isinstance(events[-1].kind, Finished)
    assert events[-1].kind.job.state is JobState.CANCELLED
    sequences = [first.sequence] + [e.sequence for e in events]
    assert sequences == sorted(set(sequences))


async def test_a_watcher_elsewhere_gets_outputs_then_finished(pair: Pair) -> None:
    runner = ScriptedProvider("p1", gated)
    a = await pair.manager(runner)
    b = await pair.manager(_serves_nothing())
    job = await submit(a, pair.env)
    run = await runner.next_run()
    watch = b.subscribe(job.id)
    await within(anext(watch))
    run.release.set()
    events = await collect(watch)
    kinds = [type(e.kind) for e in events]
    assert OutputStored in kinds
    finished = events[-1].kind
    assert isinstance(finished, Finished)
    assert finished.job.state is JobState.SUCCEEDED and len(finished.job.outputs) == 1


async def test_watching_through_the_store_leaves_no_listener_behind(pair: Pair) -> None:
    runner = ScriptedProvider("p1", gated)
    a = await pair.manager(runner)
    b = await pair.manager(_serves_nothing())
    job = await submit(a, pair.env)
    await runner.next_run()
    listeners = b._store._hub._queues  # type: ignore[attr-defined]
    before = len(listeners)
    watch = b.subscribe(job.id)
    await within(anext(watch))
    await watch.aclose()  # a caller that left early
    cancelled = await within(b.cancel(job.id, "alice"))  # waits for Finished via the store
    assert cancelled.state is JobState.CANCELLED
    assert len(listeners) == before


async def test_a_stopped_coordinators_jobs_are_taken_over_without_a_second_run(
    pair: Pair,
) -> None:
    first = ScriptedProvider("p1", gated)
    a = await pair.manager(first, max_running_per_provider=1)
    running = await submit(a, pair.env)
    queued = await submit(a, pair.env)
    run = await first.next_run()
    await run.sink.checkpoint({"agent": "x", "prompt_id": "p-1"})
    await a.stop(0.0)  # running job interrupted: RUNNING with its checkpoint, released
    second = ScriptedProvider("p1")
    b = await pair.manager(second)
    done = [
        await within(final_job(b.subscribe(job_id), 10), 10) for job_id in (running.id, queued.id)
    ]
    assert [j.state for j in done] == [JobState.SUCCEEDED, JobState.SUCCEEDED]
    resumed = next(r for r in second.runs if r.work.job_id == running.id)
    assert resumed.work.resume == {"agent": "x", "prompt_id": "p-1"}  # re-attached
    assert resumed.work.attempt == 1
    assert len(second.runs) == 2


async def test_an_expired_lease_is_taken_over(pair: Pair) -> None:
    a = await pair.manager(ScriptedProvider("p1", gated, online=False))
    job = await submit(a, pair.env)
    await _freeze(a)
    b_provider = ScriptedProvider("p1")
    b = await pair.manager(b_provider)
    final = await within(final_job(b.subscribe(job.id), 10), 10)
    assert final.state is JobState.SUCCEEDED
    assert [r.work.job_id for r in b_provider.runs] == [job.id]


async def test_ref_id_and_active_limit_hold_across_coordinators(pair: Pair) -> None:
    a = await pair.manager(ScriptedProvider("p1", gated), max_active_per_owner=2)
    b = await pair.manager(ScriptedProvider("p1", gated), max_active_per_owner=2)
    one = await submit(a, pair.env, ref_id="r1")
    again = await submit(b, pair.env, ref_id="r1")  # the unique constraint answers
    assert again.id == one.id
    await submit(b, pair.env, ref_id="r2")
    with pytest.raises(Exception) as refused:
        await submit(a, pair.env, ref_id="r3")
    assert getattr(refused.value, "reason", "") == "TOO_MANY_JOBS"


async def test_queue_positions_are_places_among_every_coordinators_jobs(pair: Pair) -> None:
    offline_a = ScriptedProvider("p1", gated, online=False)
    a = await pair.manager(offline_a, max_running_per_provider=1)
    b = await pair.manager(ScriptedProvider("p1", online=False))
    first = await submit(a, pair.env)
    second = await submit(b, pair.env)
    third = await submit(a, pair.env)
    watch_second = b.subscribe(second.id)
    watch_third = a.subscribe(third.id)
    await _position(watch_third, 3)  # behind b's job, though a holds only two
    await _position(watch_second, 2)
    assert [a.queue_position(first.id), b.queue_position(second.id)] == [1, 2]
    # GetJob / ListJobs of a job held elsewhere: one ranking for all of them.
    assert await b.positions([await b.get(first.id, None), await b.get(third.id, None)]) == {
        first.id: 1,
        third.id: 3,
    }
    offline_a.online = True  # a starts its oldest (only): everyone behind it moves up
    await offline_a.next_run()
    await _position(watch_second, 1)
    await _position(watch_third, 2)
    await watch_second.aclose()
    await watch_third.aclose()


async def test_an_idle_coordinator_steals_waiting_work_oldest_first_and_runs_it_once(
    pair: Pair,
) -> None:
    busy = ScriptedProvider("p1", gated)
    a = await pair.manager(busy, max_running_per_provider=1, steal_after_s=0.1)
    jobs = [await submit(a, pair.env) for _ in range(3)]
    running_on_a = await busy.next_run()
    watching = a.subscribe(jobs[1].id)  # a caller on a (SYNC): its stream must go on
    assert isinstance((await within(anext(watching))).kind, Accepted)
    idle = ScriptedProvider("p1", gated)
    b = await pair.manager(idle, max_running_per_provider=1, steal_after_s=0.1)
    first = await idle.next_run()  # b has room for one: the oldest waiting
    assert first.work.job_id == jobs[1].id
    # a forgets it at its next ranking (no longer held by it): its dispatch would have been
    # fenced off anyway.
    await _until(lambda: a.active_count() == 2)
    first.release.set()  # room again on b: the next one
    second = await within(idle.next_run(), 10)
    assert second.work.job_id == jobs[2].id
    await _until(lambda: a.active_count() == 1)
    for run in (running_on_a, second):
        run.release.set()
    events = await collect(watching, 10)
    finished = events[-1].kind
    assert isinstance(finished, Finished) and finished.job.state is JobState.SUCCEEDED
    finals = [await within(final_job(b.subscribe(j.id), 10), 10) for j in jobs]
    assert {f.state for f in finals} == {JobState.SUCCEEDED}
    ran = [r.work.job_id for r in busy.runs + idle.runs]
    assert sorted(ran) == sorted(j.id for j in jobs)  # each exactly once


async def test_cancel_of_a_taken_over_job_withdraws_the_prompt_its_holder_left(
    pair: Pair,
) -> None:
    first = ScriptedProvider("p1", gated)
    a = await pair.manager(first)
    job = await submit(a, pair.env)
    run = await first.next_run()
    await run.sink.checkpoint({"agent": "x", "prompt_id": "p-1"})
    await _freeze(a)  # dies with its prompt on the agent
    second = ScriptedProvider("p1", gated, online=False)
    b = await pair.manager(second)
    cancelled = await within(b.cancel(job.id, "alice"), 10)
    assert cancelled.state is JobState.CANCELLED
    assert second.withdrawn == [{"agent": "x", "prompt_id": "p-1"}]
    assert second.runs == []  # not run again


async def test_cancel_of_a_resumed_run_withdraws_the_prompt_it_followed(pair: Pair) -> None:
    first = ScriptedProvider("p1", gated)
    a = await pair.manager(first)
    job = await submit(a, pair.env)
    run = await first.next_run()
    await run.sink.checkpoint({"agent": "x", "prompt_id": "p-1"})
    await _freeze(a)
    second = ScriptedProvider("p1", gated)
    b = await pair.manager(second)
    resumed = await within(second.next_run(), 10)  # taken over: re-attaching
    assert resumed.work.resume == {"agent": "x", "prompt_id": "p-1"}
    cancelled = await within(b.cancel(job.id, "alice"))
    assert cancelled.state is JobState.CANCELLED and resumed.cancelled
    assert second.withdrawn == [{"agent": "x", "prompt_id": "p-1"}]


async def test_a_taker_numbers_its_events_after_those_the_dead_holder_stored(
    pair: Pair,
) -> None:
    first = ScriptedProvider("p1", gated, online=True)
    a = await pair.manager(first)
    job = await submit(a, pair.env)
    run = await first.next_run()
    await run.sink.checkpoint({"agent": "x", "prompt_id": "p-1"})
    store = a._store
    record = await store.get(job.id)
    assert record is not None
    # Stored past its reservation just before it died (the reservation's save never came).
    beyond = record.last_sequence + 8
    kind, payload = encode_event(Progress(Stage.RUNNING, fraction=0.5))
    for sequence in range(record.last_sequence + 1, beyond + 1):
        await store.append_event(job.id, sequence, kind, payload)
    await _freeze(a)
    second = ScriptedProvider("p1")
    b = await pair.manager(second)
    final = await within(final_job(b.subscribe(job.id), 10), 10)
    assert final.state is JobState.SUCCEEDED
    # Each of the taker's events got a number of its own: none was refused as a duplicate.
    stored = await store.events(job.id)
    assert stored[-1].kind == "finished"
    assert "output" in [e.kind for e in stored if e.sequence > beyond]


async def test_a_tap_sees_the_jobs_every_coordinator_holds(pair: Pair) -> None:
    runner = ScriptedProvider("p1", gated)
    a = await pair.manager(runner)
    b = await pair.manager(_serves_nothing())
    seen: list[tuple[JobEvent, JobState]] = []
    remove = b.tap(lambda event, job: seen.append((event, job.state)))
    job = await submit(a, pair.env)
    run = await runner.next_run()
    run.release.set()
    await _until(lambda: any(isinstance(e.kind, Finished) for e, _ in seen))
    remove()
    assert {e.job_id for e, _ in seen} == {job.id}
    kinds = [type(e.kind) for e, _ in seen]
    assert OutputStored in kinds and kinds[-1] is Finished
    assert seen[-1][1] is JobState.SUCCEEDED
    sequences = [e.sequence for e, _ in seen]
    assert sequences == sorted(set(sequences))


async def test_a_tap_catches_up_with_what_others_wrote_before_they_noticed_it(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Coordinators announce every job's events only once they count a follower of every
    job (within a second or two): what a job wrote meanwhile, unannounced, reaches a tap
    opened then by the feed's one catch-up read. Here A never notices the tap."""
    if pair.backend.kind != "postgres":
        return  # SQLite announces in process
    runner = ScriptedProvider("p1", gated)
    a = await pair.manager(runner)
    b = await pair.manager(_serves_nothing())
    monkeypatch.setattr(a._store, "_others_follow_all", lambda: False)
    seen: list[tuple[JobEvent, JobState]] = []
    remove = b.tap(lambda event, job: seen.append((event, job.state)))
    job = await submit(a, pair.env)
    run = await runner.next_run()
    run.release.set()
    await _until(lambda: any(isinstance(e.kind, Finished) for e, _ in seen))
    remove()
    assert {e.job_id for e, _ in seen} == {job.id}
    assert seen[-1][1] is JobState.SUCCEEDED


async def _position(events: Any, position: int) -> None:
    """Until the stream says the job is at ``position``."""
    async with asyncio.timeout(5):
        async for event in events:
            kind = event.kind
            if isinstance(kind, Accepted | Progress) and kind.queue_position == position:
                return
    raise AssertionError(f"the stream ended before position {position}")


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.02)


async def _freeze(manager: JobManager) -> None:
    """As a process that stopped running (a long pause): no renewals, no adoption."""
    await manager._leases.stop()  # type: ignore[union-attr]
    for task in manager._shared_tasks:
        task.cancel()


def _serves_nothing() -> ScriptedProvider:
    return ScriptedProvider("p1", tasks=())


async def test_no_adoption_pass_takes_a_job_between_its_create_and_its_creators_claim(
    pair: Pair,
) -> None:
    a = await pair.manager(ScriptedProvider("p1", gated))
    b = await pair.manager(ScriptedProvider("p1", gated))
    store = a._store
    create = store.create
    adopted: list[object] = []

    async def create_then_adopt(*args: Any, **kwargs: Any) -> Any:
        found = await create(*args, **kwargs)
        adopted.append(await b._takeover.adopt())  # type: ignore[union-attr]  # b's adoption pass right after the commit
        return found

    store.create = create_then_adopt  # type: ignore[method-assign]
    job = await submit(a, pair.env)
    store.create = create  # type: ignore[method-assign]
    assert adopted == [None]  # leased to its creator in the create itself
    assert a.queue_position(job.id) or job.id in a._active


async def test_a_cancel_on_the_holder_is_stored_before_the_job_ends(pair: Pair) -> None:
    # Should the holder fail to store the end and drop the job, its taker must still cancel
    # it: the request is in the database before the holder answers CANCELLED.
    runner = ScriptedProvider("p1", gated)
    a = await pair.manager(runner)
    job = await submit(a, pair.env)
    run = await runner.next_run()
    store = await pair.store()
    assert not await store.cancel_requested(job.id)
    cancelled = await within(a.cancel(job.id, "alice"))
    assert cancelled.state is JobState.CANCELLED and run.cancelled
    assert await store.cancel_requested(job.id)


async def test_a_progress_a_later_write_supersedes_is_never_stored(pair: Pair) -> None:
    """Progress waits for its timer (0.5 s) even when a save comes first: a job that ends
    before then stores none (no row inserted, then pruned at its end); one that runs longer
    stores it by the timer, and keeps its last one."""

    async def slow(run: Any) -> None:
        await run.sink.progress(ProviderProgress(Stage.RUNNING, 0.25, step=1, max_steps=4))
        await asyncio.sleep(1.0)  # the progress timer fires meanwhile
        await produce_image(run)

    quick = ScriptedProvider("p1")  # progress, then its output at once
    a = await pair.manager(quick)
    job = await submit(a, pair.env)
    assert (await within(final_job(a.subscribe(job.id)))).state is JobState.SUCCEEDED
    assert await _stored_kinds(a, job.id) == ["accepted", "output", "finished"]
    quick.behaviour = slow
    job = await submit(a, pair.env)
    assert (await within(final_job(a.subscribe(job.id)))).state is JobState.SUCCEEDED
    kinds = await _stored_kinds(a, job.id)
    assert kinds[0] == "accepted" and kinds[-2:] == ["output", "finished"]
    assert kinds.count("progress") == 1, kinds


async def _stored_kinds(manager: JobManager, job_id: str) -> list[str]:
    return [event.kind for event in await manager._store.events(job_id)]
