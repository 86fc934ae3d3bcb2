"""A held job's writes to the job store: its saves, the final write, and riding out outages.

On the embedded store a save is the record alone. On a shared store (docs/scale-out.md)
every write is fenced by this process's lease (``holder``), carries the events emitted since
the last write (:mod:`.event_log`), and is tried again while the database is away and the
lease has time left; the final write also stores the Finished event, releases the lease and
prunes superseded progress rows, in one statement.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

from aiserver.jobs.attempt import ActiveJob, ActiveJobs
from aiserver.jobs.event_codec import PROGRESS, encode_event
from aiserver.jobs.event_log import EventLog
from aiserver.jobs.events import EventHub
from aiserver.jobs.leases import LeaseKeeper
from aiserver.jobs.model import Finished, Job
from aiserver.jobs.store import JobRecord, JobStore, LeaseLost, NewEvent
from aiserver.outage import backend_outage

__all__ = ["SEQUENCE_BLOCK", "JobWrites"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

SEQUENCE_BLOCK = 256
"""Event sequences reserved in the store per write. Progress events are not stored one by one;
after a crash, numbering resumes past the reservation, so no number is ever used twice."""


class JobWrites:
    """Stores held jobs' records (and, on a shared store, their events)."""

    def __init__(
        self,
        store: JobStore,
        hub: EventHub,
        active: ActiveJobs,
        leases: LeaseKeeper | None,
        log: EventLog | None,
    ) -> None:
        self._store = store
        self._hub = hub
        self._active = active
        self._leases = leases
        self._log = log

    @property
    def holder(self) -> str | None:
        """Fences every write of a held job on a shared store (``LeaseLost`` once lost)."""
        return self._leases.holder if self._leases is not None else None

    def last_sequence(self, active: ActiveJob) -> int:
        """The last event sequence given to the job (emitted or stored)."""
        return self._hub.last_sequence(active.job.id, default=active.record.last_sequence)

    async def save(self, active: ActiveJob) -> None:
        """Store the record, reserving sequences for the events that follow the write."""
        active.job.updated = datetime.now(UTC)
        active.record.last_sequence = max(
            active.record.last_sequence, self.last_sequence(active) + SEQUENCE_BLOCK
        )
        if self._log is None:
            await self._store.save(active.record)
            return
        holder = self.holder
        record = active.record
        log = self._log
        # With the events emitted since the last write, in its transaction.
        await self.ride_out(
            active,
            lambda: log.write(
                active.job.id,
                lambda events, announce: self._store.save(
                    record, holder=holder, events=events, announce=announce
                ),
            ),
        )

    async def ride_out(
        self, active: ActiveJob, write: Callable[[], Awaitable[_T]], *, past_lease: bool = False
    ) -> _T:
        """``write()``, tried again while the store is away (an outage) and this process's
        lease on the job has time left: a short outage (a database restart) then costs the
        job a pause, not a drop (a taker would re-run or repeat its prompt). Past the lease,
        or once the job is no longer held here, the outage is raised (the caller drops it).
        The bound is the lease left at the first failure: renewals that still get through
        (a failure only some writes see, the bucket's) do not stretch it for ever.

        ``past_lease``: for a write whose fence settles it: the final one, which may have
        committed with its answer lost; only the store can tell (``store_end``). It is tried
        until the store answers (a success, or an error other than an outage) or ``stop()``
        cancels the task: the job stays held here while it ends, so no other bound applies.

        An outage is logged once per write (and its end once), not at every try."""
        delay = 0.1
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            try:
                result = await write()
            except Exception as exc:
                if self._leases is None or backend_outage(exc) is None:
                    raise
                if self._active.get(active.job.id) is not active:
                    raise
                first = deadline is None
                if deadline is None:
                    deadline = loop.time() + self._leases.time_left(active.job.id)
                if not past_lease and deadline - loop.time() <= delay:
                    raise
                if first:
                    logger.info(
                        "job %s: store unreachable; writing again (%s)",
                        active.job.id,
                        exc,
                    )
            else:
                if deadline is not None:
                    logger.info("job %s: store reachable again; written", active.job.id)
                return result
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def store_end(
        self, active: ActiveJob, final: Job, deliveries: Sequence[tuple[str, bytes]]
    ) -> bool:
        """The final write; on a shared store in one statement with the events not yet
        stored, the Finished event (the sequence the hub gives it next), the lease's release
        and the prune of superseded progress rows. Returns whether those went with it."""
        record = active.record
        holder = self.holder
        if self._log is None:
            await self._store.save(record, holder=holder, outbox=deliveries)
            return False
        if not self._hub.is_open(final.id):  # stopped: no Finished goes out
            # Still the job's last write: a held progress (and its timer) goes with the log.
            await self._log.write(
                final.id,
                lambda events, announce: self._store.save(
                    record, holder=holder, outbox=deliveries, events=events, announce=announce
                ),
                final=True,
            )
            return False
        finished = NewEvent(record.last_sequence, *encode_event(Finished(final)))

        async def write(events: Sequence[NewEvent], _announce: bool) -> None:
            await self._store.save(
                record,
                holder=holder,
                outbox=deliveries,
                events=[*events, finished],
                release=True,
                prune=PROGRESS,
            )

        log = self._log

        async def end() -> None:
            try:
                await log.write(final.id, write, final=True)
            except LeaseLost:
                # Fenced off: another process holds the job, or this very write committed
                # before (its answer lost to an outage) and released the lease. Only the
                # latter leaves the row ended as this one ends it.
                if not await self._stored_end_is(record):
                    raise
                log.forget(final.id)
                logger.info("job %s: its end was stored by a write whose answer was lost", final.id)

        # Past the lease too: a write that committed (its answer lost) released the lease, so
        # no taker comes, and dropping the job here would lose its Finished and local hooks;
        # one that did not commit is fenced off once a taker holds the job (LeaseLost).
        await self.ride_out(active, end, past_lease=True)
        return True

    async def _stored_end_is(self, record: JobRecord) -> bool:
        """Whether the stored row already ends the job as ``record`` does: the same final
        state, end time (this process's clock, to the microsecond: a taker's end differs)
        and Finished sequence."""
        stored = await self._store.get(record.job.id)
        return (
            stored is not None
            and stored.job.state is record.job.state
            and stored.job.ended == record.job.ended
            and stored.last_sequence == record.last_sequence
        )
