"""Queue positions in the one queue every coordinator shares (docs/scale-out.md, "Queue
positions").

A job's position is its place among every QUEUED job in the database, oldest first, wherever
it is held. Asking the store per job per event would cost a query each time any queue moves;
instead the dispatcher ranks every job this process holds in one statement
(:meth:`~aiserver.jobs.store.JobStore.queue_ranks`) at most every ``interval_s`` while it has
jobs waiting, and between two rankings the jobs that enter or leave its own queue shift the
cached places as they shift in the database. One coordinator alone is therefore exact without
any ranking; with several, another's moves show within ``interval_s`` (or the next pass).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable

from aiserver.jobs.scheduler import JobQueue
from aiserver.jobs.store import QueueRanks

__all__ = ["SharedPositions"]

Rank = Callable[[], Awaitable[QueueRanks]]


class SharedPositions:
    """Cached global places of the jobs in this process's queue."""

    def __init__(self, rank: Rank, *, interval_s: float, stale_s: float = 1.0) -> None:
        self._rank = rank
        self._interval = interval_s
        self._stale_s = stale_s
        self._places: dict[str, int] = {}
        self._queued = 0
        """Every QUEUED job, as last ranked plus this process's changes since."""
        self._ranked_at = -math.inf

    def position(self, job_id: str) -> int:
        """The cached place (1: next anywhere); 0 when not in this process's queue."""
        return self._places.get(job_id, 0)

    def newest(self) -> int:
        """The place a job created now gets: after every queued job."""
        if not self._places and time.monotonic() - self._ranked_at > self._stale_s:
            self._queued = 0  # an old count of others' jobs says nothing any more
        return max(self._queued, len(self._places)) + 1

    def entered(self, job_id: str, queue: JobQueue) -> None:
        """``job_id`` was just pushed on ``queue``: it goes before the next local job's place
        (a retried job keeps its age), else after every queued job."""
        after = queue.next_after(job_id)
        place = self._places.get(after) if after is not None else None
        if place is None:
            place = self.newest()
        else:
            for other, at in self._places.items():
                if at >= place:
                    self._places[other] = at + 1
        self._places[job_id] = place
        self._queued += 1

    def left(self, job_id: str) -> None:
        """``job_id`` left this process's queue (started, ended, moved): the ones behind move
        up."""
        place = self._places.pop(job_id, None)
        if place is None:
            return
        self._queued = max(self._queued - 1, 0)
        for other, at in self._places.items():
            if at > place:
                self._places[other] = at - 1

    def due(self) -> bool:
        return bool(self._places) and time.monotonic() - self._ranked_at >= self._interval

    def next_due_in(self) -> float | None:
        if not self._places:
            return None
        return max(self._ranked_at + self._interval - time.monotonic(), 0.0)

    async def refresh(self, queue: JobQueue) -> list[str]:
        """Rank every queued job of this process in the store. Returns the jobs still queued
        here that the store no longer shows as queued and held here (taken by another
        process: the caller checks the lease)."""
        asked = set(self._places)
        self._ranked_at = time.monotonic()
        ranks = await self._rank()
        self._queued = ranks.queued
        missing = []
        for job_id in asked:
            if job_id not in queue or job_id not in self._places:
                continue  # left meanwhile
            place = ranks.positions.get(job_id)
            if place is None:
                missing.append(job_id)
            else:
                self._places[job_id] = place
        return missing
