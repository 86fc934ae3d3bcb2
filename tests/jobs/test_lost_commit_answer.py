"""A held job's write on PostgreSQL that commits but whose answer is lost (the connection
reset after COMMIT, before the reply: tests/support/tcp_cut.py ``lose_reply_to``). The writer
rides the "outage" out and writes again; the job must still end here exactly once: one
Finished, for the local caller and a watcher elsewhere alike, the terminal hooks once, one
webhook in the outbox, its inputs freed, nothing left held."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from aiserver.jobs.event_codec import FINISHED
from aiserver.jobs.model import Finished, Job, JobEvent, JobState
from tests.jobs import test_store_outage as outage
from tests.jobs.helpers import ScriptedProvider, gated, submit, within
from tests.jobs.test_store_outage import Coordinators

# The same two coordinators behind a link to the database that a test can cut.
relay = outage.relay
pair = outage.pair


async def _all(events: AsyncIterator[JobEvent]) -> list[JobEvent]:
    return [e async for e in events]


@pytest.mark.parametrize(
    "lost",
    [
        pytest.param(b"SUCCEEDED", id="final-write"),  # the end, its Finished, the release
        pytest.param(b"out.png", id="output-save"),  # a save that keeps the lease
    ],
)
async def test_a_write_committed_without_its_answer_ends_the_job_here_exactly_once(
    pair: Coordinators, lost: bytes
) -> None:
    runner = ScriptedProvider("p1", gated)
    a = await pair.manager(runner, relayed=True)
    b = await pair.manager(ScriptedProvider("p1", tasks=()))  # a watcher elsewhere
    ended: list[Job] = []
    a.add_terminal_hook(ended.append)
    a.use_outbox(lambda job: [("http://hook.invalid/", job.id.encode())], lambda: None)
    job = await submit(a, pair.env)
    spooled = pair.env.spool.path_for(job.inputs[0].sha256)
    run = await runner.next_run()
    here = asyncio.ensure_future(_all(a.subscribe(job.id)))  # the SYNC caller's stream
    elsewhere = asyncio.ensure_future(_all(b.subscribe(job.id)))
    await asyncio.sleep(0.3)  # both following
    pair.relay.lose_reply_to(lost)
    run.release.set()
    for stream in (here, elsewhere):
        events = await within(stream, 15)
        finished = [e for e in events if isinstance(e.kind, Finished)]
        assert len(finished) == 1 and events[-1] is finished[0], [e.kind for e in events]
        assert finished[0].kind.job.state is JobState.SUCCEEDED
        sequences = [e.sequence for e in events]
        assert sequences == sorted(set(sequences)), sequences
    assert pair.relay.lost_replies == 1  # the fault happened
    assert [j.state for j in ended] == [JobState.SUCCEEDED]  # the hooks, once
    assert len(runner.runs) == 1
    stored = await pair.backend.open()
    rows = await stored.events(job.id)
    assert [r.kind for r in rows].count(FINISHED) == 1
    record = await stored.get(job.id)
    assert record is not None and record.job.state is JobState.SUCCEEDED
    assert (
        await pair.backend.sql(f"SELECT count(*) FROM webhook_outbox WHERE job_id = '{job.id}'")
        == 1
    )
    assert await pair.backend.sql(f"SELECT lease_holder FROM jobs WHERE id = '{job.id}'") is None
    assert job.id not in a._active  # nothing held for it here
    async with asyncio.timeout(5):  # its input freed (no unfinished job needs it)
        while spooled.exists():
            await asyncio.sleep(0.05)


async def test_a_final_write_committed_without_its_answer_outlasting_the_lease_ends_here(
    pair: Coordinators, caplog: pytest.LogCaptureFixture
) -> None:
    """The final write commits (the end, its Finished, the lease released), its answer is lost
    and the database stays away longer than the lease: no taker will come for a job the store
    has ended, so this process must not drop it as left to one: once the store answers, the
    job ends here as stored (the local caller's Finished, the terminal hooks). The outage is
    logged once for the job, and its end once, not at every try."""
    caplog.set_level(logging.INFO, logger="aiserver.jobs.job_writes")
    runner = ScriptedProvider("p1", gated)
    a = await pair.manager(runner, relayed=True)
    ended: list[Job] = []
    a.add_terminal_hook(ended.append)
    job = await submit(a, pair.env)
    run = await runner.next_run()
    here = asyncio.ensure_future(_all(a.subscribe(job.id)))
    await asyncio.sleep(0.3)
    pair.relay.lose_reply_to(b"SUCCEEDED")
    run.release.set()
    async with asyncio.timeout(15):
        while pair.relay.lost_replies == 0:
            await asyncio.sleep(0.002)
    pair.relay.cut()  # before the writer's next try (0.1 s later)
    await asyncio.sleep(outage.LEASE_S * 2)  # the lease left at the failure runs out
    assert not here.done()
    pair.relay.restore()
    events = await within(here, 15)
    finished = [e for e in events if isinstance(e.kind, Finished)]
    assert len(finished) == 1 and events[-1] is finished[0], [e.kind for e in events]
    assert finished[0].kind.job.state is JobState.SUCCEEDED
    assert [j.state for j in ended] == [JobState.SUCCEEDED]
    assert len(runner.runs) == 1
    assert job.id not in a._active
    said = [r.getMessage() for r in caplog.records if job.id in r.getMessage()]
    assert sum("store unreachable" in m for m in said) == 1, said
    assert sum("store reachable again" in m for m in said) == 1, said
