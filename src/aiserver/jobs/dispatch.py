"""Dispatch: the queue of the jobs this process holds, and handing them to providers.

Oldest first; a job goes to the provider :func:`~aiserver.jobs.scheduler.pick_provider`
chooses while it has room (``max_running_per_provider``, its own ``load()``), fails at once
when no provider will ever take it, and fails with QUEUE_TIMEOUT when none took it in time.
Queued jobs hear their position change. The attempts themselves are
:mod:`aiserver.jobs.driver`'s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence

from aiserver.errors import ErrorKind, ServiceError
from aiserver.jobs.attempt import ActiveJob, Emit, with_first_cause
from aiserver.jobs.model import JobState, Progress, Stage
from aiserver.jobs.scheduler import (
    JobQueue,
    SchedulerSettings,
    pick_provider,
    refusal,
    waiting_reason,
)
from aiserver.providers.base import Provider

__all__ = ["Dispatcher", "Finish", "Launch"]

logger = logging.getLogger(__name__)

Finish = Callable[[ActiveJob, JobState, ServiceError | None], "asyncio.Task[None]"]
Launch = Callable[[ActiveJob, Provider], None]


class Dispatcher:
    """The queue and its pass: wakes on :meth:`wake` (submit, job end, cancel), and now and
    then while jobs wait (providers may come online; queue deadlines)."""

    def __init__(
        self,
        providers: Sequence[Provider],
        settings: SchedulerSettings,
        active: Mapping[str, ActiveJob],
        *,
        launch: Launch,
        finish: Finish,
        emit: Emit,
    ) -> None:
        self._providers = list(providers)
        self._settings = settings
        self._active = active
        self._launch = launch
        self._finish_job = finish
        self._emit_event = emit
        self.queue = JobQueue()
        self.running: dict[str, int] = {p.name: 0 for p in self._providers}
        """Attempts handed to each provider and not ended (counted at launch)."""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="job-dispatcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def wake(self) -> None:
        self._wake.set()

    def enqueue(self, active: ActiveJob, since: float) -> None:
        """Queue a job; its queue timeout counts from ``since`` (``time.monotonic()``)."""
        active.queued_at = since
        self.queue.push(active.job.id, since)

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                self._expire_queued()
                self._dispatch()
            except Exception:
                logger.exception("scheduler pass failed")
            timeout = self._next_pass_in()
            if timeout is None:
                await self._wake.wait()
                continue
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _next_pass_in(self) -> float | None:
        """Nothing queued: sleep until woken. Else recheck providers now and then, and wake
        up for the earliest queue deadline."""
        deadline = self.queue.next_deadline(self._settings.queue_timeout_s)
        if deadline is None:
            return None
        until_deadline = max(deadline - time.monotonic(), 0.0)
        return min(self._settings.recheck_interval_s, until_deadline)

    def _expire_queued(self) -> None:
        timeout = self._settings.queue_timeout_s
        for job_id in self.queue.expired(time.monotonic(), timeout):
            self.queue.remove(job_id)
            error = ServiceError(
                ErrorKind.DEADLINE_EXCEEDED,
                "QUEUE_TIMEOUT",
                f"no provider took the job within {timeout:g} s",
                metadata={"queue_timeout_s": f"{timeout:g}"},
            )
            active = self._active[job_id]
            self._finish_job(
                active, JobState.FAILED, with_first_cause(error, active.record.retries)
            )

    def _dispatch(self) -> None:
        capacity = self._settings.max_running_per_provider
        dispatched = False
        for job_id in self.queue:
            if all(self.running[p.name] >= capacity for p in self._providers):
                break
            active = self._active[job_id]
            if active.not_before > time.monotonic():
                continue
            provider = pick_provider(
                self._providers, active.job.task, active.job.spec, self.running, capacity
            )
            if provider is None:
                # Fail at once what no provider will ever take (e.g. a model no agent has)
                # rather than at the queue timeout; otherwise wait, others may still fit.
                error = refusal(self._providers, active.job.task, active.job.spec)
                if error is not None:
                    self._finish_job(active, JobState.FAILED, error)
                else:
                    why = waiting_reason(self._providers, active.job.task, active.job.spec)
                    self._set_waiting(active, why)
                continue
            self.queue.remove(job_id)
            self._launch(active, provider)
            dispatched = True
        if dispatched:
            self.publish_positions()

    def publish_positions(self) -> None:
        for job_id, position in self.queue.positions().items():
            active = self._active[job_id]
            if active.last_position != position:
                active.last_position = position
                waiting = active.job.waiting
                self._emit_event(
                    active, Progress(Stage.QUEUED, queue_position=position, waiting=waiting)
                )

    def _set_waiting(self, active: ActiveJob, why: str) -> None:
        """Tell watchers (events, GetJob) why a queued job is not taken, when that changes."""
        if active.job.waiting == why:
            return
        active.job.waiting = why
        position = self.queue.position(active.job.id)
        active.last_position = position
        self._emit_event(active, Progress(Stage.QUEUED, queue_position=position, waiting=why))
