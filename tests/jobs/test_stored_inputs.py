"""A small input kept with its job (``InputRef.stored``, the embedded store): its attempts get
its bytes, held in memory within the process's budget or read back from the store."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3

import pytest

from aiserver.jobs.manager import JobManager
from aiserver.jobs.model import InputRef, Job, JobState
from aiserver.tasks import ImageToImageSpec, TaskKind
from tests.jobs.helpers import SHARED_BACKENDS, Env, ScriptedProvider, env, final_job, png, within

__all__ = ["env"]

pytestmark = pytest.mark.skipif(SHARED_BACKENDS, reason="the embedded store keeps inputs")


def _stored(data: bytes) -> InputRef:
    sha = hashlib.sha256(data).hexdigest()
    return InputRef("image", "in.png", sha, len(data), "image/png", 8, 8, stored=True)


async def _submit(manager: JobManager, ref: InputRef, data: bytes) -> Job:
    job, _ = await within(
        manager.submit(
            owner="alice",
            task=TaskKind.IMAGE_TO_IMAGE,
            spec=ImageToImageSpec(positive_prompt="a cat"),
            inputs=[ref],
            ref_id="",
            tag="",
            reply_to="",
            input_bytes={ref.sha256: data},
        )
    )
    return job


@pytest.mark.parametrize("budget", [1 << 20, 0], ids=["held", "over-budget"])
async def test_every_attempt_gets_the_stored_bytes_and_no_file_is_made(
    env: Env, budget: int
) -> None:
    provider = ScriptedProvider()
    manager = await env.manager(provider)
    manager._held_inputs.budget = budget  # 0: nothing held, each attempt reads the store
    driver, reads = manager._driver, []
    read = driver._stored_input
    assert read is not None

    async def counted(job_id: str, sha256: str) -> bytes | None:
        reads.append(sha256)
        return await read(job_id, sha256)

    driver._stored_input = counted
    data = png(7)
    ref = _stored(data)
    job = await _submit(manager, ref, data)
    events = manager.subscribe(job.id)
    ended = await final_job(events)
    assert ended.state is JobState.SUCCEEDED
    (run,) = provider.runs
    given = run.work.inputs["image"]
    assert given.data == data and given.sha256 == ref.sha256
    assert not given.path.exists()  # the spool has no file for it
    assert manager._held_inputs.used == 0  # given back at the end
    assert len(reads) == (0 if budget else 1)  # held bytes spare the store a read
    assert await env.stores[0].input_bytes(job.id, ref.sha256) is None  # gone with the end


async def test_a_stored_input_missing_from_the_store_fails_the_job_as_a_missing_input(
    env: Env,
) -> None:
    provider = ScriptedProvider(online=False)  # queued until the row is gone
    manager = await env.manager(provider)
    manager._held_inputs.budget = 0  # not held: the attempt must read the store
    data = png(8)
    ref = _stored(data)
    job = await _submit(manager, ref, data)
    with contextlib.closing(sqlite3.connect(env.db_path)) as db:
        db.execute("DELETE FROM job_input_bytes")
        db.commit()
    events = manager.subscribe(job.id)
    provider.online = True
    ended = await final_job(events)
    assert ended.state is JobState.FAILED and provider.runs == []
    assert ended.error is not None and ended.error.reason == "INPUT_MISSING"
