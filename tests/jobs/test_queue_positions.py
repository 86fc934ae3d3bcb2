"""What a deep queue costs the dispatcher: position announcements and passes over the queue.

Every start of a job moves each job behind it up one place; these tests pin down that
watchers hear such moves at most every ``position_interval_s`` (exact when told, and GetJob's
place always exact), and that a pass while no provider has room looks at new jobs only.
"""

from __future__ import annotations

import asyncio

from aiserver.errors import ErrorKind, ServiceError
from aiserver.jobs.manager import JobManager
from aiserver.jobs.model import Finished, JobEvent, JobState, Progress, Stage
from aiserver.tasks import ImageToImageSpec, TaskKind, TaskSpec
from tests.jobs.helpers import Env, ScriptedProvider, collect, gated, submit, within


def _queued_moves(seen: list[JobEvent], job_id: str) -> list[int]:
    return [
        e.kind.queue_position
        for e in seen
        if e.job_id == job_id and isinstance(e.kind, Progress) and e.kind.stage is Stage.QUEUED
    ]


async def test_moves_up_the_queue_are_held_back_for_the_interval(env: Env) -> None:
    provider = ScriptedProvider(behaviour=gated)
    provider.slots = 1
    manager = await env.manager(provider, position_interval_s=30)
    seen: list[JobEvent] = []
    manager.tap(lambda event, job: seen.append(event))
    first = await submit(manager, env)
    run = await provider.next_run()
    queued = [await submit(manager, env) for _ in range(4)]
    assert [manager.queue_position(j.id) for j in queued] == [1, 2, 3, 4]
    for _ in range(2):  # two starts: every waiting job moves up twice
        run.release.set()
        run = await provider.next_run()
    assert [manager.queue_position(j.id) for j in queued[2:]] == [1, 2]  # exact at once
    assert all(_queued_moves(seen, j.id) == [] for j in queued[2:])  # told nothing yet
    for job in (first, queued[0]):
        assert (await final_state(manager, job.id)) is JobState.SUCCEEDED
    run.release.set()
    for _ in range(2):
        (await provider.next_run()).release.set()


async def test_a_held_back_move_is_told_when_due_with_the_exact_place(env: Env) -> None:
    provider = ScriptedProvider(behaviour=gated)
    provider.slots = 1
    manager = await env.manager(provider, position_interval_s=0.3)
    seen: list[JobEvent] = []
    manager.tap(lambda event, job: seen.append(event))
    await submit(manager, env)
    run = await provider.next_run()
    queued = [await submit(manager, env) for _ in range(4)]
    for _ in range(3):
        run.release.set()
        run = await provider.next_run()
    last = queued[-1]
    assert manager.queue_position(last.id) == 1
    # No queue change from here on: the place last told becomes the exact one by itself.
    async with asyncio.timeout(5):
        while _queued_moves(seen, last.id)[-1:] != [1]:
            await asyncio.sleep(0.02)
    assert len(_queued_moves(seen, last.id)) < 3  # three moves, fewer announcements
    run.release.set()
    (await provider.next_run()).release.set()


async def test_a_provider_gets_as_many_jobs_at_once_as_its_capacity(env: Env) -> None:
    # No bound of the service's own by default: a large pool's slots are all used.
    provider = ScriptedProvider(behaviour=gated)
    provider.slots = 24
    manager = await env.manager(provider)
    jobs = [await submit(manager, env) for _ in range(25)]
    runs = [await provider.next_run() for _ in range(24)]
    assert manager.queue_position(jobs[-1].id) == 1
    assert provider.active == 24
    for run in runs:
        run.release.set()
    (await provider.next_run()).release.set()
    assert (await final_state(manager, jobs[-1].id)) is JobState.SUCCEEDED


class _CountingProvider(ScriptedProvider):
    def __init__(self) -> None:
        super().__init__(behaviour=gated)
        self.refusals_asked: dict[str, int] = {}

    def refusal(self, task: TaskKind, spec: TaskSpec) -> ServiceError | None:
        key = getattr(spec, "positive_prompt", "")
        self.refusals_asked[key] = self.refusals_asked.get(key, 0) + 1
        return super().refusal(task, spec)


async def test_a_pass_while_no_provider_has_room_looks_at_new_jobs_only(env: Env) -> None:
    provider = _CountingProvider()
    provider.slots = 1
    manager = await env.manager(provider, recheck_interval_s=30)
    await submit(manager, env, spec=ImageToImageSpec(positive_prompt="running"))
    run = await provider.next_run()
    for i in range(6):  # each submit wakes a pass over the whole queue
        await submit(manager, env, spec=ImageToImageSpec(positive_prompt=f"q{i}"))
        await asyncio.sleep(0.02)
    assert {k: v for k, v in provider.refusals_asked.items() if k != "running"} == {
        f"q{i}": 1 for i in range(6)
    }
    # And what no provider will ever take still fails at once while the provider is busy.
    provider.refuse = ServiceError(
        ErrorKind.FAILED_PRECONDITION, "COMFYUI_MODEL_MISSING", "no agent has model x"
    )
    doomed = await submit(manager, env, spec=ImageToImageSpec(positive_prompt="doomed"))
    assert (await final_state(manager, doomed.id)) is JobState.FAILED
    provider.refuse = None
    run.release.set()
    for _ in range(6):
        (await provider.next_run()).release.set()


async def test_a_provider_with_room_that_cannot_take_them_does_not_rescan_the_queue(
    env: Env,
) -> None:
    # A local fallback has room while the ComfyUI pool is full: the waiting jobs are not the
    # fallback's, and asking again on every pass cost a check of every agent per job.
    busy = _CountingProvider()
    busy.slots = 1
    idle = ScriptedProvider("p2", tasks=[TaskKind.IMAGE_TO_TEXT])
    manager = await env.manager(busy, idle, recheck_interval_s=30)
    await submit(manager, env, spec=ImageToImageSpec(positive_prompt="running"))
    run = await busy.next_run()
    for i in range(6):
        await submit(manager, env, spec=ImageToImageSpec(positive_prompt=f"q{i}"))
        await asyncio.sleep(0.02)
    assert {k: v for k, v in busy.refusals_asked.items() if k != "running"} == {
        f"q{i}": 1 for i in range(6)
    }
    run.release.set()  # room on the busy one again: the next job starts there
    (await busy.next_run()).release.set()
    for _ in range(5):
        (await busy.next_run()).release.set()


async def test_a_waiting_job_is_looked_at_again_when_a_provider_gains_capacity(
    env: Env,
) -> None:
    busy = ScriptedProvider(behaviour=gated)
    busy.slots = 1
    other = ScriptedProvider("p2", tasks=[TaskKind.IMAGE_TO_TEXT])
    manager = await env.manager(busy, other, recheck_interval_s=30)
    await submit(manager, env)
    run = await busy.next_run()
    waiting = await submit(manager, env)
    await asyncio.sleep(0.05)  # looked at once: p2 has room but does not run it
    assert manager.queue_position(waiting.id) == 1
    # An agent comes online on p2 with what the job needs: its capacity changes with it.
    other.tasks = frozenset(TaskKind)
    other.slots = 2
    await submit(manager, env, task=TaskKind.IMAGE_TO_TEXT)  # any pass
    assert (await final_state(manager, waiting.id)) is JobState.SUCCEEDED  # long before 30 s
    run.release.set()


async def final_state(manager: JobManager, job_id: str) -> JobState:
    events = await within(collect(manager.subscribe(job_id)))
    final = events[-1].kind
    assert isinstance(final, Finished)
    return final.job.state
