"""The progress a caller's rate limit holds back goes out while an output is being stored.

A job shorter than the progress interval holds every progress until its first output; that
progress then went out right before OutputStored, i.e. after the output's durable write, so
the caller's last messages (progress, output, finished) were written one after the other
behind the disk. Now it goes out when the output's store begins.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiserver.jobs.model import Accepted, Finished, OutputStored, Progress, Stage
from tests.jobs.helpers import Env, ScriptedProvider, collect, env, submit, within

__all__ = ["env"]


async def test_the_held_progress_reaches_the_caller_while_the_output_is_stored(
    env: Env,
) -> None:
    provider = ScriptedProvider()
    # One progress every 30 s: everything the run reports in the job's first moments is held.
    manager = await env.manager(provider, progress_max_rate_hz=1 / 30)
    gate = asyncio.Event()
    storing = asyncio.Event()
    put = env.artifacts.put

    async def held_put(*args: Any, **kwargs: Any) -> Any:
        storing.set()
        await gate.wait()  # as a put waiting for the disk
        return await put(*args, **kwargs)

    env.artifacts.put = held_put  # type: ignore[method-assign]
    job = await submit(manager, env)
    events = manager.subscribe(job.id)
    assert isinstance((await within(anext(events))).kind, Accepted)
    reader = asyncio.create_task(anext(events))
    await within(storing.wait())
    got = await within(reader, 2.0)  # while the put is still held
    assert isinstance(got.kind, Progress)
    assert got.kind.stage is Stage.RUNNING and got.kind.fraction == 0.5
    gate.set()
    rest = await collect(events)
    assert [type(e.kind) for e in rest] == [OutputStored, Finished]
