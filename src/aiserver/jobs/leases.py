"""This process's leases on the jobs it holds (docs/scale-out.md, "Who owns a job").

A coordinator on a shared job store holds a lease on every job it accepted or adopted, queued
or running, and renews them every third of the lease. A renewal that fails means another
process may have taken the job over: the manager is told (``on_lost``) and forgets it.
"""

from __future__ import annotations

import asyncio
import logging
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
        self._task: asyncio.Task[None] | None = None

    @property
    def renew_every_s(self) -> float:
        return self.lease_s / 3

    async def take(self, job_id: str) -> Lease | None:
        """Lease this job if nobody holds it (or its holder's lease lapsed)."""
        lease = await self._store.claim(self.holder, self.lease_s, job_id=job_id)
        if lease is not None:
            self._held.add(job_id)
        return lease

    async def adopt(self, tasks: Collection[TaskKind]) -> Lease | None:
        """Lease the oldest job of these tasks that nobody holds: left by a process that
        died or stopped."""
        lease = await self._store.claim(self.holder, self.lease_s, tasks=tasks)
        if lease is not None:
            self._held.add(lease.job_id)
        return lease

    def hold(self, job_id: str) -> None:
        """Renew this job from now on (leased to this process by its ``create``)."""
        self._held.add(job_id)

    def drop(self, job_id: str) -> None:
        """No longer renew this job (it ended, or was lost)."""
        self._held.discard(job_id)

    async def release(self, job_id: str) -> None:
        self._held.discard(job_id)
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
        while True:
            await asyncio.sleep(self.renew_every_s)
            held = list(self._held)
            try:
                # One statement for every held job: the cost does not grow with the queue.
                renewed = await self._store.renew_all(held, self.holder, self.lease_s)
            except Exception:
                logger.warning("could not renew %d leases", len(held), exc_info=True)
                continue
            for job_id in held:
                if job_id not in renewed and job_id in self._held:
                    self._held.discard(job_id)
                    logger.warning("job %s: lease lost; another process may run it", job_id)
                    self._on_lost(job_id)
