"""Restarts: a crashed manager's jobs are neither lost nor stuck."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from aiserver.jobs.manager import SEQUENCE_BLOCK, JobManager
from aiserver.jobs.model import Accepted, Finished, JobEvent, JobState, Progress, Retrying, Stage
from aiserver.providers.base import GeneratedImage, ProviderProgress
from tests.jobs.crash_child import CHECKPOINT
from tests.jobs.helpers import (
    Env,
    Run,
    ScriptedProvider,
    collect,
    png,
    produce_image,
    submit,
    within,
)

ROOT = Path(__file__).resolve().parents[2]


async def checkpoint_then_hang(run: Run) -> None:
    """Checkpoints, then hangs until the crash."""
    await run.sink.progress(ProviderProgress(Stage.RUNNING, 0.25))
    await run.sink.checkpoint(CHECKPOINT)
    run.release.set()  # tells the test the checkpoint is stored
    await asyncio.Event().wait()


async def hang(run: Run) -> None:
    if run.work.attempt > 1:
        await produce_image(run)
        return
    run.release.set()
    await asyncio.Event().wait()


async def finished(manager: JobManager, job_id: str) -> list[JobEvent]:
    events = await collect(manager.subscribe(job_id))
    assert isinstance(events[-1].kind, Finished)
    return events


async def test_crash_then_restart_resumes_running_and_runs_queued(env: Env) -> None:
    old = ScriptedProvider(behaviour=checkpoint_then_hang)
    crashed = await env.manager(old, max_running_per_provider=1)
    running = await submit(crashed, env)
    await within((await old.next_run()).release.wait())
    queued = await submit(crashed, env)
    # The crash: the old manager is abandoned as it is - no stop(), no more writes from it
    # (its provider is busy with the hanging run, so it dispatches nothing else).

    new = ScriptedProvider(behaviour=produce_image)  # same name: the checkpoint's owner
    restarted = await env.manager(new)
    assert restarted.queue_position(queued.id) in (0, 1)
    resumed_events = await finished(restarted, running.id)
    queued_events = await finished(restarted, queued.id)

    by_job = {r.work.job_id: r.work for r in new.runs}
    assert dict(by_job[running.id].resume) == CHECKPOINT  # handed back to re-attach
    assert by_job[running.id].attempt == 1  # the same attempt, continued
    assert dict(by_job[queued.id].resume) == {} and by_job[queued.id].attempt == 1
    for events in (resumed_events, queued_events):
        final = events[-1].kind
        assert isinstance(final, Finished) and final.job.state is JobState.SUCCEEDED
        assert len(final.job.outputs) == 1
    # Numbering continues past what the crashed process could have used.
    assert isinstance(resumed_events[0].kind, Accepted) and resumed_events[0].sequence == 1
    assert resumed_events[-1].sequence > SEQUENCE_BLOCK
    seqs = [e.sequence for e in resumed_events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_a_resumed_run_delivering_a_stored_output_again_keeps_one(env: Env) -> None:
    """The first holder stored the output and died before the job ended; the re-attached run
    delivers that output again, encoded anew (other bytes, same slot): one output stays."""

    async def output_then_hang(run: Run) -> None:
        await run.sink.checkpoint(CHECKPOINT)
        await run.sink.image(GeneratedImage(png(1), "9_00001.png", "image/png", 8, 8, seed=1))
        run.release.set()
        await asyncio.Event().wait()

    async def deliver_again(run: Run) -> None:
        await run.sink.image(GeneratedImage(png(2), "9_00001.png", "image/png", 8, 8, seed=1))

    old = ScriptedProvider(behaviour=output_then_hang)
    crashed = await env.manager(old)
    job = await submit(crashed, env)
    await within((await old.next_run()).release.wait())
    stored = await within(env.stores[0].get(job.id))
    assert stored is not None and len(stored.job.outputs) == 1

    restarted = await env.manager(ScriptedProvider(behaviour=deliver_again))
    final = (await finished(restarted, job.id))[-1].kind
    assert isinstance(final, Finished) and final.job.state is JobState.SUCCEEDED
    assert [o.sha256 for o in final.job.outputs] == [stored.job.outputs[0].sha256]


async def test_running_job_without_checkpoint_is_retried_after_restart(env: Env) -> None:
    old = ScriptedProvider(behaviour=hang)
    crashed = await env.manager(old)
    job = await submit(crashed, env)
    await within((await old.next_run()).release.wait())

    new = ScriptedProvider(behaviour=hang)
    restarted = await env.manager(new)
    events = await finished(restarted, job.id)
    retries = [e.kind for e in events if isinstance(e.kind, Retrying)]
    assert [(r.attempt, r.agent) for r in retries] == [(1, "")]  # the attempt that failed
    final = events[-1].kind
    assert isinstance(final, Finished)
    assert final.job.state is JobState.SUCCEEDED and final.job.attempts == 2
    assert [r.work.attempt for r in new.runs] == [2]


async def test_sigkill_mid_job_then_restart(env: Env) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.jobs.crash_child",
        str(env.root),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    try:
        line = await within(child.stdout.readline(), 20)
    finally:
        child.send_signal(signal.SIGKILL)
        await within(child.wait())
    running_id, queued_id = line.decode().split()

    provider = ScriptedProvider(behaviour=produce_image)
    manager = await env.manager(provider)
    for job_id in (running_id, queued_id):
        events = await finished(manager, job_id)
        final = events[-1].kind
        assert isinstance(final, Finished) and final.job.state is JobState.SUCCEEDED
    works = {r.work.job_id: r.work for r in provider.runs}
    assert dict(works[running_id].resume) == CHECKPOINT
    assert dict(works[queued_id].resume) == {}
    replay = await collect(manager.subscribe(running_id))
    assert [type(e.kind) for e in replay][:1] == [Accepted]
    assert not any(isinstance(e.kind, Progress) for e in replay)  # ended: no progress replayed
