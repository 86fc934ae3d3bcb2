"""Coordinators as real processes on one PostgreSQL schema and one S3 bucket (issue 17).

Stand-in ComfyUI agents run in a process of their own and count, per job, the prompts they
were sent and completed, and their peak of prompts held at once. The kill test runs 30 jobs
in CI; ``AISERVER_SCALEOUT_FULL=1`` runs the issue's 300.
"""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path

from imagetasks.v1 import job_pb2

from tests.scaleout.cluster import (
    LEASE_S,
    Cluster,
    cancel,
    full_mode,
    job_id,
    list_all,
    submit,
    until_job,
    watch,
    watch_to_the_end,
)

SUCCEEDED = job_pb2.Job.STATE_SUCCEEDED


async def test_submit_on_a_watch_on_b_cancel_on_c_list_from_any(tmp_path: Path) -> None:
    async with Cluster(tmp_path, coordinators=3, agents=1, max_jobs=1, step_delay_s=0.2) as c:
        a, b, cc = (s.target for s in c.servers)
        long_job = await submit(a, 1, steps=150)
        watching = asyncio.create_task(watch(b, long_job))
        await until_job(cc, long_job, 60, state=job_pb2.Job.STATE_RUNNING)
        cancelled = await cancel(cc, long_job)
        assert cancelled.state == job_pb2.Job.STATE_CANCELLED
        events = await asyncio.wait_for(watching, 60)
        kinds = [e.WhichOneof("kind") for e in events]
        assert kinds[0] == "accepted" and kinds[-1] == "finished"
        assert events[-1].finished.job.state == job_pb2.Job.STATE_CANCELLED
        sequences = [e.sequence for e in events]
        assert sequences == sorted(set(sequences))

        short_job = await submit(b, 2, steps=2)
        done = await watch(cc, short_job)
        final = done[-1].finished.job
        assert final.state == SUCCEEDED and len(final.outputs) == 1
        assert "output" in [e.WhichOneof("kind") for e in done]

        for target in (a, b, cc):
            states = {j.name: j.state for j in await list_all(target)}
            assert states == {long_job: job_pb2.Job.STATE_CANCELLED, short_job: SUCCEEDED}
        stats = await c.standins.stats()
        assert stats["succeeded"].get(job_id(short_job)) == 1
        assert stats["posted"].get(job_id(long_job), 0) <= 1  # interrupted, never sent again


async def test_jobs_spread_over_three_survive_a_sigkill_and_none_runs_twice(
    tmp_path: Path,
) -> None:
    count = 300 if full_mode() else 30
    async with Cluster(tmp_path, coordinators=3, agents=2, max_jobs=4, step_delay_s=0.02) as c:
        targets = [s.target for s in c.servers]
        names: list[str] = []
        for i in range(count):
            names.append(await submit(targets[i % 3], i, steps=8))
        watchers = [
            asyncio.create_task(watch_to_the_end(_rotated(targets, i), name, timeout_s=120 + count))
            for i, name in enumerate(names)
        ]
        victim = c.servers[2]
        async with asyncio.timeout(60):  # mid-run: a quarter done, every coordinator busy
            while sum((await c.standins.stats())["succeeded"].values()) < count // 4:
                await asyncio.sleep(0.05)
        victim.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        await victim.kill()
        await asyncio.sleep(LEASE_S)
        await c.restart(2)  # later, with a new identity: it takes work again
        results = await asyncio.gather(*watchers)
        adopted = [
            e
            for s in c.servers[:2]
            for e in s.logs()
            if "adopted (taken over)" in str(e.get("message", ""))
        ]
        assert adopted, "the killed coordinator's jobs were taken over by the others"
        assert all(r.kinds[-1] == "finished" for r in results)  # no watcher missed it
        jobs = {j.name: j for j in await list_all(c.servers[0].target)}
        assert sorted(jobs) == sorted(names)  # none lost
        assert {j.state for j in jobs.values()} == {SUCCEEDED}
        outputs = {name: len(j.outputs) for name, j in jobs.items() if len(j.outputs) != 1}
        assert not outputs, f"jobs without exactly one output: {outputs}"
        stats = await c.standins.stats()
        completed = stats["succeeded"]
        twice = {k: n for k, n in completed.items() if n > 1}
        assert not twice, f"run to completion more than once: {twice}"
        assert sorted(completed) == sorted(job_id(n) for n in names)
        # A prompt that ended while its coordinator was dead was queued again for its image
        # frames (nothing is kept on the agent's disk), once at most.
        assert all(n == 1 for n in stats["repeated"].values()), stats["repeated"]


async def test_two_coordinators_never_put_more_than_an_agents_slots_on_it(
    tmp_path: Path,
) -> None:
    # The agent admits 2 jobs at a time: one running and one waiting in its own queue (the
    # default queue_ahead=1).
    async with Cluster(
        tmp_path, coordinators=2, agents=1, max_jobs=1, queue_ahead=1, step_delay_s=0.05
    ) as c:
        targets = [s.target for s in c.servers]
        names = await asyncio.gather(*(submit(targets[i % 2], i, steps=4) for i in range(12)))
        results = await asyncio.gather(*(watch(targets[0], n) for n in names))
        assert {r[-1].finished.job.state for r in results} == {SUCCEEDED}
        stats = await c.standins.stats()
        assert stats["peak"] == [2]  # both coordinators filled it, never beyond its 2 slots


def _rotated(targets: list[str], i: int) -> list[str]:
    k = i % len(targets)
    order = targets[k:] + targets[:k]
    random.Random(i).shuffle(order[1:])
    return order
