"""Dispatch: the queue of the jobs this process holds, and handing them to providers.

Oldest first; a job goes to the provider :func:`~aiserver.jobs.scheduler.pick_provider`
chooses while it has room (``max_running_per_provider``, its own ``load()``), fails at once
when no provider will ever take it, and fails with QUEUE_TIMEOUT when none took it in time.
Queued jobs hear their position change: at once when they enter the queue or move back,
at most every ``position_interval_s`` when they move up (every start moves each job behind
it; announcing each move was an event per waiting job per start). The attempts themselves
are :mod:`aiserver.jobs.driver`'s.

On a shared store (:class:`Shared`) this queue is this process's part of one queue: positions
are places among every coordinator's queued jobs (:mod:`.shared_positions`), and a pass that
finds this process idle - room on a provider, nothing queued - asks to steal a job another
coordinator holds but cannot start (``steal``, the manager's: the store decides who wins).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

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
from aiserver.jobs.shared_positions import Rank, SharedPositions
from aiserver.providers.base import Provider
from aiserver.tasks import TaskKind, TaskSpec

__all__ = ["Dispatcher", "Finish", "Launch", "Shared"]

logger = logging.getLogger(__name__)

Finish = Callable[[ActiveJob, JobState, ServiceError | None], "asyncio.Future[None]"]
Launch = Callable[[ActiveJob, Provider], None]


@dataclass(frozen=True, slots=True)
class Shared:
    """The dispatcher's part in the one queue of a shared store (the manager's callables)."""

    rank: Rank
    """Places of the queued jobs held here among every queued job (one store statement)."""
    check: Callable[[str], Awaitable[None]]
    """A job queued here that the store no longer shows as held here: verify the lease, and
    forget the job if another process took it."""
    steal: Callable[[], Awaitable[bool]]
    """Take one job another coordinator holds but has not started; whether one came."""


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
        shared: Shared | None = None,
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
        self._shared = shared
        self._positions = (
            SharedPositions(shared.rank, interval_s=settings.rank_interval_s)
            if shared is not None
            else None
        )
        self._next_steal = 0.0
        self._announced: dict[str, float] = {}
        """When each queued job's place was last told (its Accepted event included)."""
        self._moved = False
        """The queue changed since positions were last published."""
        self._publish_due = math.inf
        """When the earliest move held back by ``position_interval_s`` is due."""
        self._examined: dict[str, frozenset[tuple[str, int]]] = {}
        """Queued jobs a pass found no provider for (and asked for a refusal and a waiting
        reason) since ``_examined_until``, with the providers that had room then (and their
        capacities). A later pass skips such a job while no other provider has room and none
        changed its capacity (agents online): with a deep queue each pass costs the new jobs,
        not the whole queue (a ComfyUI pool's ``can_run`` checks every agent, a fallback's
        asks its primaries too), and what no provider will ever take still fails at once."""
        self._examined_until = 0.0
        self.passes = 0
        """Passes of the loop so far (for tests and metrics)."""

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="job-dispatcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def wake(self) -> None:
        """A pass soon (a job queued or ended, a cancel). None while nothing is queued here:
        it would find nothing to do (each end of a job woke the loop's task for that); on a
        shared store a pass may also steal work, so it always runs."""
        if self.queue or self._shared is not None:
            self._wake.set()

    def submitted(self) -> None:
        """A job was just queued. With nothing ahead of it (no backlog: the usual case) it
        is dispatched now, in this step, rather than by the loop's task woken for it; else,
        or when no provider took it, a pass soon."""
        if self._shared is None and self._task is not None and len(self.queue) == 1:
            try:
                self._dispatch()
            except Exception:
                logger.exception("scheduler pass failed")
        self.wake()

    def enqueue(self, active: ActiveJob, since: float) -> None:
        """Queue a job; its queue timeout counts from ``since`` (``time.monotonic()``)."""
        active.queued_at = since
        job_id = active.job.id
        if job_id in self.queue:
            return
        self.queue.push(job_id, since)
        self._announced[job_id] = time.monotonic()  # a new job's Accepted tells its place
        self._moved = True
        if self._positions is not None:
            self._positions.entered(job_id, self.queue)

    def dequeue(self, job_id: str) -> bool:
        """Take a job out of the queue (started, ended, moved); whether it was queued."""
        if not self.queue.remove(job_id):
            return False
        self._announced.pop(job_id, None)
        self._examined.pop(job_id, None)
        self._moved = True
        if self._positions is not None:
            self._positions.left(job_id)
        return True

    def position(self, job_id: str) -> int:
        """1 for the next job to be dispatched (anywhere, on a shared store), 0 when not
        queued here."""
        if self._positions is not None:
            return self._positions.position(job_id)
        return self.queue.position(job_id)

    def next_position(self) -> int:
        """The position a job created now will have (for its Accepted event)."""
        if self._positions is not None:
            return self._positions.newest()
        return len(self.queue) + 1

    def has_room(self) -> bool:
        """Whether some provider could take one more job now (of some task)."""
        return bool(self._with_room())

    def _with_room(self) -> frozenset[tuple[str, int]]:
        """The providers that could take one more job now (of some task), by name, each with
        its capacity (which an agent coming online or going away changes)."""
        bound = self._settings.running_bound
        found = []
        for provider in self._providers:
            try:
                load = max(provider.load(), self.running[provider.name])
                capacity = provider.capacity()
                if min(bound, capacity) - load > 0:
                    found.append((provider.name, capacity))
            except Exception:
                logger.exception("provider %s failed to report its state", provider.name)
        return frozenset(found)

    def can_start(self, task: TaskKind, spec: TaskSpec) -> bool:
        """Whether a provider would take this job now (for a job offered by another
        coordinator: take only what runs here at once)."""
        capacity = self._settings.running_bound
        return pick_provider(self._providers, task, spec, self.running, capacity) is not None

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            self.passes += 1
            try:
                self._expire_queued()
                self._dispatch()
                if self._shared is not None:
                    await self._shared_pass(self._shared)
                if self._publish_due <= time.monotonic():
                    self.publish_positions()
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

    async def _shared_pass(self, shared: Shared) -> None:
        """Rank the jobs queued here (when due), then steal while idle."""
        positions = self._positions
        if positions is not None and positions.due():
            for job_id in await positions.refresh(self.queue):
                await shared.check(job_id)
            self._moved = True  # places ranked anew
            self.publish_positions()
        now = time.monotonic()
        if not self.queue and now >= self._next_steal and self.has_room():
            self._next_steal = now + self._settings.recheck_interval_s
            if await shared.steal():
                self._next_steal = 0.0  # and again after dispatching it, while room lasts
                self._wake.set()

    def _next_pass_in(self) -> float | None:
        """Nothing queued: sleep until woken (on a shared store, look for work to steal
        now and then). Else recheck providers now and then, and wake up for the earliest
        queue deadline and the next ranking."""
        deadline = self.queue.next_deadline(self._settings.queue_timeout_s)
        if deadline is None:
            if self._shared is not None and self.has_room():
                return max(self._next_steal - time.monotonic(), 0.0)
            return None
        now = time.monotonic()
        until_deadline = max(deadline - now, 0.0)
        wait = min(self._settings.recheck_interval_s, until_deadline, self._publish_due - now)
        wait = max(wait, 0.0)
        ranking = self._positions.next_due_in() if self._positions is not None else None
        return wait if ranking is None else min(wait, ranking)

    def _expire_queued(self) -> None:
        timeout = self._settings.queue_timeout_s
        for job_id in self.queue.expired(time.monotonic(), timeout):
            self.dequeue(job_id)
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
        capacity = self._settings.running_bound
        dispatched = False
        now = time.monotonic()
        if now >= self._examined_until:  # reasons and refusals can change with the agents
            self._examined.clear()
            self._examined_until = now + self._settings.recheck_interval_s
        room = self._with_room()
        for job_id in self.queue:
            tried = self._examined.get(job_id)
            if tried is not None and room <= tried:
                continue  # no provider has room that had none when this job was looked at
            active = self._active[job_id]
            if active.not_before > now:
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
                self._examined[job_id] = room
                continue
            self.dequeue(job_id)
            self._launch(active, provider)
            dispatched = True
            room = self._with_room()
        if dispatched:
            self.publish_positions()

    def publish_positions(self) -> None:
        """Tell queued jobs' watchers their new places: a job that entered the queue or moved
        back at once, one that moved up once its last announcement is ``position_interval_s``
        old (the loop wakes then for the ones held back)."""
        now = time.monotonic()
        if not self._moved and now < self._publish_due:
            return  # nothing moved, nothing held back is due: no pass over the queue
        self._moved = False
        interval = self._settings.position_interval_s
        due = math.inf
        for job_id in self.queue:
            position = self.position(job_id)
            active = self._active[job_id]
            last = active.last_position
            if last == position:
                continue
            if 0 < position < last:
                at = self._announced.get(job_id, -math.inf) + interval
                if now < at:
                    due = min(due, at)
                    continue
            active.last_position = position
            self._announced[job_id] = now
            waiting = active.job.waiting
            self._emit_event(
                active, Progress(Stage.QUEUED, queue_position=position, waiting=waiting)
            )
        self._publish_due = due

    def _set_waiting(self, active: ActiveJob, why: str) -> None:
        """Tell watchers (events, GetJob) why a queued job is not taken, when that changes."""
        if active.job.waiting == why:
            return
        active.job.waiting = why
        position = self.position(active.job.id)
        active.last_position = position
        self._announced[active.job.id] = time.monotonic()
        self._emit_event(active, Progress(Stage.QUEUED, queue_position=position, waiting=why))
