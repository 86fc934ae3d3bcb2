"""The turn of the SQLite store's writing connection: one write at a time, in issue order.

A write runs on the event loop, in its caller's step, when nothing holds or awaits the turn.
One that finds the turn taken (a WAL checkpoint or a long write in the store's thread) queues;
when the thread gives the turn back, the queued writes run one after another in that same
callback, up to the next one that goes to the thread.

An ``asyncio.Lock`` did this before, but it hands the turn on one waiter per loop iteration,
and while any waiter is queued a new write must queue too (order): at 16 callers a single
checkpoint left a convoy that never drained, and ~3 of every 4 writes waited a future and a
task wake-up for their turn (counted with ``bench.hop_census``: 2.9 task steps per job where
none were needed).

A queued write runs for its caller, in the caller's context (its context variables), and the
caller learns the outcome when it next wakes. A caller cancelled in between (after its write
ran, before it woke) gets ``CancelledError`` for a write that is committed: cancelling a
write's caller means "maybe written", as cutting any database call does. A write that must not
be left that way (a job's end) is awaited shielded by its caller.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["WriteTurn"]

_T = TypeVar("_T")

_Queued = tuple[Callable[[], Any], asyncio.Future[Any], bool, contextvars.Context]
"""A waiting write: what it runs, its caller's future, whether in the thread, its context."""


class WriteTurn:
    """FIFO turn of one connection: :meth:`inline` writes on the loop, :meth:`in_thread`
    writes in ``executor`` (which holds the turn until the thread is done with it)."""

    def __init__(self, executor: concurrent.futures.Executor) -> None:
        self._executor = executor
        self._held = False  # a write runs in the thread
        self._queue: deque[_Queued] = deque()

    def busy(self) -> bool:
        """A write runs in the thread, or writes wait for their turn."""
        return self._held or bool(self._queue)

    async def inline(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` on the loop in its turn: at once when nothing is ahead of it. A caller
        cancelled while it waits never runs; one cancelled after it ran (see the module) may
        have written."""
        if not self._held and not self._queue:
            return fn()
        waiter: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        self._queue.append((fn, waiter, False, contextvars.copy_context()))
        return await waiter

    async def in_thread(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` in the thread in its turn, which is given back when the thread is done
        with the connection: a caller cancelled meanwhile stops waiting, but no write runs on
        the loop inside the thread's open transaction."""
        waiter: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        context = contextvars.copy_context()
        if not self._held and not self._queue:
            self._start(fn, waiter, context)
        else:
            self._queue.append((fn, waiter, True, context))
        return await waiter

    async def after_queued(self) -> None:
        """Wait until the writes issued before now are done."""
        if self.busy():
            await self.inline(_nothing)

    def _start(
        self, fn: Callable[[], Any], waiter: asyncio.Future[Any], context: contextvars.Context
    ) -> None:
        loop = waiter.get_loop()
        running = self._executor.submit(fn)  # raises when the executor is shut down
        self._held = True

        def give_back(_: object) -> None:
            # In the caller's context, not the thread's (where the queued writes run next).
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(self._thread_done, running, waiter, context=context)

        running.add_done_callback(give_back)

    def _thread_done(
        self, running: concurrent.futures.Future[Any], waiter: asyncio.Future[Any]
    ) -> None:
        self._held = False
        if running.cancelled():  # (an executor shut down with cancel_futures)
            waiter.cancel()
        elif not waiter.done():
            if (exc := running.exception()) is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(running.result())
        self._drain()

    def _drain(self) -> None:
        queue = self._queue
        while queue and not self._held:
            fn, waiter, threaded, context = queue.popleft()
            if waiter.done():  # its caller was cancelled while it waited: it never runs
                continue
            if threaded:
                try:
                    self._start(fn, waiter, context)
                except BaseException as exc:
                    waiter.set_exception(exc)
                continue
            try:
                result = context.run(fn)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # its caller's to see; the queue goes on
                waiter.set_exception(exc)
            else:
                waiter.set_result(result)


def _nothing() -> None:
    return None
