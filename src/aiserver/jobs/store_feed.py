"""Every job's changes, from every coordinator, for event taps (WatchJobs, the console's list).

The event hub taps only the jobs this process holds. On a shared store the others' events are
announced (``pg_notify``) as they are stored: while at least one tap is registered, this feed
collects the announced jobs and every ``interval_s`` reads their new events and records in two
statements, however many jobs moved (:meth:`~aiserver.jobs.store.JobStore.events_after`,
:meth:`~aiserver.jobs.store.JobStore.records`), then hands each event with its job to the taps.
Nothing runs while no tap is registered. A list view tolerates what this costs in freshness:
stored progress is already coalesced (0.5 s), and the taps throttle it again.

The others announce every job's events only while some coordinator follows them all
(``announcements(every_job=True)``, which they notice within a second or two): until then
their writes may go unannounced, so once that time is past the feed reads, once, every job
that may have written meanwhile (unfinished when it opened, or created since).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from aiserver.jobs.event_codec import FINISHED, decode_event
from aiserver.jobs.events import JobTap, snapshot
from aiserver.jobs.model import EventKind, Finished, JobEvent
from aiserver.jobs.store import AnnouncementStream, JobQuery, JobStore
from aiserver.outage import backend_outage

__all__ = ["StoreFeed"]

logger = logging.getLogger(__name__)

_CLOCK_SKEW = timedelta(seconds=1)
_NOTICED_S = 2.5
"""By then every other coordinator announces every job's events (it counts the followers at
most once a second and trusts no count older than 2 s)."""


class StoreFeed:
    """Events of the jobs held elsewhere (``held_here`` says which are not), for taps."""

    def __init__(
        self,
        store: JobStore,
        held_here: Callable[[str], bool],
        *,
        interval_s: float = 0.25,
    ) -> None:
        self._store = store
        self._held_here = held_here
        self._interval = interval_s
        self._taps: list[JobTap] = []
        self._task: asyncio.Task[None] | None = None
        self._last: dict[str, int] = {}  # per job: the last sequence handed to the taps
        self._since = datetime.now(UTC)
        # Announcements were lost (LISTEN re-opened): jobs never seen here may have come
        # and gone meanwhile, so the table is read again as at the start.
        self._catch_up = False

    def tap(self, callback: JobTap) -> Callable[[], None]:
        """Call ``callback`` with each event of a job held elsewhere, from now on; returns
        its remover."""
        self._taps.append(callback)
        if self._task is None:
            # Other hosts' clocks may run a little behind: a second of margin.
            self._since = datetime.now(UTC) - _CLOCK_SKEW
            self._task = asyncio.create_task(self._run(), name="job-store-feed")

        def remove() -> None:
            self._taps.remove(callback)
            if not self._taps and self._task is not None:
                self._task.cancel()
                self._task = None
                self._last.clear()

        return remove

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        listener = await self._listen()
        if listener is None:
            return
        moved: set[str] = set()  # jobs announced since the last read
        collect = asyncio.create_task(self._collect(listener, moved))
        loop = asyncio.get_running_loop()
        noticed_at = loop.time() + _NOTICED_S
        try:
            unnoticed: set[str] | None = {r.job.id for r in await self._store.unfinished()}
        except Exception:
            logger.warning("reading the unfinished jobs failed", exc_info=True)
            unnoticed = set()
        try:
            while True:
                await asyncio.sleep(self._interval)
                if unnoticed is not None and loop.time() >= noticed_at:
                    try:
                        unnoticed |= await self._created_since()
                    except Exception:
                        logger.warning("reading the new jobs failed", exc_info=True)
                    moved |= {j for j in unnoticed if not self._held_here(j)}
                    unnoticed = None
                if self._catch_up:
                    self._catch_up = False
                    try:
                        found = {r.job.id for r in await self._store.unfinished()}
                        found |= await self._created_since()
                    except Exception:
                        self._catch_up = True  # next pass
                        logger.warning("reading the jobs after a resync failed", exc_info=True)
                    else:
                        moved |= {j for j in found if not self._held_here(j)}
                if moved:
                    batch = set(moved)
                    moved.clear()
                    try:
                        await self._read(batch)
                    except Exception:
                        # Read again next time (the store away): their rows are still there.
                        moved.update(batch)
                        logger.warning(
                            "reading other coordinators' job changes failed", exc_info=True
                        )
        finally:
            collect.cancel()
            await asyncio.gather(collect, return_exceptions=True)
            await listener.aclose()

    async def _listen(self) -> AnnouncementStream | None:
        """The store's announcements; while the store is away, asked again with backoff
        (giving up would leave every WatchJobs stream here blind to other coordinators'
        jobs for good). None once the store is closed."""
        delay = 0.25
        while True:
            try:
                return await self._store.announcements(every_job=True)
            except Exception as exc:
                if backend_outage(exc) is None:  # the store is closing
                    logger.warning("cannot follow other coordinators' jobs", exc_info=True)
                    return None
                logger.warning("cannot follow other coordinators' jobs yet: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _created_since(self) -> set[str]:
        """The jobs created since the first tap (newest first, a page at a time)."""
        found: set[str] = set()
        token = ""
        while True:
            jobs, token = await self._store.query(JobQuery(), page_size=100, page_token=token)
            found.update(j.id for j in jobs if j.created >= self._since)
            if not token or not jobs or jobs[-1].created < self._since:
                return found

    async def _collect(self, listener: AnnouncementStream, moved: set[str]) -> None:
        async for announcement in listener:
            if announcement.kind == "event" and not self._held_here(announcement.job_id):
                moved.add(announcement.job_id)
            elif announcement.kind == "resync":
                # Announcements were lost (the LISTEN connection was re-opened): the jobs
                # followed so far may have moved meanwhile.
                moved.update(j for j in self._last if not self._held_here(j))
                self._catch_up = True

    async def _read(self, batch: set[str]) -> None:
        # A job seen for the first time is read whole (one announcement may stand for
        # several rows), its rows from before the first tap left out.
        after = {job_id: self._last.get(job_id, 0) for job_id in batch}
        rows = [
            r
            for r in await self._store.events_after(after)
            if r.job_id in self._last or r.created >= self._since
        ]
        if not rows:
            return
        records = {r.job.id: r for r in await self._store.records({r.job_id for r in rows})}
        for row in rows:
            record = records.get(row.job_id)
            if record is None or row.sequence <= self._last.get(row.job_id, 0):
                continue
            self._last[row.job_id] = row.sequence
            kind: EventKind | None
            if row.kind == FINISHED:
                kind = Finished(snapshot(record.job))
                self._last.pop(row.job_id, None)
            else:
                kind = decode_event(row.kind, row.payload)
            if kind is None:
                continue
            event = JobEvent(row.job_id, row.sequence, row.created, kind)
            for callback in list(self._taps):
                try:
                    callback(event, record.job)
                except Exception:
                    logger.exception("job %s: an event tap failed", row.job_id)
