"""A held job's writes to the store, in order, with its events folded into them.

Watchers on other processes read the stored events (:mod:`aiserver.jobs.store_watch`) as
"everything after the last sequence I saw", so a row committed out of order would be skipped;
and a record written late would overwrite a newer one. So each job's writes form one chain:
a write starts when the job's previous one has ended.

Events do not get a transaction of their own when a write of their job comes anyway: they wait
in the job's buffer and go into the next ``save`` (the same statement on PostgreSQL). A buffer
nobody saves is flushed on a timer: ``event_delay_s`` after a replayable event (accepted,
output, text, retry), and at most one progress row per ``progress_interval_s`` otherwise.
Consecutive progress events are coalesced to the latest, and a progress event waits for its
timer even when a save comes first (a later progress or the end supersedes it until then: a
short job stores none, rather than rows pruned at its end). A write that fails puts its events
back (the stores insert events idempotently), so a later write or the timer stores them.

A write with events is announced (NOTIFY) when it holds one other than progress, or when the
job's last announcement is ``announce_every_s`` old: watchers elsewhere read every row after
their last at the next announcement, so progress-only writes need not wake them each time.
Each notification costs every listening coordinator's backend a transaction: announced per
write, a job cost 4 of them per coordinator, growing with the number of coordinators.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from aiserver.jobs.event_codec import encode_event
from aiserver.jobs.model import JobEvent, Progress
from aiserver.jobs.store import JobStore, NewEvent

__all__ = ["EventLog", "stored_event"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
Write = Callable[[Sequence[NewEvent], bool], Awaitable[_T]]
"""A store write given the events to store with it and whether to announce them."""


def stored_event(event: JobEvent) -> NewEvent:
    kind, payload = encode_event(event.kind)
    return NewEvent(event.sequence, kind, payload)


@dataclass(slots=True)
class _JobLog:
    tail: asyncio.Future[None] | None = None
    """Ends with the job's last write (the next one waits for it)."""
    pending: list[JobEvent] = field(default_factory=list)
    last_progress_at: float = -1e9
    last_announced_at: float = -1e9
    timer: asyncio.TimerHandle | None = None


class EventLog:
    """Per-job ordered writes: :meth:`write` (a save with the buffered events) and
    :meth:`record` (an event for the next write); :meth:`drain` flushes everything."""

    def __init__(
        self,
        store: JobStore,
        *,
        progress_interval_s: float = 0.5,
        event_delay_s: float = 0.5,
        announce_every_s: float = 1.0,
        holder: str | None = None,
    ) -> None:
        self._store = store
        # The events a timer flushes are stored only while this process holds the job (a
        # save is fenced the same way): after a steal the old holder's late progress goes.
        self._holder = holder
        self._interval = progress_interval_s
        self._delay = event_delay_s
        self._announce_every_s = announce_every_s
        self._jobs: dict[str, _JobLog] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def record(self, event: JobEvent) -> None:
        """Buffer ``event`` for the job's next write (or the timer)."""
        log = self._jobs.setdefault(event.job_id, _JobLog())
        progress = isinstance(event.kind, Progress)
        if progress and log.pending and isinstance(log.pending[-1].kind, Progress):
            log.pending[-1] = event  # superseded before anyone stored it
        else:
            log.pending.append(event)
        if progress:
            since = time.monotonic() - log.last_progress_at
            self._arm(event.job_id, log, max(self._interval - since, self._delay, 0.0))
        else:
            self._arm(event.job_id, log, self._delay)

    async def write(self, job_id: str, write: Write[_T], *, final: bool = False) -> _T:
        """Run ``write`` with the job's buffered events once its previous write ended.

        ``final``: the job's last write (its Finished goes with it): buffered progress is
        dropped (the finished job's superseded progress is pruned anyway) and the job's
        buffer with it."""
        log = self._jobs.setdefault(job_id, _JobLog())
        previous = log.tail
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        log.tail = mine
        try:
            if previous is not None and not previous.done():
                await asyncio.wait({previous})
            taken = log.pending
            log.pending = []
            if final:
                taken = [e for e in taken if not isinstance(e.kind, Progress)]
            elif log.timer is not None and log.timer.when() > asyncio.get_running_loop().time():
                # Progress after the last other event waits for its timer: a later progress
                # or the final write supersedes it first, so a short job stores none (it
                # was a row inserted and pruned at the end, and the rows are what a write
                # costs). Only a suffix waits: stored rows keep the sequence order.
                cut = len(taken)
                while cut > 0 and isinstance(taken[cut - 1].kind, Progress):
                    cut -= 1
                taken, log.pending = taken[:cut], taken[cut:]
            if log.timer is not None and not log.pending:
                log.timer.cancel()
                log.timer = None
            now = time.monotonic()
            if any(isinstance(e.kind, Progress) for e in taken):
                log.last_progress_at = now
            announce = final or any(not isinstance(e.kind, Progress) for e in taken)
            if taken and (announce or now - log.last_announced_at >= self._announce_every_s):
                announce = True
                log.last_announced_at = now
            try:
                result = await write([stored_event(e) for e in taken], announce)
            except BaseException:
                if taken and self._jobs.get(job_id) is log:
                    log.pending[:0] = taken  # stored later (inserts are idempotent)
                    self._arm(job_id, log, self._delay)
                raise
            if final:
                self.forget(job_id)
            return result
        finally:
            mine.set_result(None)
            if log.tail is mine:
                log.tail = None

    def forget(self, job_id: str) -> None:
        """Stop logging a job this process no longer runs (a write under way still ends)."""
        log = self._jobs.pop(job_id, None)
        if log is not None and log.timer is not None:
            log.timer.cancel()
            log.timer = None

    async def drain(self, timeout_s: float) -> None:
        for job_id, log in list(self._jobs.items()):
            if log.timer is not None:
                log.timer.cancel()
                log.timer = None
            if log.pending:
                self._flush(job_id)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    def _arm(self, job_id: str, log: _JobLog, delay: float) -> None:
        if log.timer is not None:
            if log.timer.when() <= asyncio.get_running_loop().time() + delay:
                return  # due sooner anyway
            log.timer.cancel()
        log.timer = asyncio.get_running_loop().call_later(delay, self._flush, job_id)

    def _flush(self, job_id: str) -> None:
        log = self._jobs.get(job_id)
        if log is None:
            return
        log.timer = None
        store = self._store

        async def append() -> None:
            try:
                await self.write(
                    job_id,
                    lambda events, announce: store.append_events(
                        job_id, events, announce=announce, holder=self._holder
                    ),
                )
            except Exception:
                logger.warning("could not store events of job %s", job_id, exc_info=True)

        task = asyncio.create_task(append())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
