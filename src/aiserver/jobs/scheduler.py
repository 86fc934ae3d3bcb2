"""Scheduling policy: settings, the FIFO queue, and which provider gets a job.

The manager owns the loop that applies it; this module holds the parts that are plain
decisions, testable without a running job.
"""

from __future__ import annotations

import bisect
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from aiserver.errors import ServiceError
from aiserver.providers.base import SHUTDOWN, Provider
from aiserver.tasks import (
    ImageToImageSpec,
    ImageToTextSpec,
    ImageUpscaleSpec,
    ImageWithMaskSpec,
    TaskKind,
    TaskSpec,
    WorkflowSpec,
)

__all__ = [
    "SHUTDOWN",
    "JobQueue",
    "SchedulerSettings",
    "could_serve",
    "default_spec",
    "pick_provider",
    "refusal",
    "waiting_reason",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    """How jobs are queued, run, retried and streamed."""

    max_attempts: int = 3
    """Runs of one job at most: a ``ProviderUnavailable`` is retried until this many."""
    queue_timeout_s: float = 600.0
    """A job still queued after this long (since it was queued or re-queued, and since the
    last start-up) fails with DEADLINE_EXCEEDED."""
    run_timeout_s: float = 900.0
    """One attempt longer than this is cancelled and the job fails with DEADLINE_EXCEEDED."""
    cancel_timeout_s: float = 30.0
    """How long a cancelled provider run may take to unwind before the job is marked
    CANCELLED regardless."""
    max_running_per_provider: int = 0
    """Jobs handed to one provider at once at most, besides what its ``capacity()`` says (its
    ``load()`` counts too); 0: no bound but the provider's own. A ComfyUI pool's capacity is
    its online agents' slots (``max_concurrent_jobs + queue_ahead`` each): a fixed bound here
    left slots of a large pool idle while jobs waited in this queue."""
    recheck_interval_s: float = 2.0
    """With jobs waiting, how often the queue is re-examined for providers that came online
    (everything else wakes the scheduler at once: submit, job end, cancel)."""
    progress_max_rate_hz: float = 20.0
    """Progress events per second per subscriber at most; 0 for no limit. The latest progress
    is always delivered before any other event."""
    subscriber_buffer: int = 64
    """Undelivered events one subscriber may hold before superseded progress is dropped."""
    history_retain_s: float = 60.0
    """How long an ended job's live event state stays in memory; later subscribers get a
    replay built from the stored record instead."""
    spool_grace_s: float = 60.0
    """Delay between a job's end and the deletion of its spooled inputs (if no unfinished job
    uses them then): a request may have just committed the same content and not yet
    submitted it."""
    max_active_per_owner: int = 0
    """Unfinished (QUEUED or RUNNING) jobs one owner may have; one more is refused with
    RESOURCE_EXHAUSTED ``TOO_MANY_JOBS``. 0: no limit."""
    too_many_jobs_retry_s: float = 5.0
    """The retry delay suggested (RetryInfo) with ``TOO_MANY_JOBS``."""
    steal_after_s: float = 2.0
    """On a shared store: a queued job another live coordinator holds, not started for this
    long, may be taken by an idle one (free slots, nothing queued; docs/scale-out.md)."""
    watch_outage_s: float = 30.0
    """On a shared store: how long a watcher following a job through the store (held by
    another coordinator) rides out an unreachable store before its stream fails UNAVAILABLE
    (:class:`~aiserver.jobs.store_watch.StoreWatch`)."""
    position_interval_s: float = 1.0
    """A queued job's watchers hear it move up the queue at most this often (the move
    announced when due is exact, and GetJob's place always is): each start of a job moves
    every job behind it, so announcing each move cost an event per waiting job per start.
    Entering the queue, moving back and a new waiting reason are told at once; 0: every
    move at once."""
    rank_interval_s: float = 0.25
    """On a shared store: how often at most the queued jobs held here are ranked among every
    coordinator's (their queue positions)."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.max_running_per_provider < 0:
            raise ValueError("max_running_per_provider must be 0 (no bound) or more")
        if self.subscriber_buffer < 1:
            raise ValueError("subscriber_buffer must be at least 1")
        for name in (
            "queue_timeout_s",
            "run_timeout_s",
            "cancel_timeout_s",
            "recheck_interval_s",
            "rank_interval_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.position_interval_s < 0:
            raise ValueError("position_interval_s must be 0 (every move) or more")

    @property
    def running_bound(self) -> int:
        """``max_running_per_provider`` with 0 (no bound) as a number no provider reaches."""
        return self.max_running_per_provider or sys.maxsize

    @property
    def progress_interval_s(self) -> float:
        return 1.0 / self.progress_max_rate_hz if self.progress_max_rate_hz > 0 else 0.0


def could_serve(providers: Sequence[Provider], task: TaskKind) -> bool:
    return any(p.supports(task) for p in providers)


def refusal(providers: Sequence[Provider], task: TaskKind, spec: TaskSpec) -> ServiceError | None:
    """An error when every provider for ``task`` refuses ``spec`` for good; None otherwise."""
    first: ServiceError | None = None
    for provider in providers:
        if not provider.supports(task):
            continue
        try:
            error = provider.refusal(task, spec)
        except Exception:
            logger.exception("provider %s failed to report its state", provider.name)
            return None
        if error is None:
            return None
        first = first or error
    return first


def waiting_reason(providers: Sequence[Provider], task: TaskKind, spec: TaskSpec) -> str:
    """Why no provider can take ``spec`` now, for its watchers; "" when one can (the job only
    waits its turn)."""
    reasons = []
    for provider in providers:
        try:
            if not provider.supports(task):
                continue
            if provider.can_run(task, spec):
                return ""
            reasons.append(provider.unavailable_reason(task, spec))
        except Exception:
            logger.exception("provider %s failed to report its state", provider.name)
    return "; ".join(r for r in reasons if r) or f"no provider can run {task.value} now"


_DEFAULT_SPECS: dict[TaskKind, TaskSpec] = {
    TaskKind.IMAGE_TO_IMAGE: ImageToImageSpec(positive_prompt="health check"),
    TaskKind.IMAGE_WITH_MASK: ImageWithMaskSpec(positive_prompt="health check"),
    TaskKind.IMAGE_UPSCALE: ImageUpscaleSpec(),
    TaskKind.IMAGE_TO_TEXT: ImageToTextSpec(),
    TaskKind.WORKFLOW: WorkflowSpec(),
}


def default_spec(task: TaskKind) -> TaskSpec:
    """A spec with default model and parameters, to ask ``can_run`` about a task in general."""
    return _DEFAULT_SPECS[task]


def pick_provider(
    providers: Sequence[Provider],
    task: TaskKind,
    spec: TaskSpec,
    running: Mapping[str, int],
    capacity: int,
) -> Provider | None:
    """The least loaded provider that can run the task now and has room (ties: list order).

    Room is the smaller of ``capacity`` and what the provider says it can take.
    """
    best: Provider | None = None
    best_load = 0
    for provider in providers:
        try:
            # load() may lag behind jobs just handed over; our own count covers that.
            load = max(provider.load(), running.get(provider.name, 0))
            if min(capacity, provider.capacity()) - load <= 0:
                continue  # asked first: can_run may check every agent (and a fallback's primaries)
            if not provider.can_run(task, spec):
                continue
        except Exception:
            logger.exception("provider %s failed to report its state", provider.name)
            continue
        if best is None or load < best_load:
            best, best_load = provider, load
    return best


class JobQueue:
    """Queued job ids in creation order (ids sort by time), each with when it was queued.

    A re-queued job (after a retry) goes back to its place by creation, ahead of newer jobs.
    """

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._since: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._since

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._ids))  # a copy: callers remove while iterating

    def push(self, job_id: str, now: float) -> None:
        if job_id not in self._since:
            bisect.insort(self._ids, job_id)
            self._since[job_id] = now

    def remove(self, job_id: str) -> bool:
        if self._since.pop(job_id, None) is None:
            return False
        del self._ids[bisect.bisect_left(self._ids, job_id)]
        return True

    def position(self, job_id: str) -> int:
        """1 for the next job to run, 0 when not queued."""
        if job_id not in self._since:
            return 0
        return bisect.bisect_left(self._ids, job_id) + 1

    def next_after(self, job_id: str) -> str | None:
        """The queued job right behind ``job_id`` (None: it is the last)."""
        i = bisect.bisect_right(self._ids, job_id)
        return self._ids[i] if i < len(self._ids) else None

    def positions(self) -> dict[str, int]:
        return {job_id: i for i, job_id in enumerate(self._ids, start=1)}

    def expired(self, now: float, timeout: float) -> list[str]:
        return [j for j in self._ids if now - self._since[j] >= timeout]

    def next_deadline(self, timeout: float) -> float | None:
        return min(self._since.values()) + timeout if self._since else None
