"""Group commit: the writes of several jobs in one statement, while one is on its way.

On PostgreSQL most of a short transaction's cost is per statement and per commit (parse and
bind, the snapshot, the commit's WAL flush, asyncpg's round trip), not per row. So a write
that finds nothing in flight goes at once, from its caller's task (no hop, no timer: with one
job at a time nothing changes); the writes that arrive meanwhile wait for that flight to land
and then go together in one statement, one round trip and one commit. The busier the store,
the larger the groups. A group holds at most one write per key (a job: its writes form a
chain anyway, ``jobs/event_log.py``); a second write of a key already in the group waits for
the next one, so one key's writes keep their order.

A group whose statement fails is retried write by write (a failed statement committed
nothing), so that one write's error stays its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

__all__ = ["MAX_GROUP", "GroupCommit"]

MAX_GROUP = 64
"""Writes per statement at most: bounds a statement's row locks and parameters."""

_T = TypeVar("_T")
_R = TypeVar("_R")


class GroupCommit(Generic[_T, _R]):
    """``send_one`` stores one write; ``send_group`` several in one statement, answering
    each one's result in the group's order; ``key`` names what a write changes."""

    def __init__(
        self,
        send_one: Callable[[_T], Awaitable[_R]],
        send_group: Callable[[Sequence[_T]], Awaitable[Sequence[_R]]],
        key: Callable[[_T], Hashable],
    ) -> None:
        self._send_one = send_one
        self._send_group = send_group
        self._key = key
        self._waiting: list[tuple[_T, asyncio.Future[_R]]] = []
        self._busy = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.grouped = 0
        """Writes stored as part of a group so far (shown by the tests and the bench)."""

    async def write(self, item: _T) -> _R:
        if not self._busy:
            self._busy = True  # alone: from the caller's task
            try:
                return await self._send_one(item)
            finally:
                self._next()
        done: asyncio.Future[_R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        return await done

    def _next(self) -> None:
        """A flight landed: send what waited meanwhile, or stand idle."""
        if not self._waiting:
            self._busy = False
            return
        group: list[tuple[_T, asyncio.Future[_R]]] = []
        later: list[tuple[_T, asyncio.Future[_R]]] = []
        keys: set[Hashable] = set()
        for entry in self._waiting:
            key = self._key(entry[0])
            if len(group) < MAX_GROUP and key not in keys:
                keys.add(key)
                group.append(entry)
            else:
                later.append(entry)
        self._waiting = later
        task = asyncio.get_running_loop().create_task(self._fly(group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fly(self, group: list[tuple[_T, asyncio.Future[_R]]]) -> None:
        try:
            if len(group) > 1:
                try:
                    results = await self._send_group([item for item, _ in group])
                except Exception:
                    pass  # each again alone, below
                else:
                    self.grouped += len(group)
                    for (_, done), result in zip(group, results, strict=True):
                        if not done.done():  # (a caller that gave up)
                            done.set_result(result)
                    return
            await asyncio.gather(*(self._settle(item, done) for item, done in group))
        finally:
            for _, done in group:
                done.cancel()  # (no-op when answered) never left waiting, e.g. at shutdown
            self._next()

    async def _settle(self, item: _T, done: asyncio.Future[_R]) -> None:
        try:
            result = await self._send_one(item)
        except Exception as exc:
            if not done.done():
                done.set_exception(exc)
            return
        if not done.done():
            done.set_result(result)
