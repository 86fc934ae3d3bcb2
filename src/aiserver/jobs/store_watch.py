"""Watching a job that another process runs: replay and live events from the store.

The protocol of docs/scale-out.md, "Events": listen first, then read the stored events and
the record, then on each announcement for the job (or ``resync``, or every
``idle_recheck_s`` as a safety net) read the rows after the last sequence seen. The stream
ends after ``Finished``, built from the final record. A job whose record is final but whose
``finished`` row never came (its process died between the two writes) ends after
``settle_s`` with a Finished made from the record.

:class:`Handover` is the stream of a watcher on the holder: the holder's live events, and when
the holder stops holding the job (another coordinator stole it, or its lease lapsed) the rest
from the store, after the last sequence it delivered, so the caller's stream goes on.

A watcher rides out a store outage up to ``outage_s`` (``AISERVER_WATCH_OUTAGE_S``): it reads
again from its last sequence once the store answers, so the stream neither misses nor
repeats an event; a longer outage ends it UNAVAILABLE (the client watches again).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime

from aiserver.jobs.event_codec import FINISHED, decode_event
from aiserver.jobs.events import Subscription, job_not_found, snapshot
from aiserver.jobs.model import Finished, Job, JobEvent
from aiserver.jobs.store import Announcement, AnnouncementStream, JobStore
from aiserver.outage import backend_outage

__all__ = ["Handover", "StoreWatch"]

logger = logging.getLogger(__name__)


class StoreWatch:
    """Async iterator of one job's events, read from the store; ends after Finished.

    An unreachable store (an outage, :func:`aiserver.outage.backend_outage`) does not end
    the stream: it reads again with backoff, from its last sequence (so nothing is missed
    or delivered twice), and fails with the outage only once the store has not answered
    for ``outage_s``."""

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        *,
        idle_recheck_s: float = 2.0,
        settle_s: float = 3.0,
        after: int = 0,
        outage_s: float = 30.0,
    ) -> None:
        """``after``: the last sequence the watcher has (0: replay from the first)."""
        self._store = store
        self._job_id = job_id
        self._idle_s = idle_recheck_s
        self._settle_s = settle_s
        self._outage_s = outage_s
        self._listener: AnnouncementStream | None = None
        self._next: asyncio.Future[Announcement] | None = None
        self._ready: deque[JobEvent] = deque()
        self._last = after
        self._started = False
        self._done = False
        self._failing_since: float | None = None  # monotonic: the store's first failure
        self._backoff_s = _FIRST_BACKOFF_S

    def __aiter__(self) -> StoreWatch:
        return self

    @property
    def buffered(self) -> int:
        return len(self._ready)

    async def __anext__(self) -> JobEvent:
        while not self._ready:
            if self._done:
                await self.aclose()
                raise StopAsyncIteration
            try:
                if not self._started:
                    await self._start()
                else:
                    if self._failing_since is None:  # after a failure: read at once
                        await self._wait()
                    await self._read()
            except Exception as exc:
                if backend_outage(exc) is None:
                    raise
                await self._ride_out(exc)
            else:
                self._failing_since = None
                self._backoff_s = _FIRST_BACKOFF_S
        return self._ready.popleft()

    async def _ride_out(self, exc: Exception) -> None:
        """Wait before reading again, or give up (raise ``exc``) past ``outage_s``."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            logger.info("job %s: watching through a store outage (%s)", self._job_id, exc)
        if now - self._failing_since >= self._outage_s:
            await self.aclose()
            raise exc
        await asyncio.sleep(self._backoff_s)
        self._backoff_s = min(self._backoff_s * 2, _MAX_BACKOFF_S)

    async def aclose(self) -> None:
        self._done = True
        self._ready.clear()
        if self._next is not None:
            self._next.cancel()
            self._next = None
        if self._listener is not None:
            listener, self._listener = self._listener, None
            await listener.aclose()

    async def _start(self) -> None:
        # Listening before the first read: nothing committed afterwards can be missed.
        if self._listener is None:
            self._listener = await self._store.announcements(watch=self._job_id)
        if await self._store.get(self._job_id) is None:
            await self.aclose()
            raise job_not_found(self._job_id)
        self._started = True
        await self._read()

    async def _wait(self) -> None:
        """Until an announcement concerns this job, or the idle recheck is due."""
        assert self._listener is not None
        listener = self._listener
        try:
            async with asyncio.timeout(self._idle_s):
                while True:
                    if self._next is None:
                        self._next = asyncio.ensure_future(anext(listener))
                    announcement = await asyncio.shield(self._next)
                    self._next = None
                    if announcement.job_id == self._job_id or announcement.kind == "resync":
                        return
        except TimeoutError:
            return
        except StopAsyncIteration:  # the store closed: read once more, then stop
            self._next = None
            self._done = True

    async def _read(self) -> None:
        """The rows after the last one delivered. Nothing is taken until every read it needs
        has answered: a read that fails is made again from the same place."""
        rows = await self._store.events(self._job_id, after=self._last)
        ready: list[JobEvent] = []
        for row in rows:
            if row.kind == FINISHED:
                record = await self._store.get(self._job_id)
                self._take(ready, row.sequence)
                if record is None:
                    self._done = True
                else:
                    self._emit_finished(record.job, row.sequence, row.created)
                return
            kind = decode_event(row.kind, row.payload)
            if kind is not None:
                ready.append(JobEvent(self._job_id, row.sequence, row.created, kind))
        if rows:
            self._take(ready, rows[-1].sequence)
            return
        record = await self._store.get(self._job_id)
        if record is None:
            self._done = True
            return
        job = record.job
        ended = job.ended or job.updated
        if job.state.terminal and _age_s(ended) >= self._settle_s:
            sequence = max(self._last, record.last_sequence) + 1
            self._emit_finished(job, sequence, ended)

    def _take(self, ready: list[JobEvent], last: int) -> None:
        self._ready.extend(ready)
        self._last = last

    def _emit_finished(self, job: Job, sequence: int, when: datetime) -> None:
        self._ready.append(JobEvent(self._job_id, sequence, when, Finished(snapshot(job))))
        self._done = True


_FIRST_BACKOFF_S = 0.25
_MAX_BACKOFF_S = 2.0


def _age_s(when: datetime) -> float:
    return (datetime.now(UTC) - when).total_seconds()


class Handover:
    """Events of a job held here (``local``), continued from the store (``follow(last)``)
    when ``local`` ends without Finished while ``elsewhere()`` says another process holds
    the job now."""

    def __init__(
        self,
        local: Subscription,
        follow: Callable[[int], StoreWatch],
        elsewhere: Callable[[], bool],
    ) -> None:
        self._local = local
        self._follow = follow
        self._elsewhere = elsewhere
        self._store: StoreWatch | None = None
        self._last = 0
        self._finished = False

    def __aiter__(self) -> Handover:
        return self

    async def __anext__(self) -> JobEvent:
        if self._store is None:
            try:
                event = await anext(self._local)
            except StopAsyncIteration:
                if self._finished or not self._elsewhere():
                    raise
                self._store = self._follow(self._last)
            else:
                self._last = max(self._last, event.sequence)
                self._finished = isinstance(event.kind, Finished)
                return event
        return await anext(self._store)

    async def aclose(self) -> None:
        await self._local.aclose()
        if self._store is not None:
            await self._store.aclose()
