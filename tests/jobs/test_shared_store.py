"""Two job managers as two coordinators on one job store (docs/scale-out.md).

Each manager has its own holder id and, on PostgreSQL, its own store (its own pool and
LISTEN connection), so everything between them goes through the database. On SQLite both
share one store object: its announcements are in-process, which is all SQLite serves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from aiserver.jobs.manager import JobManager
from aiserver.jobs.model import Accepted, Finished, JobState, OutputStored
from aiserver.jobs.scheduler import SchedulerSettings
from aiserver.jobs.store import JobStore, new_holder_id
from aiserver.jobs.store_watch import StoreWatch
from tests.jobs.helpers import FAST, Env, ScriptedProvider, collect, gated, submit, within
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
    done = [await within(_final(b, job_id), 10) for job_id in (running.id, queued.id)]
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
    final = await within(_final(b, job.id), 10)
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


async def _freeze(manager: JobManager) -> None:
    """As a process that stopped running (a long pause): no renewals, no adoption."""
    await manager._leases.stop()  # type: ignore[union-attr]
    for task in manager._shared_tasks:
        task.cancel()


def _serves_nothing() -> ScriptedProvider:
    return ScriptedProvider("p1", tasks=())


async def _final(manager: JobManager, job_id: str) -> Any:
    events = await collect(manager.subscribe(job_id), 10)
    last = events[-1].kind
    assert isinstance(last, Finished)
    return last.job
