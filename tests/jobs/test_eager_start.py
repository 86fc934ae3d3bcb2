"""A job's create and end begun in the caller's step: no task unless they suspend."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from aiserver.jobs.eager import start_eagerly
from aiserver.jobs.model import JobState
from aiserver.jobs.store.write_turn import WriteTurn
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


async def test_the_task_of_a_suspended_coroutine_is_named_after_it() -> None:
    async def waits_here() -> None:
        await asyncio.Event().wait()

    names: list[str] = []
    loop = asyncio.get_running_loop()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        names.append(getattr(coro, "__qualname__", "?"))
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)
    try:
        started = start_eagerly(waits_here(), _spawn)
    finally:
        loop.set_task_factory(None)
    qualname = waits_here.__qualname__
    assert names == [qualname]
    assert f"coro=<{qualname}() running at " in repr(started)  # its frame, as a task's
    started.cancel()
    with pytest.raises(asyncio.CancelledError):
        await started


async def test_a_cancel_before_the_tasks_first_step_cancels_what_the_coroutine_awaits() -> None:
    # A task cancelled while it awaits a future cancels that future; one cancelled before its
    # first step must too: a queued write whose caller saw CancelledError never runs.
    with ThreadPoolExecutor(1) as executor:
        turn = WriteTurn(executor)
        release = threading.Event()
        held = asyncio.ensure_future(turn.in_thread(lambda: release.wait(10)))  # holds the turn
        await asyncio.sleep(0)
        assert turn.busy()
        ran: list[str] = []
        started = start_eagerly(turn.inline(lambda: ran.append("write")), _spawn)
        assert not started.done()  # queued behind the thread's write
        started.cancel()
        with pytest.raises(asyncio.CancelledError):
            await started
        release.set()
        await within(held)
        await within(asyncio.ensure_future(turn.after_queued()))
        assert ran == [] and not turn.busy()


async def test_a_job_on_the_embedded_store_makes_no_task_for_its_create_or_its_end(
    env: Env,
) -> None:
    if env.schema:  # a shared store's writes run in tasks of their own (see eager.py)
        pytest.skip("the embedded store only")
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
    # The job's controller and its run, as before; nothing else, named or not (a create or
    # an end that suspended would count under its own name: see the test below).
    assert made == Counter({"AttemptDriver._drive": 1, "ScriptedProvider.run": 1})
