"""This process's leases on the jobs it holds (docs/scale-out.md, "Who owns a job").

A coordinator on a shared job store holds a lease on every job it accepted or adopted, queued
or running, and renews them every third of the lease. A renewal that fails means another
process may have taken the job over: the manager is told (``on_lost``) and forgets it.

It also knows, for each held job, when the lease was last granted or renewed (the start of
the statement that did it): :meth:`firm` says whether the lease still has a third of its
length to run, which a run checks before an act another process could repeat after a
takeover (queueing a prompt on an agent): a fenced write only proves the job was not taken
*yet*, and a lease whose renewals failed may lapse, and the job be taken, right after it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection

from aiserver.jobs.store import JobStore, Lease
from aiserver.tasks import TaskKind

__all__ = ["LeaseKeeper"]

logger = logging.getLogger(__name__)


class LeaseKeeper:
    """Claims, renews and releases the leases of one process (``holder``)."""

    def __init__(
        self,
        store: JobStore,
        holder: str,
        lease_s: float,
        on_lost: Callable[[str], None],
    ) -> None:
        self.holder = holder
        self.lease_s = lease_s
        self._store = store
        self._on_lost = on_lost
        self._held: set[str] = set()
        self._granted: dict[str, float] = {}  # job -> monotonic start of the last grant
        self._task: asyncio.Task[None] | None = None

    @property
    def renew_every_s(self) -> float:
        return self.lease_s / 3

    async def take(self, job_id: str) -> Lease | None:
        """Lease this job if nobody holds it (or its holder's lease lapsed)."""
        asked = time.monotonic()
        lease = await self._store.claim(self.holder, self.lease_s, job_id=job_id)
        if lease is not None:
            self.hold(job_id, since=asked)
        return lease

    async def adopt(self, tasks: Collection[TaskKind]) -> Lease | None:
        """Lease the oldest job of these tasks that nobody holds: left by a process that
        died or stopped."""
        asked = time.monotonic()
        lease = await self._store.claim(self.holder, self.lease_s, tasks=tasks)
        if lease is not None:
            self.hold(lease.job_id, since=asked)
        return lease

    def hold(self, job_id: str, *, since: float) -> None:
        """Renew this job from now on (leased to this process by its ``create`` or a
        steal, in a statement begun at ``since``, ``time.monotonic()``)."""
        self._held.add(job_id)
        self._granted[job_id] = since

    def time_left(self, job_id: str) -> float:
        """Seconds until this process's lease on the job lapses unless renewed (0: not held)."""
        granted = self._granted.get(job_id)
        if job_id not in self._held or granted is None:
            return 0.0
        return max(0.0, granted + self.lease_s - time.monotonic())

    def firm(self, job_id: str) -> bool:
        """Whether this process holds the job with at least a third of a lease to run (its
        renewals have not been failing): long enough to finish an act a taker would repeat."""
        return self.time_left(job_id) >= self.renew_every_s

    def drop(self, job_id: str) -> None:
        """No longer renew this job (it ended, or was lost)."""
        self._held.discard(job_id)
        self._granted.pop(job_id, None)

    async def release(self, job_id: str) -> None:
        self.drop(job_id)
        await self._store.release(job_id, self.holder)

    async def release_all(self) -> None:
        """At a graceful stop: every held job goes back to the others at once."""
        for job_id in list(self._held):
            try:
                await self.release(job_id)
            except Exception:
                logger.warning("could not release job %s", job_id, exc_info=True)

    def start(self) -> None:
        self._task = asyncio.create_task(self._renew_loop(), name="lease-renewal")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _renew_loop(self) -> None:
        failed = False
        while True:
            # After a failure (the store away), soon again: the leases are running out.
            await asyncio.sleep(min(self.renew_every_s, 0.5) if failed else self.renew_every_s)
            held = list(self._held)
            asked = time.monotonic()
            try:
                # One statement for every held job: the cost does not grow with the queue.
                renewed = await self._store.renew_all(held, self.holder, self.lease_s)
            except Exception as exc:
                if not failed:
                    logger.warning("could not renew %d leases: %s", len(held), exc)
                failed = True
                continue
            failed = False
            for job_id in held:
                if job_id in renewed:
                    if job_id in self._held:
                        self._granted[job_id] = asked
                elif job_id in self._held:
                    self.drop(job_id)
                    logger.warning("job %s: lease lost; another process may run it", job_id)
                    self._on_lost(job_id)
