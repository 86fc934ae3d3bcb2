"""The final write of a held job leaves nothing behind in its event log."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

from aiserver.jobs.attempt import ActiveJob, ActiveJobs
from aiserver.jobs.event_log import EventLog
from aiserver.jobs.events import EventHub
from aiserver.jobs.job_writes import JobWrites
from aiserver.jobs.model import JobEvent, JobState, Progress
from aiserver.jobs.store import JobRecord
from aiserver.stages import Stage
from tests.storage.backends import JobStoreBackend
from tests.storage.test_job_store import make_job


async def test_the_final_write_after_the_hub_closed_drops_a_held_progress(
    tmp_path: Path,
) -> None:
    # The hub closed (the service stopping): the final write still ends the job's log, so
    # a progress held for its timer is not stored after the job's end.
    backend = JobStoreBackend("sqlite", tmp_path)
    try:
        store = await backend.open()
        job = make_job(1)
        await store.create(JobRecord(job))
        log = EventLog(store, progress_interval_s=0.1, event_delay_s=0.1)
        writes = JobWrites(store, EventHub(), ActiveJobs(), None, log)
        log.record(JobEvent(job.id, 2, datetime.now(UTC), Progress(Stage.RUNNING, 0.5)))
        job.state = JobState.SUCCEEDED
        assert await writes.store_end(ActiveJob(JobRecord(job)), job, []) is False
        await asyncio.sleep(0.4)  # past the progress timer
        assert await store.events(job.id) == []
        assert (await store.get(job.id)).job.state is JobState.SUCCEEDED
    finally:
        await backend.close()
