"""Per-job event fan-out: one numbered stream per job, replayed to late subscribers.

Every event of a job gets the next sequence number (from 1, no gaps). A subscriber first gets a
replay built by :func:`replay_events` from the job record - accepted, the latest progress,
every retry, output and text, and finished if it ended - then the live events, and the stream
ends after Finished. A replayed event keeps its original sequence, so a subscriber always sees
increasing numbers, and a gap means only that superseded Progress events were skipped.

Progress is rate-limited per subscriber (one per interval, counted from Accepted too); the
newest waits in one slot, where a newer one replaces it unsent, and goes out when due or just
before any other event. It also goes out when the job begins storing an output
(:meth:`EventHub.flush_progress`: it reaches the caller while the store waits for the disk),
even if that store is then skipped (a re-attached run's output an earlier holder stored), so
a subscriber may get up to one progress per output more than one per interval. A replay that
ends with the latest progress puts it in that slot: a job's creating call, which subscribes
just after its job was picked, hears RUNNING and not also PENDING when the job starts at once
(one message fewer).

Memory is bounded. Each subscriber holds at most one undelivered Progress (a newer one replaces
it) and a bounded queue of other events; a job's own memory is its "marks" (the sequence and
time of each replayable event), dropped a grace period after the job ends. After that - or
after a restart - the same :func:`replay_events` rebuilds the replay from the stored record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from aiserver.errors import ErrorKind, ServiceError
from aiserver.jobs.model import (
    Accepted,
    EventKind,
    Finished,
    Job,
    JobEvent,
    JobState,
    OutputStored,
    Progress,
    Retrying,
    Stage,
    TextProduced,
)

__all__ = [
    "EventHub",
    "JobTap",
    "Mark",
    "ReplayLoader",
    "Subscription",
    "job_not_found",
    "progress_of",
    "replay_events",
    "snapshot",
    "synthesize_marks",
]

logger = logging.getLogger(__name__)

ReplayLoader = Callable[[str], Awaitable[list[JobEvent] | None]]
"""Builds the replay of a job that has no live stream (``None``: no such job)."""

JobTap = Callable[[JobEvent, Job], None]
"""Sees every event of every job with the job's live record (read it at once, never keep it)."""


def job_not_found(job_id: str) -> ServiceError:
    return ServiceError(
        ErrorKind.NOT_FOUND, "JOB_NOT_FOUND", f"job {job_id!r} not found", metadata={"job": job_id}
    )


def snapshot(job: Job) -> Job:
    """A copy that later changes to ``job`` do not reach (events and callers hold these)."""
    return replace(
        job,
        inputs=list(job.inputs),
        outputs=list(job.outputs),
        texts=list(job.texts),
        resume=dict(job.resume),
    )


@dataclass(frozen=True, slots=True)
class Mark:
    """Sequence and time of a replayable event; keys: ``accepted``, ``progress``,
    ``retry:{i}``, ``output:{i}``, ``text:{i}``, ``finished``."""

    sequence: int
    time: datetime


def progress_of(job: Job, queue_position: int) -> Progress | None:
    """The latest progress as far as the record knows (``None`` once the job has ended)."""
    if job.state is JobState.QUEUED:
        return Progress(Stage.QUEUED, queue_position=queue_position, waiting=job.waiting)
    if job.state is JobState.RUNNING:
        return Progress(Stage.RUNNING, fraction=job.progress, provider=job.provider)
    return None


def synthesize_marks(
    job: Job, *, last_sequence: int, retries: Sequence[Retrying]
) -> dict[str, Mark]:
    """Marks for a record whose live marks are gone: numbered in the canonical order, with the
    last event (progress or finished) at ``last_sequence`` so live numbering continues after."""
    marks: dict[str, Mark] = {"accepted": Mark(1, job.created)}
    keys = [f"retry:{i}" for i in range(len(retries))]
    keys += [f"output:{i}" for i in range(len(job.outputs))]
    keys += [f"text:{i}" for i in range(len(job.texts))]
    for sequence, key in enumerate(keys, start=2):
        marks[key] = Mark(sequence, job.updated)
    last = max(last_sequence, len(keys) + 2)
    if job.state.terminal:
        marks["finished"] = Mark(last, job.ended or job.updated)
    else:
        marks["progress"] = Mark(last, job.updated)
    return marks


def replay_events(
    job: Job,
    *,
    marks: Mapping[str, Mark],
    retries: Sequence[Retrying],
    progress: Progress | None,
    queue_position: int,
    texts: Sequence[TextProduced] = (),
) -> list[JobEvent]:
    """What a new subscriber is told first. Events without a mark never happened (yet).

    ``texts``: the text events as emitted, where known (their nodes: the record keeps only
    the text)."""
    events: list[JobEvent] = []

    def add(key: str, kind: EventKind) -> None:
        mark = marks.get(key)
        if mark is not None:
            events.append(JobEvent(job.id, mark.sequence, mark.time, kind))

    add("accepted", Accepted(job.task, job.ref_id, queue_position))
    if progress is not None and not job.state.terminal:
        add("progress", progress)
    for i, retry in enumerate(retries):
        add(f"retry:{i}", retry)
    for i, artifact in enumerate(job.outputs):
        add(f"output:{i}", OutputStored(i, artifact))
    for i, text in enumerate(job.texts):
        add(f"text:{i}", texts[i] if i < len(texts) else TextProduced(i, text))
    if job.state.terminal:
        add("finished", Finished(snapshot(job)))
    events.sort(key=lambda e: e.sequence)
    return events


class _Subscriber:
    """One subscriber's buffer: replay, a bounded queue, and one coalesced Progress slot.

    Its reader is woken only for what it can deliver: an event, or the slot's progress once
    the rate limit allows (a timer); a progress that replaces one already waiting, or that
    is not due yet, does not wake it (each wake is a task step and a new timer). ``kinds``:
    the only events it wants (Finished always; None: all), the others never reach it."""

    __slots__ = (
        "_clock",
        "_interval",
        "_kinds",
        "_last_progress",
        "_limit",
        "_loop",
        "_pending",
        "_queue",
        "_replay",
        "_timer",
        "_waker",
        "detached",
        "done",
    )

    def __init__(
        self,
        limit: int,
        interval: float,
        clock: Callable[[], float],
        kinds: tuple[type[EventKind], ...] | None = None,
    ) -> None:
        self._limit = limit
        self._interval = interval
        self._clock = clock
        self._kinds = None if kinds is None else (*kinds, Finished)
        self._replay: deque[JobEvent] = deque()
        self._queue: deque[JobEvent] = deque()
        self._pending: JobEvent | None = None  # newest undelivered Progress
        self._last_progress = -math.inf
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None  # wakes the reader when _pending is due
        self._waker = asyncio.Event()
        self.detached = False  # no more live events will come
        self.done = False  # Finished was delivered

    @property
    def buffered(self) -> int:
        return len(self._queue) + (self._pending is not None)

    def preload(self, events: Sequence[JobEvent]) -> None:
        kinds = self._kinds
        replay = list(events) if kinds is None else [e for e in events if isinstance(e.kind, kinds)]
        if replay and isinstance(replay[-1].kind, Progress):
            # The latest progress, with nothing after it: sent when the rate limit allows,
            # unless a newer one supersedes it first (a creating call subscribes just after
            # the job was picked, and it usually starts running within the interval).
            self._pending = replay.pop()
        self._replay.extend(replay)

    def push(self, event: JobEvent) -> None:
        kind = event.kind
        if self._kinds is not None and not isinstance(kind, self._kinds):
            return
        if isinstance(kind, Progress):
            self._pending = event  # supersedes any undelivered one
            if self._timer is None:  # else the reader is woken when the slot is due anyway
                wait = self._last_progress + self._interval - self._clock()
                if wait > 0:
                    self._timer = self._loop.call_later(wait, self._due)
                    return
            else:
                return
        else:
            if self._pending is not None:
                # The latest progress goes before any other event, whatever the rate limit.
                self._queue.append(self._pending)
                self._pending = None
                self._stop_timer()
            self._queue.append(event)
            self._trim()
        self._waker.set()

    def flush(self) -> None:
        """The held progress goes out now, not when its slot is due (see
        :meth:`EventHub.flush_progress`)."""
        if self._pending is None:
            return
        self._queue.append(self._pending)
        self._pending = None
        self._stop_timer()
        self._trim()
        self._waker.set()

    def _due(self) -> None:
        self._timer = None
        self._waker.set()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def detach(self) -> None:
        self.detached = True
        self._waker.set()

    def close(self) -> None:
        """The reader is gone: no timer is left to wake it."""
        self.detach()
        self._stop_timer()

    def _trim(self) -> None:
        if len(self._queue) <= self._limit:
            return
        # Only Progress that a newer Progress supersedes may go; other events are bounded by
        # the job itself (outputs <= batch size, retries <= attempts, one finish), so they stay.
        progress = [i for i, e in enumerate(self._queue) if isinstance(e.kind, Progress)]
        if self._pending is None and progress:
            progress.pop()
        drop = set(progress[: len(self._queue) - self._limit])
        if drop:
            self._queue = deque(e for i, e in enumerate(self._queue) if i not in drop)

    def _deliver(self, event: JobEvent) -> JobEvent:
        kind = event.kind
        # The rate limit's window also opens with Accepted: a progress that a newer one
        # supersedes within the job's first interval (a provider picked, then running at
        # once) is not worth a message of its own.
        if isinstance(kind, (Progress, Accepted)):
            self._last_progress = self._clock()
        elif isinstance(kind, Finished):
            self.done = True
        return event

    async def next(self) -> JobEvent:
        while True:
            self._waker.clear()
            if self.done:
                raise StopAsyncIteration
            if self._replay:
                return self._deliver(self._replay.popleft())
            if self._queue:
                return self._deliver(self._queue.popleft())
            if self._pending is not None:
                wait = self._last_progress + self._interval - self._clock()
                if wait <= 0:
                    self._stop_timer()
                    event, self._pending = self._pending, None
                    return self._deliver(event)
                # Rate limited: sleep until due, or until a new event flushes the slot. A
                # plain timer that sets the waker (kept across wakes: pushes set it too):
                # asyncio.timeout adds a context manager and, when it expires, cancels this
                # task to wake it (an exception through every frame of the stream's handler).
                if self._timer is None:
                    self._timer = self._loop.call_later(wait, self._due)
                await self._waker.wait()
                continue
            if self.detached:
                raise StopAsyncIteration
            await self._waker.wait()


class _Channel:
    __slots__ = (
        "drop_timer",
        "job",
        "marks",
        "progress",
        "retries",
        "sequence",
        "subscribers",
        "texts",
    )

    def __init__(
        self,
        job: Job,
        marks: dict[str, Mark],
        retries: list[Retrying],
        progress: Progress | None,
        sequence: int,
    ) -> None:
        self.job = job  # the manager's live record: replays read its current outputs and state
        self.marks = marks
        self.retries = retries
        self.texts: list[TextProduced] = []  # as emitted here (with their nodes)
        self.progress = progress
        self.sequence = sequence
        # A plain set (a WeakSet's iteration is Python code, 1.6 µs per emit): a subscription
        # dropped without aclose() takes its subscriber out itself (Subscription.__del__).
        self.subscribers: set[_Subscriber] = set()
        self.drop_timer: asyncio.TimerHandle | None = None


class Subscription:
    """Async iterator of one job's events: replay, then live, ending after Finished."""

    def __init__(
        self,
        hub: EventHub,
        job_id: str,
        load: ReplayLoader,
        kinds: tuple[type[EventKind], ...] | None = None,
    ) -> None:
        self._hub = hub
        self._job_id = job_id
        self._load = load
        self._kinds = kinds
        self._sub: _Subscriber | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the one it attached on
        self._closed = False

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> JobEvent:
        if self._sub is None:
            if self._closed:
                raise StopAsyncIteration
            self._loop = asyncio.get_running_loop()
            self._sub = await self._hub._attach(self._job_id, self._load, self._kinds)
        return await self._sub.next()

    @property
    def buffered(self) -> int:
        """Live events waiting for this subscriber (bounded; for tests and metrics)."""
        return self._sub.buffered if self._sub is not None else 0

    async def aclose(self) -> None:
        self._closed = True
        if self._sub is not None:
            self._hub._detach(self._job_id, self._sub)

    def __del__(self) -> None:
        # An iterator dropped without aclose(): its subscriber leaves the job's stream, on
        # the hub's loop (the cyclic collector may run this in any thread).
        if self._sub is not None and self._loop is not None and not self._closed:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to leave
                self._loop.call_soon_threadsafe(self._hub._detach, self._job_id, self._sub)


class EventHub:
    """Numbering, marks and subscribers of every job with a live stream."""

    def __init__(
        self,
        *,
        buffer_size: int = 64,
        progress_interval_s: float = 0.05,
        retain_s: float = 60.0,
        queue_position: Callable[[str], int] = lambda job_id: 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._buffer_size = buffer_size
        self._interval = progress_interval_s
        self._retain_s = retain_s
        self._position = queue_position
        self._clock = clock
        self._channels: dict[str, _Channel] = {}
        self._taps: list[JobTap] = []

    def tap(self, callback: JobTap) -> Callable[[], None]:
        """Call ``callback`` on every event of every job from now on; returns its remover."""
        self._taps.append(callback)
        return lambda: self._taps.remove(callback)

    def open_new(self, job: Job) -> None:
        """Start the stream of a job just created (its first event is sequence 1)."""
        self._channels[job.id] = _Channel(job, {}, [], None, 0)

    def open_recovered(self, job: Job, *, last_sequence: int, retries: Sequence[Retrying]) -> None:
        """Resume the stream of a stored job after a restart; numbering continues."""
        marks = synthesize_marks(job, last_sequence=last_sequence, retries=retries)
        progress = progress_of(job, self._position(job.id))
        top = max(m.sequence for m in marks.values())
        channel = _Channel(job, marks, list(retries), progress, top)
        channel.texts = [TextProduced(i, text) for i, text in enumerate(job.texts)]
        self._channels[job.id] = channel

    def is_open(self, job_id: str) -> bool:
        return job_id in self._channels

    def last_sequence(self, job_id: str, default: int = 0) -> int:
        channel = self._channels.get(job_id)
        return channel.sequence if channel is not None else default

    def emit(self, job_id: str, kind: EventKind) -> JobEvent:
        """Number ``kind``, remember it for replays and hand it to every subscriber."""
        channel = self._channels[job_id]
        channel.sequence += 1
        event = JobEvent(job_id, channel.sequence, datetime.now(UTC), kind)
        if isinstance(kind, Accepted):
            key = "accepted"
        elif isinstance(kind, Progress):
            key = "progress"
            channel.progress = kind
        elif isinstance(kind, Retrying):
            key = f"retry:{len(channel.retries)}"
            channel.retries.append(kind)
        elif isinstance(kind, OutputStored):
            key = f"output:{kind.index}"
        elif isinstance(kind, TextProduced):
            key = f"text:{kind.index}"
            if kind.index == len(channel.texts):
                channel.texts.append(kind)
        else:
            key = "finished"
            channel.drop_timer = asyncio.get_running_loop().call_later(
                self._retain_s, self._drop, job_id, channel
            )
        channel.marks[key] = Mark(event.sequence, event.time)
        for subscriber in list(channel.subscribers):
            subscriber.push(event)
        for tap in list(self._taps):
            try:
                tap(event, channel.job)
            except Exception:  # a watcher's bug must not stop the job's own events
                logger.exception("job %s: an event tap failed", job_id)
        return event

    def flush_progress(self, job_id: str) -> None:
        """Hand every subscriber of the job the progress its rate limit holds back, now.

        For a job about to store an output: that progress would go out right before the
        OutputStored event anyway (no event passes a held progress), i.e. after the output's
        durable write; sent now, its message is written to the caller while that write waits
        for the disk, and the job's tail (output, finished) no longer waits behind it. A job
        shorter than the rate limit's interval holds every progress until then."""
        channel = self._channels.get(job_id)
        if channel is None:
            return
        for subscriber in channel.subscribers:
            subscriber.flush()

    def replay(self, job_id: str) -> list[JobEvent] | None:
        """The replay a subscriber attaching now would get (``None``: no live stream)."""
        channel = self._channels.get(job_id)
        if channel is None:
            return None
        return replay_events(
            channel.job,
            marks=channel.marks,
            retries=channel.retries,
            progress=channel.progress,
            queue_position=self._position(job_id),
            texts=channel.texts,
        )

    def subscribe(
        self,
        job_id: str,
        load: ReplayLoader,
        kinds: tuple[type[EventKind], ...] | None = None,
    ) -> Subscription:
        """``kinds``: only these events (and Finished) reach the subscriber; None: all."""
        return Subscription(self, job_id, load, kinds)

    def end_stream(self, job_id: str) -> None:
        """End one job's stream without Finished (another process runs the job now): its
        subscribers finish what they hold, then stop."""
        channel = self._channels.pop(job_id, None)
        if channel is not None:
            if channel.drop_timer is not None:
                channel.drop_timer.cancel()
            for subscriber in list(channel.subscribers):
                subscriber.detach()

    def close(self) -> None:
        """End every stream (server shutdown): subscribers finish what they hold, then stop."""
        for channel in self._channels.values():
            if channel.drop_timer is not None:
                channel.drop_timer.cancel()
            for subscriber in list(channel.subscribers):
                subscriber.detach()
        self._channels.clear()

    async def _attach(
        self, job_id: str, load: ReplayLoader, kinds: tuple[type[EventKind], ...] | None
    ) -> _Subscriber:
        subscriber = _Subscriber(self._buffer_size, self._interval, self._clock, kinds)
        if job_id not in self._channels:
            events = await load(job_id)
            if job_id not in self._channels:  # still none after the await: history only
                if events is None:
                    raise job_not_found(job_id)
                subscriber.preload(events)
                subscriber.detach()
                return subscriber
        # No await from the replay to registering: no event is missed or delivered twice.
        subscriber.preload(self.replay(job_id) or [])
        self._channels[job_id].subscribers.add(subscriber)
        return subscriber

    def _detach(self, job_id: str, subscriber: _Subscriber) -> None:
        subscriber.close()
        channel = self._channels.get(job_id)
        if channel is not None:
            channel.subscribers.discard(subscriber)

    def _drop(self, job_id: str, channel: _Channel) -> None:
        if self._channels.get(job_id) is channel:
            del self._channels[job_id]
