"""Jobs that change hands between coordinators on a shared store (docs/scale-out.md).

A coordinator takes on jobs nobody holds (adoption: their holder died or stopped), steals
queued work another coordinator has not started while it idles, cancels jobs held elsewhere
through the store, and hears cancels requested on other coordinators. The store's leases and
compare-and-set writes decide every hand-over; this module only asks and acts on the answer.
What a job taken on becomes (queued, resumed, retried, cancelled) is the manager's to decide:
it is handed back through ``recover`` and ``cancel_here``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from aiserver.jobs.attempt import ActiveJob, ActiveJobs
from aiserver.jobs.leases import LeaseKeeper
from aiserver.jobs.model import Finished, Job, JobState
from aiserver.jobs.scheduler import SchedulerSettings, could_serve
from aiserver.jobs.store import AnnouncementStream, JobRecord, JobStore, Lease, QueueRanks
from aiserver.jobs.store_watch import StoreWatch
from aiserver.providers.base import Provider
from aiserver.tasks import TaskKind, TaskSpec

__all__ = ["ADOPT_BATCH", "STEAL_LOOKAHEAD", "Takeover", "TakeoverHost"]

logger = logging.getLogger(__name__)

ADOPT_BATCH = 100
"""Jobs adopted in one pass at most (the next pass, a third of a lease later, takes more)."""
STEAL_LOOKAHEAD = 8
"""Jobs offered to an idle process at once: it takes the oldest one it can start."""


class TakeoverHost(Protocol):
    """What the job manager lends the hand-overs."""

    @property
    def running(self) -> bool:
        """Started and not stopping: adoption passes go on."""

    @property
    def accepting(self) -> bool:
        """Taking new work (not quiescing): stealing goes on."""

    def can_start(self, task: TaskKind, spec: TaskSpec) -> bool:
        """Whether a provider here starts this job now."""

    async def recover(self, records: Sequence[JobRecord]) -> None:
        """Take these unfinished jobs on: queue, resume or retry them."""

    async def cancel_here(self, active: ActiveJob) -> None:
        """Cancel a job this process holds."""

    def lease_lost(self, job_id: str) -> None:
        """Another process holds this job now."""

    async def withdraw(self, job: Job) -> None:
        """Take the prompt a dead holder left of this job off its agent."""


class Takeover:
    """Adoption, stealing and cross-coordinator cancels of one coordinator."""

    def __init__(
        self,
        store: JobStore,
        leases: LeaseKeeper,
        active: ActiveJobs,
        providers: Sequence[Provider],
        settings: SchedulerSettings,
        host: TakeoverHost,
    ) -> None:
        self._store = store
        self._leases = leases
        self._active = active
        self._providers = providers
        self._settings = settings
        self._host = host

    def _servable(self) -> list[TaskKind]:
        return [t for t in TaskKind if could_serve(self._providers, t)]

    async def adopt_loop(self) -> None:
        """Adopt what nobody holds, every third of a lease, while running."""
        while True:
            try:
                for _ in range(ADOPT_BATCH):
                    if not self._host.running or await self.adopt() is None:
                        break
            except Exception:
                logger.exception("adoption pass failed")
            await asyncio.sleep(self._leases.renew_every_s)

    async def adopt(self, job_id: str | None = None) -> ActiveJob | None:
        """Lease one job nobody holds (that one, or the oldest this process can serve) and
        take it on: queued, resumed from its checkpoint, retried, or cancelled as requested."""
        if job_id is None:
            tasks = self._servable()
            if not tasks:
                return None
            lease = await self._leases.adopt(tasks)
        else:
            lease = await self._leases.take(job_id)
        if lease is None:
            return None
        return await self._take_on(lease, "taken over" if lease.takeover else "free")

    async def _take_on(self, lease: Lease, how: str) -> ActiveJob | None:
        """Run a job whose lease this process just got: queued, resumed from its checkpoint,
        retried, or cancelled as requested."""
        held = self._active.get(lease.job_id)
        if held is not None:  # its lease had lapsed unnoticed; this process still runs it
            return held
        record = await self._store.get(lease.job_id)
        if record is None or record.job.state.terminal:
            await self._leases.release(lease.job_id)
            return None
        logger.info("job %s: adopted (%s)", lease.job_id, how)
        # Its last holder may have stored events past its stored reservation (they are
        # appended apart from the record): number after them, never reuse one.
        later = await self._store.events(lease.job_id, after=record.last_sequence)
        if later:
            record.last_sequence = later[-1].sequence
        cancel = await self._store.cancel_requested(lease.job_id)
        if cancel:
            # Its prompt may still be on an agent, left by a holder that died: withdraw it.
            await self._host.withdraw(record.job)
            record.job.state = JobState.QUEUED  # ended below, without running again
        await self._host.recover([record])
        active = self._active.get(lease.job_id)
        if active is not None and cancel and not active.finishing:
            await self._host.cancel_here(active)
        return active

    async def rank(self) -> QueueRanks:
        """The places of this process's queued jobs among every coordinator's."""
        return await self._store.queue_ranks(holder=self._leases.holder)

    async def check_held(self, job_id: str) -> None:
        """A job queued here that the store's ranking no longer shows held here: forget it
        if this process lost its lease (another coordinator stole it)."""
        if job_id not in self._active:
            return
        if await self._store.renew(job_id, self._leases.holder, self._leases.lease_s) is None:
            self._host.lease_lost(job_id)

    async def steal(self) -> bool:
        """Idle here (room, nothing queued): take over the oldest job that another live
        coordinator holds but has not started for ``steal_after_s`` and that a provider here
        starts now. The store's compare-and-set decides: the old holder's dispatch is fenced
        off (``LeaseLost``), so the job still runs once."""
        if not self._host.accepting:
            return False
        tasks = self._servable()
        if not tasks:
            return False
        holder = self._leases.holder
        offered = await self._store.stealable(
            holder, waited_s=self._settings.steal_after_s, tasks=tasks, limit=STEAL_LOOKAHEAD
        )
        for record, previous in offered:
            job = record.job
            if job.id in self._active or not self._host.can_start(job.task, job.spec):
                continue
            asked = time.monotonic()
            lease = await self._store.steal(
                job.id, holder, self._leases.lease_s, from_holder=previous
            )
            if lease is None:
                continue  # started, cancelled or taken meanwhile
            self._leases.hold(job.id, since=asked)
            return await self._take_on(lease, f"stolen from {previous}") is not None
        return False

    async def cancel_elsewhere(self, job_id: str) -> ActiveJob | None:
        """Cancel a job this process does not hold: store the request (its holder hears the
        announcement, an adopter reads it), take the job if nobody holds it, else wait for
        the holder to end it. Returns the job when it was taken here."""
        if not await self._store.request_cancel(job_id):
            return None  # it ended meanwhile
        adopted = await self.adopt(job_id)
        if adopted is not None:
            return adopted
        try:
            async with (
                asyncio.timeout(self._settings.cancel_timeout_s),
                # Closed on the way out: its announcement listener must not outlive it.
                contextlib.aclosing(
                    StoreWatch(
                        self._store,
                        job_id,
                        idle_recheck_s=0.5,
                        outage_s=self._settings.watch_outage_s,
                    )
                ) as watch,
            ):
                async for event in watch:
                    if isinstance(event.kind, Finished):
                        break
        except TimeoutError:
            logger.warning("job %s: its holder has not ended it yet; the request stays", job_id)
        return None

    async def hear_cancels(self, listener: AnnouncementStream) -> None:
        """A cancel requested on another process reaches the job here, if held here."""
        async for announcement in listener:
            try:
                if announcement.kind == "cancel":
                    targets = [announcement.job_id]
                elif announcement.kind == "resync":  # requests may have been missed
                    targets = list(self._active)
                else:
                    continue
                for job_id in targets:
                    active = self._active.get(job_id)
                    if active is None or active.finishing or active.cancel_reason == "user":
                        continue
                    if announcement.kind == "cancel" or await self._store.cancel_requested(job_id):
                        logger.info("job %s: cancel requested elsewhere", job_id)
                        await self._host.cancel_here(active)
            except Exception:
                logger.exception("handling a cancel announcement failed")
