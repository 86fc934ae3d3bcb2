"""A cancelled job whose prompt a dead process left on the agent: the taker withdraws it from
the checkpoint alone (``ComfyPool.withdraw``), interrupting it if it runs, deleting it if it
waits in ComfyUI's queue."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from aiserver.providers.base import SHUTDOWN
from aiserver.providers.comfy.pool import AgentConfig, ComfyPool
from aiserver.providers.comfy.workflows import WorkflowCatalog
from tests.comfy.conftest import Spawn, StandInFactory
from tests.comfy.helpers import RecordingSink
from tests.comfy.test_pool import pools, started, upscale

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
