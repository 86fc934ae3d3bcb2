"""A coroutine's first step run in the caller's step; a task only if it suspends.

A job's create and its end each ran in a task of their own (so that a caller cancelled
meanwhile cannot leave them half-done). On the embedded store both usually end without
suspending (the SQLite write runs on the loop when nobody holds the writes' turn), and the
task cost the loop four to five callbacks per job: the task's steps, its done callback, and
``asyncio.shield``'s two plus the caller's wake-up. Started here, a coroutine that ends in its
first step costs none of those; one that suspends goes on in a task exactly as before.
(Python 3.12's ``eager_start`` does the same; this works on 3.11.)

The first step runs in a copy of the caller's context, as a task's would, but while the
caller's task is the current task: code that binds to ``asyncio.current_task()`` in that step
(``asyncio.timeout``, for one) would bind to the caller. Use it only for coroutines whose
first step does not (the embedded store's writes and the job's own bookkeeping).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

__all__ = ["start_eagerly"]

_T = TypeVar("_T")


def start_eagerly(
    coro: Coroutine[Any, Any, _T],
    spawn: Callable[[Coroutine[Any, Any, _T], contextvars.Context], asyncio.Future[_T]],
) -> asyncio.Future[_T]:
    """Run ``coro`` up to its first suspension now. Ended: a done future with its result or
    exception. Suspended: ``spawn(rest, context)`` must wrap the rest in a task (run in
    ``context``, where the first step ran) and return it."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    try:
        waiting = context.run(coro.send, None)
    except StopIteration as end:
        done = loop.create_future()
        done.set_result(end.value)
        return done
    except asyncio.CancelledError:
        cancelled = loop.create_future()
        cancelled.cancel()
        return cancelled
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        failed = loop.create_future()
        failed.set_exception(exc)
        return failed
    return spawn(_Rest(coro, waiting), context)


class _Rest(Coroutine[Any, Any, _T]):
    """The rest of a coroutine suspended at its first step, as a task drives a coroutine: its
    first ``send`` hands the task what the coroutine yielded (the future it waits on, or
    ``None`` for a bare yield); every later ``send`` or ``throw`` (a wake-up, a cancellation,
    one that came before the task's first step included) goes to the coroutine. Named as the
    coroutine (a task's repr, its name in a task factory)."""

    def __init__(self, coro: Coroutine[Any, Any, _T], waiting: Any) -> None:
        self._coro = coro
        self._waiting = waiting
        self._first = True
        self.__name__ = getattr(coro, "__name__", type(coro).__name__)
        self.__qualname__ = getattr(coro, "__qualname__", self.__name__)

    def send(self, value: Any) -> Any:
        if self._first:
            self._first = False
            return self._waiting
        return self._coro.send(value)

    def __next__(self) -> Any:  # what the C task calls for send(None)
        return self.send(None)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if self._first:
            # Cancelled before the task's first step: the task never learnt what the
            # coroutine waits on, so cancel that as the task would have (else a queued
            # write still runs for a caller that was told it was cancelled).
            self._first = False
            waiting = self._waiting
            if isinstance(waiting, asyncio.Future):
                waiting.cancel()
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._coro.close()

    @property
    def cr_frame(self) -> Any:
        return getattr(self._coro, "cr_frame", None)

    @property
    def cr_code(self) -> Any:
        return getattr(self._coro, "cr_code", None)

    @property
    def cr_await(self) -> Any:
        return getattr(self._coro, "cr_await", None)

    @property
    def cr_running(self) -> bool:
        return bool(getattr(self._coro, "cr_running", False))

    def __await__(self) -> Generator[Any, Any, _T]:
        raise TypeError("a task's coroutine only")  # handed to a task, never awaited
