"""Writes each job's events to the store, in order, off the caller's path.

Watchers on other processes read these rows (:mod:`aiserver.jobs.store_watch`). Rows of one
job are appended strictly in sequence order (each append waits for the previous one), because
a watcher reads "everything after the last sequence I saw": a row committed out of order
would be skipped. Progress is coalesced to one row per job per ``progress_interval_s``, the
latest one always written before any later event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from aiserver.jobs.event_codec import PROGRESS, encode_event
from aiserver.jobs.model import Finished, JobEvent, Progress
from aiserver.jobs.store import JobStore

__all__ = ["EventLog"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _JobLog:
    chain: asyncio.Task[None] | None = None
    last_progress_at: float = -1e9
    pending: JobEvent | None = None
    timer: asyncio.TimerHandle | None = None


class EventLog:
    """Per-job ordered appends to ``job_events``; :meth:`drain` waits for all of them."""

    def __init__(self, store: JobStore, *, progress_interval_s: float = 0.5) -> None:
        self._store = store
        self._interval = progress_interval_s
        self._jobs: dict[str, _JobLog] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def record(self, event: JobEvent) -> None:
        """Queue ``event`` for storage (progress may be coalesced)."""
        log = self._jobs.setdefault(event.job_id, _JobLog())
        if isinstance(event.kind, Progress):
            now = time.monotonic()
            if log.timer is None and now - log.last_progress_at >= self._interval:
                log.last_progress_at = now
                self._write(log, event)
            else:
                log.pending = event
                if log.timer is None:
                    delay = max(self._interval - (now - log.last_progress_at), 0.0)
                    log.timer = asyncio.get_running_loop().call_later(
                        delay, self._flush, event.job_id
                    )
            return
        if log.timer is not None:
            log.timer.cancel()
            log.timer = None
        if log.pending is not None and not isinstance(event.kind, Finished):
            self._write(log, log.pending)  # a lower sequence: it goes first
        log.pending = None
        self._write(log, event)
        if isinstance(event.kind, Finished):
            del self._jobs[event.job_id]
            self._chain(log, self._prune(event.job_id))

    def forget(self, job_id: str) -> None:
        """Stop logging a job this process no longer runs (what is queued still goes)."""
        log = self._jobs.pop(job_id, None)
        if log is not None and log.timer is not None:
            log.timer.cancel()

    async def drain(self, timeout_s: float) -> None:
        for log in list(self._jobs.values()):
            if log.timer is not None:
                log.timer.cancel()
                log.timer = None
            if log.pending is not None:
                self._write(log, log.pending)
                log.pending = None
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    def _flush(self, job_id: str) -> None:
        log = self._jobs.get(job_id)
        if log is None:
            return
        log.timer = None
        if log.pending is not None:
            log.last_progress_at = time.monotonic()
            self._write(log, log.pending)
            log.pending = None

    def _write(self, log: _JobLog, event: JobEvent) -> None:
        kind, payload = encode_event(event.kind)
        store = self._store

        async def append() -> None:
            await store.append_event(event.job_id, event.sequence, kind, payload)

        self._chain(log, append())

    async def _prune(self, job_id: str) -> None:
        await self._store.prune_events(job_id, PROGRESS)

    def _chain(self, log: _JobLog, step: Coroutine[Any, Any, None]) -> None:
        previous = log.chain

        async def run() -> None:
            if previous is not None:
                await asyncio.wait({previous})
            try:
                await step
            except Exception:
                logger.warning("could not store an event", exc_info=True)

        task = asyncio.create_task(run())
        log.chain = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
