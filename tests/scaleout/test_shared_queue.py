"""One queue across coordinator processes (issue 17): positions among every coordinator's
queued jobs, WatchJobs of every coordinator's jobs, cancel of a job whose holder died while
its prompt ran, and work stealing by an idle coordinator."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from imagetasks.v1 import job_pb2

from tests.scaleout.cluster import (
    Cluster,
    cancel,
    job_id,
    submit,
    until_job,
    watch,
    watch_jobs,
)

RUNNING = job_pb2.Job.STATE_RUNNING
SUCCEEDED = job_pb2.Job.STATE_SUCCEEDED
CANCELLED = job_pb2.Job.STATE_CANCELLED


async def test_positions_are_global_and_watchjobs_sees_every_coordinator(
    tmp_path: Path,
) -> None:
    # One prompt at a time on the agent, none queued ahead: the others wait in the service.
    async with Cluster(
        tmp_path, coordinators=2, agents=1, max_jobs=1, queue_ahead=0, step_delay_s=0.2
    ) as c:
        a, b = (s.target for s in c.servers)
        seen: list[job_pb2.Job] = []
        feed = asyncio.create_task(watch_jobs(b, seen))
        long_a = await submit(a, 1, steps=150)
        await until_job(b, long_a, state=RUNNING)
        long_b = await submit(b, 2, steps=150)  # waits on b for the agent's one slot
        await until_job(a, long_b, state=RUNNING)
        short = [await submit(t, 3 + i, steps=2) for i, t in enumerate((a, b, a))]
        # Queued on two coordinators, ranked as one queue, asked on either.
        for position, name in enumerate(short, start=1):
            for target in (a, b):
                await until_job(target, name, queue_position=position)
        # b's list shows a's queued job with a place (the one its holder last stored: the exact
        # place is GetJob's, above; a correction may ride on a later write). The feed sends a
        # row as it reads it, so under load it may first read a row a version late: wait while
        # the job is still queued (it stays so until the long jobs are cancelled).
        async with asyncio.timeout(15):
            while not any(j.name == short[2] and j.queue_position >= 2 for j in seen):
                await asyncio.sleep(0.1)
        await cancel(b, long_a)
        await cancel(a, long_b)
        for name in short:
            done = await watch(b, name)
            assert done[-1].finished.job.state == SUCCEEDED
        async with asyncio.timeout(10):
            while {j.name for j in seen if j.state in (SUCCEEDED, CANCELLED)} != {
                long_a,
                long_b,
                *short,
            }:
                await asyncio.sleep(0.1)
        feed.cancel()
        # ... then running, then ended.
        assert any(j.name == long_a and j.state == RUNNING for j in seen)


async def test_cancel_after_the_holder_died_withdraws_its_running_prompt(
    tmp_path: Path,
) -> None:
    async with Cluster(tmp_path, coordinators=2, agents=1, max_jobs=1, step_delay_s=0.2) as c:
        a, b = (s.target for s in c.servers)
        long_job = await submit(a, 1, steps=150)  # 30 s on the agent
        async with asyncio.timeout(30):
            while not (await c.standins.stats())["posted"].get(job_id(long_job)):
                await asyncio.sleep(0.1)
        victim = c.servers[0]
        victim.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        await victim.kill()
        await cancel(b, long_job)  # b takes it over once the lease lapses
        await until_job(b, long_job, state=CANCELLED)
        short = await submit(b, 2, steps=2)
        done = await watch(b, short, timeout_s=25)  # the agent is free: the prompt is gone
        assert done[-1].finished.job.state == SUCCEEDED
        stats = await c.standins.stats()
        assert stats["posted"].get(job_id(long_job)) == 1
        assert not stats["succeeded"].get(job_id(long_job))  # interrupted, not run to the end
        withdrawn = [
            e for e in c.servers[1].logs() if "withdrew prompt" in str(e.get("message", ""))
        ]
        assert withdrawn


async def test_an_idle_coordinator_steals_queued_jobs_and_each_runs_once(
    tmp_path: Path,
) -> None:
    async with Cluster(
        tmp_path,
        coordinators=2,
        agents=2,
        max_jobs=1,
        queue_ahead=0,
        step_delay_s=0.2,
        env={"AISERVER_JOB_STEAL_AFTER_S": "1.0"},
    ) as c:
        a = c.servers[0].target
        names = [await submit(a, i, steps=30) for i in range(4)]  # a starts 2, queues 2
        watchers = [asyncio.create_task(watch(a, n)) for n in names]  # callers on a
        results = await asyncio.gather(*watchers)
        assert all(r[-1].finished.job.state == SUCCEEDED for r in results)
        stolen = [
            str(e["message"])
            for e in c.servers[1].logs()
            if "stolen from" in str(e.get("message", ""))
        ]
        assert stolen and all(job_id(names[0]) not in m for m in stolen)  # not the running one
        stats = await c.standins.stats()
        assert sorted(stats["succeeded"]) == sorted(job_id(n) for n in names)
        assert set(stats["succeeded"].values()) == {1}  # each ran once
        assert set(stats["posted"].values()) == {1}
