"""WatchJobs' feed through a real EventHub: filtering, and progress throttled on both edges."""

from __future__ import annotations

import asyncio

from aiserver.api.job_changes import JobChanges
from aiserver.jobs.events import EventHub
from aiserver.jobs.model import Accepted, Finished, Job, JobState, Progress, Stage, TextProduced
from aiserver.tasks import TaskKind
from tests.jobs.test_events import new_job


def fed(hub: EventHub, changes: JobChanges, *jobs: Job) -> None:
    hub.tap(changes.offer)
    for job in jobs:
        hub.open_new(job)


async def drain(changes: JobChanges, within: float = 0.05) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    while True:
        try:
            async with asyncio.timeout(within):
                event, _job = await changes.next()
        except TimeoutError:
            return out
        out.append((event.job_id, event.kind))


async def test_only_accepted_jobs_and_never_their_outputs() -> None:
    hub = EventHub()
    changes = JobChanges(lambda job: job.owner == "alice")
    mine, theirs = new_job("A"), new_job("B")
    mine.owner, theirs.owner = "alice", "bob"
    fed(hub, changes, mine, theirs)
    for job in (mine, theirs):
        hub.emit(job.id, Accepted(TaskKind.IMAGE_TO_IMAGE, "r", 0))
        hub.emit(job.id, TextProduced(0, "a caption"))
    seen = await drain(changes)
    assert [(job_id, type(kind)) for job_id, kind in seen] == [("A", Accepted)]
    changes.close()


async def test_progress_is_throttled_and_the_last_held_one_still_arrives() -> None:
    hub = EventHub()
    changes = JobChanges(lambda _job: True, interval_s=0.5)
    job = new_job("A")
    fed(hub, changes, job)
    job.state = JobState.RUNNING
    for step in range(1, 6):  # a burst: the first goes at once, the last after the interval
        hub.emit(job.id, Progress(Stage.RUNNING, fraction=step / 10, step=step, max_steps=5))
    first = await drain(changes, within=0.05)
    assert [kind.step for _id, kind in first] == [1]  # type: ignore[attr-defined]
    later = await drain(changes, within=1.0)
    assert [kind.step for _id, kind in later] == [5]  # type: ignore[attr-defined]

    hub.emit(job.id, Progress(Stage.DOWNLOADING, fraction=0.9))  # the interval has passed: sent
    hub.emit(job.id, Progress(Stage.DOWNLOADING, fraction=0.95))  # held...
    job.state = JobState.SUCCEEDED
    hub.emit(job.id, Finished(job))  # ...and superseded: the end is sent at once, alone
    tail = await drain(changes, within=0.3)
    assert [type(kind) for _id, kind in tail] == [Progress, Finished]
    assert tail[0][1].fraction == 0.9  # type: ignore[attr-defined]
    changes.close()


async def test_a_failing_tap_neither_stops_the_job_nor_the_other_watchers() -> None:
    hub = EventHub()
    changes = JobChanges(lambda _job: True)

    def broken(_event: object, _job: Job) -> None:
        raise RuntimeError("a watcher's bug")

    hub.tap(broken)
    fed(hub, changes, new_job("A"))
    event = hub.emit("A", Accepted(TaskKind.IMAGE_TO_IMAGE, "r", 0))
    assert event.sequence == 1
    assert [job_id for job_id, _kind in await drain(changes)] == ["A"]
    changes.close()
