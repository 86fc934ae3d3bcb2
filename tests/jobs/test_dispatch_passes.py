"""Jobs that meet no backlog go to their provider without a pass of the dispatcher's task."""

from __future__ import annotations

from aiserver.jobs.model import JobState
from tests.jobs.helpers import Env, ScriptedProvider, final_job, gated, submit, within


async def test_jobs_without_a_backlog_wake_no_pass(env: Env) -> None:
    provider = ScriptedProvider()
    manager = await env.manager(provider)
    dispatcher = manager._dispatch
    warm = await submit(manager, env)  # by its end, the loop's first pass (at start) has run
    assert (await final_job(manager.subscribe(warm.id))).state is JobState.SUCCEEDED
    before = dispatcher.passes
    assert before >= 1
    for _ in range(5):
        job = await submit(manager, env)
        assert (await final_job(manager.subscribe(job.id))).state is JobState.SUCCEEDED
    # Each job was dispatched in its create step, and its end found nothing queued: the loop
    # was woken twice per job for that before (a task step, and a look at every provider).
    assert dispatcher.passes == before


async def test_a_job_behind_a_backlog_waits_for_the_pass_after_an_end(env: Env) -> None:
    provider = ScriptedProvider(behaviour=gated)
    provider.slots = 1
    manager = await env.manager(provider)
    first = await submit(manager, env)
    run = await provider.next_run()
    second = await submit(manager, env)  # no room: queued, a pass will take it
    assert manager.queue_position(second.id) == 1
    run.release.set()
    assert (await final_job(manager.subscribe(first.id))).state is JobState.SUCCEEDED
    second_run = await provider.next_run()
    second_run.release.set()
    assert (await within(final_job(manager.subscribe(second.id)))).state is JobState.SUCCEEDED
