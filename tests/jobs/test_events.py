from __future__ import annotations

import asyncio
import gc
from datetime import UTC, datetime

import pytest

from aiserver.errors import ErrorKind, ServiceError
from aiserver.jobs.events import (
    EventHub,
    Subscription,
    progress_of,
    replay_events,
    snapshot,
    synthesize_marks,
)
from aiserver.jobs.model import (
    Accepted,
    ArtifactRef,
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
from aiserver.tasks import ImageToImageSpec, TaskKind
from tests.jobs.helpers import collect, within

NOW = datetime(2025, 5, 1, tzinfo=UTC)


def new_job(job_id: str = "J1") -> Job:
    return Job(
        job_id,
        TaskKind.IMAGE_TO_IMAGE,
        ImageToImageSpec(positive_prompt="x"),
        JobState.QUEUED,
        NOW,
        NOW,
        ref_id="r",
    )


def artifact(i: int) -> ArtifactRef:
    return ArtifactRef(
        f"a{i}", f"/a{i}", "o.png", "image/png", 1, 1, 1, f"{i:064}", None, "p", NOW, "J1"
    )


def progress(fraction: float) -> Progress:
    return Progress(Stage.RUNNING, fraction=fraction)


def add_output(hub: EventHub, job: Job, i: int) -> None:
    job.outputs.append(artifact(i))
    hub.emit(job.id, OutputStored(i, job.outputs[-1]))


def finish(hub: EventHub, job: Job) -> None:
    job.state = JobState.SUCCEEDED
    job.ended = NOW
    hub.emit(job.id, Finished(snapshot(job)))


async def no_history(job_id: str) -> list[JobEvent] | None:
    return None


def kinds(events: list[JobEvent]) -> list[EventKind]:
    return [e.kind for e in events]


async def test_replay_then_live_with_original_sequences() -> None:
    hub = EventHub(progress_interval_s=0)
    job = new_job()
    hub.open_new(job)
    hub.emit(job.id, Accepted(job.task, "r", 1))
    job.state = JobState.RUNNING
    for f in (0.1, 0.2, 0.3):
        hub.emit(job.id, progress(f))
    add_output(hub, job, 0)

    sub = hub.subscribe(job.id, no_history)
    first = [await within(anext(sub)) for _ in range(3)]
    # accepted, the latest progress only, the output - each with its original number
    assert [e.sequence for e in first] == [1, 4, 5]
    assert kinds(first) == [Accepted(job.task, "r", 0), progress(0.3), OutputStored(0, artifact(0))]

    hub.emit(job.id, progress(0.9))
    job.texts.append("caption")
    hub.emit(job.id, TextProduced(0, "caption"))
    finish(hub, job)
    rest = await collect(sub)
    assert [e.sequence for e in rest] == [6, 7, 8]  # live: every event, gap-free
    assert isinstance(rest[-1].kind, Finished)


async def test_replay_of_live_marks_and_of_stored_record_agree() -> None:
    hub = EventHub(progress_interval_s=0)
    job = new_job()
    hub.open_new(job)
    hub.emit(job.id, Accepted(job.task, "r", 1))
    hub.emit(job.id, Retrying(2, "agent down", "gpu-1"))
    for i in range(2):
        add_output(hub, job, i)
    job.texts.append("caption")
    hub.emit(job.id, TextProduced(0, "caption"))
    finish(hub, job)
    live = hub.replay(job.id)
    assert live is not None

    stored = replay_events(
        job,
        marks=synthesize_marks(
            job,
            last_sequence=hub.last_sequence(job.id),
            retries=[Retrying(2, "agent down", "gpu-1")],
        ),
        retries=[Retrying(2, "agent down", "gpu-1")],
        progress=progress_of(job, 0),
        queue_position=0,
    )
    assert kinds(live) == kinds(stored)
    assert live[-1].sequence == stored[-1].sequence == hub.last_sequence(job.id)
    assert [e.sequence for e in stored] == sorted({e.sequence for e in stored})


async def test_late_subscriber_after_history_dropped_gets_synthesized_replay() -> None:
    hub = EventHub(retain_s=0.01)
    job = new_job()
    hub.open_new(job)
    hub.emit(job.id, Accepted(job.task, "r", 1))
    add_output(hub, job, 0)
    finish(hub, job)
    await asyncio.sleep(0.05)
    assert not hub.is_open(job.id)
    loaded: list[str] = []

    async def from_store(job_id: str) -> list[JobEvent] | None:
        loaded.append(job_id)
        marks = synthesize_marks(job, last_sequence=3, retries=[])
        return replay_events(job, marks=marks, retries=[], progress=None, queue_position=0)

    events = await collect(hub.subscribe(job.id, from_store))
    assert loaded == [job.id]
    assert [type(e.kind) for e in events] == [Accepted, OutputStored, Finished]
    assert [e.sequence for e in events] == [1, 2, 3]

    with pytest.raises(ServiceError) as err:
        await collect(hub.subscribe("nope", no_history))
    assert err.value.kind is ErrorKind.NOT_FOUND and err.value.reason == "JOB_NOT_FOUND"


async def test_slow_subscriber_is_bounded_and_loses_only_superseded_progress() -> None:
    hub = EventHub(buffer_size=8, progress_interval_s=0)
    job = new_job()
    hub.open_new(job)
    hub.emit(job.id, Accepted(job.task, "r", 1))
    sub = hub.subscribe(job.id, no_history)
    assert isinstance((await within(anext(sub))).kind, Accepted)  # attached, then stalls

    for i in range(20):
        for step in range(500):
            hub.emit(job.id, progress((i * 500 + step) / 10_000))
            # 10,000 progress events in: never more than the limit, or what the job's own
            # non-progress events need (outputs so far, one flushed), plus one pending progress
            assert sub.buffered <= max(8, i + 1) + 1
        add_output(hub, job, i)
    hub.emit(job.id, progress(0.99))
    finish(hub, job)
    assert sub.buffered <= 22

    events = await collect(sub)
    outputs = [e.kind.index for e in events if isinstance(e.kind, OutputStored)]
    assert outputs == list(range(20))  # every output, in order
    assert isinstance(events[-1].kind, Finished)
    assert len([e for e in events if isinstance(e.kind, Progress)]) <= 10
    seqs = [e.sequence for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_progress_rate_limit_keeps_the_latest_before_other_events() -> None:
    hub = EventHub(progress_interval_s=0.05)
    job = new_job()
    hub.open_new(job)
    hub.emit(job.id, Accepted(job.task, "r", 1))
    received: list[JobEvent] = []

    async def consume() -> None:
        received.extend(await collect(hub.subscribe(job.id, no_history)))

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    n = 0
    while loop.time() - start < 0.3:
        n += 1
        hub.emit(job.id, progress(n / 10_000))
        await asyncio.sleep(0.002)
    add_output(hub, job, 0)  # the newest progress must arrive first
    finish(hub, job)
    await within(consumer)

    got = [e.kind for e in received if isinstance(e.kind, Progress)]
    assert 2 <= len(got) <= 10 < n  # ~20/s over 0.3 s, far fewer than emitted
    output_at = next(i for i, e in enumerate(received) if isinstance(e.kind, OutputStored))
    assert received[output_at - 1].kind == progress(n / 10_000)


async def test_dropped_subscription_detaches_itself() -> None:
    hub = EventHub()
    job = new_job()
    hub.open_new(job)
    hub.emit(job.id, Accepted(job.task, "r", 1))
    sub = hub.subscribe(job.id, no_history)
    await within(anext(sub))
    assert len(hub._channels[job.id].subscribers) == 1
    del sub
    gc.collect()
    await asyncio.sleep(0)  # handed to the loop (the collector may run in any thread)
    assert len(hub._channels[job.id].subscribers) == 0

    # Dropped in another thread (as the cyclic collector may): still left on the loop.
    other = hub.subscribe(job.id, no_history)
    await within(anext(other))
    holder = [other]
    del other
    await asyncio.to_thread(holder.clear)
    await asyncio.sleep(0)
    assert len(hub._channels[job.id].subscribers) == 0

    closed = hub.subscribe(job.id, no_history)
    await within(anext(closed))
    await closed.aclose()
    assert await collect(closed) == []


async def test_close_ends_every_stream() -> None:
    hub = EventHub()
    job = new_job()
    hub.open_new(job)
    hub.emit(job.id, Accepted(job.task, "r", 1))
    sub = hub.subscribe(job.id, no_history)
    await within(anext(sub))
    waiter = asyncio.create_task(collect(sub))
    await asyncio.sleep(0.01)
    hub.close()
    assert await within(waiter) == []


async def test_a_progress_superseded_within_the_first_interval_after_accepted_is_skipped() -> None:
    # A provider picked (PENDING), then running at once: one progress message, not two; the
    # sequence gap is the documented sign of a skipped progress.
    hub = EventHub(progress_interval_s=0.05)
    job = new_job()
    hub.open_new(job)
    hub.emit(job.id, Accepted(job.task, "r", 0))
    sub = hub.subscribe(job.id, no_history)
    assert isinstance((await within(anext(sub))).kind, Accepted)
    rest_task = asyncio.create_task(collect(sub))
    hub.emit(job.id, Progress(Stage.PENDING, provider="p"))
    await asyncio.sleep(0.01)  # the subscriber is waiting: it could send PENDING now
    hub.emit(job.id, progress(0.5))
    add_output(hub, job, 0)
    finish(hub, job)
    rest = await within(rest_task)
    assert kinds(rest)[0] == progress(0.5)
    assert [type(k) for k in kinds(rest)] == [Progress, OutputStored, Finished]
    assert [e.sequence for e in rest] == [3, 4, 5]


async def test_a_rate_limited_progress_arrives_when_its_interval_ends() -> None:
    hub = EventHub(progress_interval_s=0.05)
    job = new_job()
    hub.open_new(job)
    hub.emit(job.id, Accepted(job.task, "r", 0))
    sub = hub.subscribe(job.id, no_history)
    await within(anext(sub))
    loop = asyncio.get_running_loop()
    start = loop.time()
    hub.emit(job.id, Progress(Stage.PENDING, provider="p"))
    got = await within(anext(sub))
    assert got.kind == Progress(Stage.PENDING, provider="p")
    assert 0.04 <= loop.time() - start < 0.5  # held for the interval, then sent on its own


async def test_a_replayed_latest_progress_gives_way_to_a_newer_one_within_the_interval() -> None:
    # The creating call subscribes just after its job was picked (PENDING in the replay);
    # the job runs at once: the caller is told RUNNING, not both.
    hub = EventHub(progress_interval_s=0.05)
    job = new_job()
    hub.open_new(job)
    hub.emit(job.id, Accepted(job.task, "r", 0))
    hub.emit(job.id, Progress(Stage.PENDING, provider="p"))
    sub = hub.subscribe(job.id, no_history)
    assert isinstance((await within(anext(sub))).kind, Accepted)
    rest_task = asyncio.create_task(collect(sub))
    await asyncio.sleep(0.01)
    hub.emit(job.id, progress(0.5))
    add_output(hub, job, 0)
    finish(hub, job)
    rest = await within(rest_task)
    assert kinds(rest)[0] == progress(0.5)
    assert [e.sequence for e in rest] == [3, 4, 5]


async def test_a_replayed_latest_progress_arrives_when_nothing_newer_comes() -> None:
    hub = EventHub(progress_interval_s=0.05)
    job = new_job()
    hub.open_new(job)
    hub.emit(job.id, Accepted(job.task, "r", 0))
    hub.emit(job.id, Progress(Stage.PENDING, provider="p"))
    sub = hub.subscribe(job.id, no_history)
    await within(anext(sub))
    got = await within(anext(sub))
    assert (got.sequence, got.kind) == (2, Progress(Stage.PENDING, provider="p"))


async def test_a_progress_not_due_yet_does_not_wake_the_reader() -> None:
    # Each wake of a rate-limited reader was a task step and a new timer, for nothing: the
    # slot's progress could not go out before the interval ended anyway.
    hub, job, sub = await _past_accepted(0.05)
    reader = asyncio.create_task(anext(sub))
    await asyncio.sleep(0)  # waiting for the next event
    assert sub._sub is not None
    waker = sub._sub._waker
    for step in range(5):
        hub.emit(job.id, progress(step / 10))
        assert not waker.is_set()
    got = await within(reader)
    assert (got.sequence, got.kind) == (6, progress(0.4))  # the latest, once due


async def test_a_subscriber_of_some_kinds_gets_only_those_and_finished() -> None:
    hub = EventHub(progress_interval_s=0)
    job = new_job()
    hub.open_new(job)
    hub.emit(job.id, Accepted(job.task, "r", 0))
    hub.emit(job.id, progress(0.1))
    add_output(hub, job, 0)
    sub = hub.subscribe(job.id, no_history, (OutputStored,))
    replayed = await within(anext(sub))
    assert isinstance(replayed.kind, OutputStored) and replayed.sequence == 3
    waiting = asyncio.create_task(anext(sub))
    await asyncio.sleep(0)
    hub.emit(job.id, progress(0.5))
    hub.emit(job.id, TextProduced(0, "t"))
    assert sub.buffered == 0  # nothing for this reader: not even woken
    add_output(hub, job, 1)
    assert (await within(waiting)).sequence == 6
    finish(hub, job)
    assert [type(k) for k in kinds(await collect(sub))] == [Finished]


async def test_a_late_subscriber_hears_a_text_with_its_node() -> None:
    # The record keeps only the text; a subscriber attaching after the event (a fast job, a
    # watcher) got it without the node that produced it.
    hub = EventHub(progress_interval_s=0)
    job = new_job()
    hub.open_new(job)
    hub.emit(job.id, Accepted(job.task, "r", 0))
    job.texts.append("a caption")
    hub.emit(job.id, TextProduced(0, "a caption", "7"))
    finish(hub, job)
    replayed = await collect(hub.subscribe(job.id, no_history))
    assert TextProduced(0, "a caption", "7") in kinds(replayed)


async def test_flush_progress_hands_over_the_held_progress_at_once() -> None:
    # Held by the rate limit (an interval far longer than the test), then flushed: it goes
    # out now, and still before the output that follows.
    hub, job, sub = await _past_accepted(30)
    reader = asyncio.create_task(anext(sub))
    hub.emit(job.id, progress(0.5))
    hub.emit(job.id, progress(0.9))
    await asyncio.sleep(0.01)
    assert not reader.done()  # held
    hub.flush_progress(job.id)
    got = await within(reader, 1.0)
    assert got.kind == progress(0.9)
    hub.flush_progress(job.id)  # nothing held: nothing sent
    add_output(hub, job, 0)
    finish(hub, job)
    rest = await collect(sub)
    assert [type(k) for k in kinds(rest)] == [OutputStored, Finished]
    hub.flush_progress("no such job")  # a job without a stream: nothing to do


async def _past_accepted(interval_s: float) -> tuple[EventHub, Job, Subscription]:
    """A hub rate-limiting progress to one per ``interval_s`` and a subscriber that has read
    the job's Accepted (which opens the interval)."""
    hub = EventHub(progress_interval_s=interval_s)
    job = new_job()
    hub.open_new(job)
    hub.emit(job.id, Accepted(job.task, "r", 0))
    sub = hub.subscribe(job.id, no_history)
    await within(anext(sub))
    return hub, job, sub
