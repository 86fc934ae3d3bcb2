"""A job's create and end begun in the caller's step: no task unless they suspend."""

from __future__ import annotations

import asyncio
import contextvars
from collections import Counter
from typing import Any

import pytest

from aiserver.jobs.eager import start_eagerly
from aiserver.jobs.model import JobState
from tests.jobs.helpers import Env, ScriptedProvider, final_job, submit, within

_var: contextvars.ContextVar[str] = contextvars.ContextVar("_var", default="caller's")


def _spawn(rest: Any, context: contextvars.Context) -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_task(rest, context=context)


async def test_a_coroutine_that_ends_at_once_makes_no_task_and_keeps_its_context() -> None:
    async def ends() -> str:
        _var.set("its own")
        return "done"

    before = len(asyncio.all_tasks())
    started = start_eagerly(ends(), _spawn)
    assert started.done() and started.result() == "done"
    assert len(asyncio.all_tasks()) == before
    assert _var.get() == "caller's"  # run in a copy, as a task's first step is


async def test_a_first_step_error_is_the_futures() -> None:
    async def fails() -> None:
        raise ValueError("bad")

    started = start_eagerly(fails(), _spawn)
    with pytest.raises(ValueError, match="bad"):
        await started


async def test_a_suspended_coroutine_goes_on_in_a_task_in_its_context() -> None:
    gate = asyncio.Event()
    seen: list[str] = []

    async def waits() -> int:
        _var.set("its own")
        await gate.wait()
        await asyncio.sleep(0)  # a bare yield, relayed as well
        seen.append(_var.get())
        return 7

    started = start_eagerly(waits(), _spawn)
    assert isinstance(started, asyncio.Task) and not started.done()
    gate.set()
    assert await within(started) == 7
    assert seen == ["its own"] and _var.get() == "caller's"


async def test_cancelling_the_task_reaches_the_suspended_coroutine() -> None:
    ended: list[str] = []

    async def waits() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise

    started = start_eagerly(waits(), _spawn)
    started.cancel()
    with pytest.raises(asyncio.CancelledError):
        await started
    assert ended == ["cancelled"]


async def test_a_job_on_the_embedded_store_makes_no_task_for_its_create_or_its_end(
    env: Env,
) -> None:
    manager = await env.manager(ScriptedProvider())
    made: Counter[str] = Counter()
    loop = asyncio.get_running_loop()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        made[getattr(coro, "__qualname__", "?")] += 1
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)
    try:
        job = await submit(manager, env)
        done = await final_job(manager.subscribe(job.id))
    finally:
        loop.set_task_factory(None)
    assert done.state is JobState.SUCCEEDED
    assert made["JobManager._create"] == 0 and made["JobManager._finish_now"] == 0
    assert made["AttemptDriver._drive"] == 1  # the job's controller, as before
