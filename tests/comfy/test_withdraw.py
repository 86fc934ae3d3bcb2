"""A cancelled job whose prompt a dead process left on the agent: the taker withdraws it from
the checkpoint alone (``ComfyPool.withdraw``), interrupting it if it runs, deleting it if it
waits in ComfyUI's queue."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from aiserver.jobs.agent_slots import SharedAgentSlots
from aiserver.jobs.store import SlotClaim
from aiserver.providers.base import SHUTDOWN, ProviderUnavailable
from aiserver.providers.comfy.pool import AgentConfig, AgentState, ComfyPool
from aiserver.providers.comfy.workflows import WorkflowCatalog
from tests.comfy.conftest import Spawn, StandInFactory
from tests.comfy.helpers import RecordingSink
from tests.comfy.test_pool import pools, started, upscale
from tests.storage.backends import JobStoreBackend

__all__ = ["pools"]  # the fixture, shared with test_pool


async def test_a_left_prompt_is_interrupted_if_running_and_deleted_if_pending(
    make_standin: StandInFactory,
    pools: list[ComfyPool],
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    spawn: Spawn,
) -> None:
    standin = await make_standin()
    standin.hang_at("3")
    agent = AgentConfig(standin.url, name="a", max_concurrent_jobs=2)
    dying = await started(pools, catalog, agent)
    sinks = [RecordingSink(), RecordingSink()]
    runs = [
        spawn(dying.run(upscale(inputs_dir, job_id=f"01JWITHDRAW00000000000000{i}"), sink))
        for i, sink in enumerate(sinks)
    ]
    # Both queued, and both checkpoints in hand (a prompt is queued before its run hears back).
    await standin.wait_for(
        lambda: len(standin.pending_prompts) == 1 and all(s.checkpoints for s in sinks)
    )
    for run in runs:  # the process goes away, its prompts stay on the agent
        run.cancel(SHUTDOWN)
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(5):
                await run
    running, pending = ({**s.checkpoints[-1]} for s in sinks)
    if standin.running_prompt != running["prompt_id"]:
        running, pending = pending, running
    taker = await started(pools, catalog, AgentConfig(standin.url, name="a"))
    await taker.withdraw(pending)
    assert standin.received.deletes == [pending["prompt_id"]]
    assert standin.pending_prompts == []
    await taker.withdraw(running)
    assert [i.get("prompt_id") for i in standin.received.interrupts] == [running["prompt_id"]]
    await standin.wait_for(lambda: standin.running_prompt is None)
    assert len(standin.received.prompts) == 2  # nothing was queued again


async def test_withdrawing_what_is_gone_is_no_error(
    make_standin: StandInFactory, pools: list[ComfyPool], catalog: WorkflowCatalog
) -> None:
    standin = await make_standin()
    taker = await started(pools, catalog, AgentConfig(standin.url, name="a"))
    await taker.withdraw({"agent": "a", "prompt_id": "gone"})
    await taker.withdraw({"agent": "unknown", "prompt_id": "x"})  # not an agent of this pool
    await taker.withdraw({})
    assert standin.received.interrupts == []


async def test_a_late_withdraw_of_an_evicted_run_spares_the_jobs_next_prompt(
    make_standin: StandInFactory,
    pools: list[ComfyPool],
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    spawn: Spawn,
    tmp_path: Path,
) -> None:
    """An agent that went offline under a run comes back before the run's background
    withdrawal lands, and the job's retry is queued there: the withdrawal names the evicted
    run's prompt, so it takes only that one off (deleted if pending, interrupted only if it
    is the one running). The retry (a new prompt id: a retry starts from no checkpoint) runs
    to its end. The evicted run's place on the agent (the pool's count, its shared slot) is
    held until its withdrawal ended: the prompt is on the agent till then."""
    standin = await make_standin()
    standin.hang_at("3")
    pool = await started(pools, catalog, AgentConfig(standin.url, name="a", max_concurrent_jobs=2))
    backend = JobStoreBackend("postgres", tmp_path)
    store = await backend.open()
    slots = SharedAgentSlots(store, "A", 30)
    slots.keep_s = 60.0
    pool.share_slots(slots)
    agent = pool._agents["a"]
    real_withdraw = agent.client.withdraw
    answered = asyncio.Event()  # the hung agent answers the withdrawal once back

    async def late(prompt_id: str, *, started: bool = False) -> None:
        await answered.wait()
        await real_withdraw(prompt_id, started=started)

    agent.client.withdraw = late  # type: ignore[method-assign]
    job_id = "01JWITHDRAWLATE00000000000"
    try:
        first = RecordingSink()
        evicted = spawn(pool.run(upscale(inputs_dir, job_id=job_id), first))
        await standin.wait_for(lambda: standin.running_prompt is not None and first.checkpoints)
        old = first.checkpoints[-1]["prompt_id"]
        await pool._set_offline(agent, "no answer to its probe")
        with pytest.raises(ProviderUnavailable):
            async with asyncio.timeout(5):
                await evicted
        assert pool.load() == 0  # the job's retry elsewhere does not wait ...
        assert agent.busy == 1  # ... but its prompt holds its place till withdrawn
        async with asyncio.timeout(5):
            while agent.state is not AgentState.ONLINE:  # back: the next probe finds it
                await asyncio.sleep(0.02)
        retry = RecordingSink()
        again = spawn(pool.run(upscale(inputs_dir, job_id=job_id), retry))
        await standin.wait_for(lambda: len(standin.received.prompts) == 2 and retry.checkpoints)
        new = retry.checkpoints[-1]["prompt_id"]
        assert new != old and standin.pending_prompts == [new]
        # The evicted run's place is held while its prompt may be on the agent: the retry
        # took another (given back at once, the retry would reuse it: two prompts, one slot).
        assert await _holders(backend) == ["A", "A", "-"]
        assert agent.busy == 2
        answered.set()  # the withdrawal lands now, after the agent came back
        standin.release("3")
        async with asyncio.timeout(10):
            await again
        assert retry.images  # the retry ran to its end
        assert new not in standin.received.deletes
        assert [i.get("prompt_id") for i in standin.received.interrupts] == [old]
        assert agent.busy == 0  # the withdrawal ended: its place is free
        assert slots.kept("a") and await _holders(backend) == ["A", "A", "-"]
    finally:
        answered.set()
        await slots.stop()
        await backend.close()


async def test_an_evicted_run_cancelled_in_its_finally_still_gives_its_place_back(
    make_standin: StandInFactory,
    pools: list[ComfyPool],
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    spawn: Spawn,
    tmp_path: Path,
) -> None:
    """An evicted run's finally holds the agent's place (``leaving``, its shared slot) until
    its withdrawal ends, then waits on the pool's condition to announce it: another run
    holds that condition across a slow shared-slot claim, and the evicted run is cancelled
    meanwhile (its job cancelled). The place still comes back when the withdrawal ends: the
    agent's capacity does not shrink for good, nor is its slot held and renewed forever."""
    sa, sb = await make_standin(), await make_standin()
    sa.hang_at("3")
    pool = await started(
        pools,
        catalog,
        AgentConfig(sa.url, name="a", max_concurrent_jobs=1),
        AgentConfig(sb.url, name="b", max_concurrent_jobs=1),
    )
    backend = JobStoreBackend("postgres", tmp_path)
    store = await backend.open()
    slots = SharedAgentSlots(store, "A", 30)
    slots.keep_s = 60.0
    pool.share_slots(slots)
    agent = pool._agents["a"]
    real_withdraw = agent.client.withdraw
    answered = asyncio.Event()

    async def late(prompt_id: str, *, started: bool = False) -> None:
        await answered.wait()
        await real_withdraw(prompt_id, started=started)

    agent.client.withdraw = late  # type: ignore[method-assign]
    try:
        first = RecordingSink()
        work = upscale(inputs_dir, job_id="01JLEAK0000000000000000001")
        evicted = spawn(pool.run(work, first, exclude=frozenset({"b"})))
        await sa.wait_for(lambda: sa.running_prompt is not None and first.checkpoints)
        claim_slot = store.claim_slot

        async def slow(agent: str, capacity: int, holder: str, lease_s: float) -> SlotClaim | None:
            await asyncio.sleep(0.5)  # a slow round trip, under the pool's condition
            return await claim_slot(agent, capacity, holder, lease_s)

        store.claim_slot = slow  # type: ignore[method-assign]
        work = upscale(inputs_dir, job_id="01JLEAK0000000000000000002")
        other = spawn(pool.run(work, RecordingSink(), exclude=frozenset({"a"})))
        await asyncio.sleep(0.1)  # `other` holds the condition while its claim is out
        offline = spawn(pool._set_offline(agent, "no answer to its probe"))
        await asyncio.sleep(0.1)  # the evicted run's finally now waits for the condition
        assert not evicted.done() and agent.leaving == 1
        evicted.cancel()
        with pytest.raises(asyncio.CancelledError):
            await evicted
        await offline
        answered.set()  # the withdrawal ends
        async with asyncio.timeout(10):
            await other
            while agent.leaving:
                await asyncio.sleep(0.02)
        assert agent.busy == 0
        assert slots.kept("a")  # its slot given back (kept here for the next run)
    finally:
        answered.set()
        await slots.stop()
        await backend.close()


async def _holders(backend: JobStoreBackend) -> list[str]:
    held = await backend.sql(
        "SELECT string_agg(coalesce(holder, '-'), ',' ORDER BY slot) FROM agent_slots"
    )
    return str(held).split(",")
