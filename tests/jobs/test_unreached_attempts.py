"""An attempt that never reached an agent is not an attempt: the job waits, its deadline kept."""

from __future__ import annotations

import asyncio

from aiserver.errors import ErrorKind
from aiserver.jobs.model import Finished, JobState, Progress, Retrying, Stage
from aiserver.providers.base import Cause, ProviderUnavailable
from aiserver.providers.comfy.slots import SlotFencedSink
from tests.jobs.helpers import Env, Run, ScriptedProvider, collect, produce_image, submit


async def test_no_agent_at_run_time_spends_no_attempt(env: Env) -> None:
    async def no_agent_twice(run: Run) -> None:
        if len(provider.runs) <= 2:  # the agent it was picked for went away meanwhile
            raise ProviderUnavailable("no agent available: a: offline", cause=Cause.NO_AGENT)
        await produce_image(run)

    provider = ScriptedProvider(behaviour=no_agent_twice)
    manager = await env.manager(provider, max_attempts=1)
    job = await submit(manager, env)
    events = await collect(manager.subscribe(job.id))
    final = events[-1].kind
    assert isinstance(final, Finished)
    assert final.job.state is JobState.SUCCEEDED and final.job.attempts == 1, final.job.error
    assert len(provider.runs) == 3 and not any(isinstance(e.kind, Retrying) for e in events)
    # Meanwhile its watchers were told why it waited.
    waits = [
        e.kind.waiting
        for e in events
        if isinstance(e.kind, Progress) and e.kind.stage is Stage.QUEUED and e.kind.waiting
    ]
    assert waits and "no agent available" in waits[0]


async def test_the_queue_deadline_still_counts_from_the_first_queueing(env: Env) -> None:
    async def no_agent(run: Run) -> None:
        raise ProviderUnavailable("no agent available", cause=Cause.NO_AGENT)

    provider = ScriptedProvider(behaviour=no_agent)
    manager = await env.manager(provider, queue_timeout_s=1.0)
    job = await submit(manager, env)
    events = await collect(manager.subscribe(job.id))
    final = events[-1].kind
    assert isinstance(final, Finished) and final.job.error is not None
    assert (final.job.error.kind, final.job.error.reason) == (
        ErrorKind.DEADLINE_EXCEEDED,
        "QUEUE_TIMEOUT",
    )
    assert final.job.attempts == 0 and final.job.started is None


async def test_a_repeat_prompt_stopped_by_its_slot_is_a_retry_not_a_queue_timeout(
    env: Env,
) -> None:
    """An attempt ran its prompt on the agent (longer than the queue timeout), lost its
    frames, and its repeat prompt was stopped by the slot fence (the slot's renewals
    failing): the attempt reached the agent, so the job is retried now (attempt counted),
    not re-queued under its first queueing's deadline and failed for a queue timeout."""
    firm = [True]

    async def fenced_repeat(run: Run) -> None:
        if len(provider.runs) > 1:
            await produce_image(run)
            return
        sink = SlotFencedSink(run.sink, lambda: firm[0], "a")
        await sink.checkpoint({"agent": "a", "prompt_id": "first"})
        await asyncio.sleep(1.2)  # the prompt runs; its frames never reach us
        firm[0] = False  # meanwhile the slot's renewals failed
        await sink.checkpoint({"agent": "a", "prompt_id": "repeat"})  # _repeat's checkpoint

    provider = ScriptedProvider(behaviour=fenced_repeat)
    manager = await env.manager(provider, queue_timeout_s=1.0, max_attempts=3)
    job = await submit(manager, env)
    events = await collect(manager.subscribe(job.id))
    final = events[-1].kind
    assert isinstance(final, Finished)
    assert final.job.state is JobState.SUCCEEDED, final.job.error
    assert final.job.attempts == 2 and len(provider.runs) == 2
    retries = [e.kind for e in events if isinstance(e.kind, Retrying)]
    assert len(retries) == 1 and "slot" in retries[0].reason
