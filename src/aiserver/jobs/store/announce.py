"""In-process fan-out of announcements: each listener gets every one from its creation on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Self

from aiserver.jobs.store.protocol import Announcement

__all__ = ["AnnouncementHub", "Listener"]

_QUEUE_LIMIT = 10_000  # a listener that falls this far behind loses hints, never data


class Listener:
    """Iterates announcements; registered at creation, so nothing published after is missed.
    Call :meth:`aclose` (or iterate to the end) to unregister; ``on_close`` runs then, once."""

    def __init__(self, hub: AnnouncementHub, on_close: Callable[[], None] | None = None) -> None:
        self._hub = hub
        self._queue: asyncio.Queue[Announcement | None] = asyncio.Queue()
        self._on_close = on_close
        hub._queues.add(self._queue)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Announcement:
        item = await self._queue.get()
        if item is None:
            await self.aclose()
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        self._hub._queues.discard(self._queue)
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


class AnnouncementHub:
    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[Announcement | None]] = set()

    def publish(self, announcement: Announcement) -> None:
        for queue in self._queues:
            if queue.qsize() < _QUEUE_LIMIT:
                queue.put_nowait(announcement)

    def close(self) -> None:
        for queue in self._queues:
            queue.put_nowait(None)

    def listen(self, on_close: Callable[[], None] | None = None) -> Listener:
        return Listener(self, on_close)
