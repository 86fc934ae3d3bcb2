"""A timer's flush of progress alone that the store did not send is kept, not dropped."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import cast

from aiserver.jobs.event_log import EventLog
from aiserver.jobs.model import Accepted, JobEvent, Progress
from aiserver.jobs.store import JobStore, NewEvent
from aiserver.stages import Stage
from aiserver.tasks import TaskKind


class _Store:
    """``append_events`` as PostgreSQL answers it: ``answers`` says, in turn, after how many
    seconds to send the progress again (not stored: nobody elsewhere reads the job)."""

    def __init__(self, *answers: float) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[list[int], bool]] = []
        self.kinds: list[str | None] = []

    async def append_events(
        self,
        job_id: str,
        events: Sequence[NewEvent],
        *,
        announce: bool = True,
        holder: str | None = None,
        progress_kind: str | None = None,
    ) -> float | None:
        self.calls.append(([e.sequence for e in events], announce))
        self.kinds.append(progress_kind)
        if progress_kind is None or any(e.kind != progress_kind for e in events):
            return None
        return self.answers.pop(0) if self.answers else None


def _log(store: _Store) -> EventLog:
    return EventLog(
        cast(JobStore, store), progress_interval_s=0.1, event_delay_s=0.1, announce_every_s=5.0
    )


def _progress(sequence: int) -> JobEvent:
    return JobEvent("j", sequence, datetime.now(UTC), Progress(Stage.RUNNING, sequence / 10))


async def test_a_progress_not_stored_is_sent_again_then_stored_whoever_reads() -> None:
    # The job never emits another: its one progress is what a watcher coming later must see.
    store = _Store(0.2, 0.2, 0.2)
    log = _log(store)
    log.record(_progress(2))
    await asyncio.sleep(1.0)
    # Both tries announce: a flush the store skipped announced nothing, so it does not count
    # toward announce_every_s. The second is stored whoever reads: a job waiting with one
    # progress costs one check and one row, not a check per quiet period while it waits.
    assert store.calls == [([2], True), ([2], True)]
    assert store.kinds == ["progress", None]


async def test_a_newer_progress_replaces_the_kept_one() -> None:
    store = _Store(1.0)
    log = _log(store)
    log.record(_progress(2))
    await asyncio.sleep(0.3)  # flushed, not stored: kept for 1 s
    log.record(_progress(3))
    await asyncio.sleep(0.3)
    assert store.calls == [([2], True), ([3], True)]


async def test_a_kept_progress_goes_before_a_later_event() -> None:
    store = _Store(1.0)
    log = _log(store)
    log.record(_progress(2))
    await asyncio.sleep(0.3)
    log.record(JobEvent("j", 3, datetime.now(UTC), Accepted(TaskKind.IMAGE_TO_IMAGE, "", 0)))
    await asyncio.sleep(0.3)
    assert store.calls == [([2], True), ([2, 3], True)]


async def test_a_job_forgotten_or_drained_keeps_nothing() -> None:
    store = _Store(0.2, 0.2)
    log = _log(store)
    log.record(_progress(2))
    await asyncio.sleep(0.15)
    log.forget("j")
    await asyncio.sleep(0.4)
    assert store.calls == [([2], True)]
    store = _Store(0.2, 0.2)
    log = _log(store)
    log.record(_progress(2))
    await log.drain(1.0)
    await asyncio.sleep(0.4)
    assert store.calls == [([2], True)]
