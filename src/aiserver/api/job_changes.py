"""WatchJobs' feed: one caller's view of every job's events, progress throttled per job.

Progress is throttled on both edges: at most one per job per interval, and the latest one
held back is delivered when the interval ends, so a job that pauses (a held sampler step)
shows where it paused rather than the step before.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

from aiserver.jobs.events import snapshot
from aiserver.jobs.model import Job, JobEvent, OutputStored, Progress, TextProduced

__all__ = ["JobChanges"]

Change = tuple[JobEvent, Job]


class JobChanges:
    """Feed with :meth:`offer` (a hub tap); read with :meth:`next`; :meth:`close` when done."""

    def __init__(self, accept: Callable[[Job], bool], *, interval_s: float = 0.25) -> None:
        self._accept = accept
        self._interval = interval_s
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Change] = asyncio.Queue()
        self._last: dict[str, float] = {}
        self._held: dict[str, tuple[Change, asyncio.TimerHandle]] = {}

    def offer(self, event: JobEvent, job: Job) -> None:
        if not self._accept(job) or isinstance(event.kind, OutputStored | TextProduced):
            return  # a list shows where jobs are, not what they made
        job_id = event.job_id
        change = (event, snapshot(job))
        if not isinstance(event.kind, Progress):
            held = self._held.pop(job_id, None)
            if held is not None:
                held[1].cancel()
            self._last.pop(job_id, None)
            self._queue.put_nowait(change)
            return
        wait = self._last.get(job_id, -math.inf) + self._interval - self._loop.time()
        if wait <= 0:
            self._send_progress(job_id, change)
            return
        held = self._held.get(job_id)
        timer = held[1] if held else self._loop.call_later(wait, self._release, job_id)
        self._held[job_id] = (change, timer)

    async def next(self) -> Change:
        return await self._queue.get()

    def close(self) -> None:
        for _change, timer in self._held.values():
            timer.cancel()
        self._held.clear()

    def _release(self, job_id: str) -> None:
        held = self._held.pop(job_id, None)
        if held is not None:
            self._send_progress(job_id, held[0])

    def _send_progress(self, job_id: str, change: Change) -> None:
        self._last[job_id] = self._loop.time()
        self._queue.put_nowait(change)
