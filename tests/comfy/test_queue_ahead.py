"""Keeping an agent busy: ``queue_ahead`` jobs (one by default) wait in ComfyUI's own queue,
still cancellable (deleted from that queue; the running one interrupted), re-attached after a
restart without being queued twice, and placed only where no agent has fewer jobs."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aiserver.providers.base import SHUTDOWN, WorkItem
from aiserver.providers.comfy.pool import AgentConfig, ComfyPool
from aiserver.providers.comfy.settings import PoolSettings
from aiserver.providers.comfy.workflows import WorkflowCatalog
from aiserver.tasks import ImageUpscaleSpec, TaskKind
from tests.comfy.conftest import Spawn, StandInFactory
from tests.comfy.helpers import FAST, RecordingSink, png, work_item, write_input

SETTINGS = PoolSettings(probe_interval_s=0.2, backoff_initial_s=0.05, timeouts=FAST)


@pytest.fixture
async def pools() -> AsyncIterator[list[ComfyPool]]:
    made: list[ComfyPool] = []
    yield made
    for pool in made:
        await pool.close()


async def started(
    pools: list[ComfyPool], catalog: WorkflowCatalog, *agents: AgentConfig
) -> ComfyPool:
    pool = ComfyPool(agents, catalog, settings=SETTINGS)
    pools.append(pool)
    async with asyncio.timeout(5):
        await pool.start()
    return pool


def upscales(inputs_dir: Path, count: int) -> list[WorkItem]:
    out = []
    for k in range(count):
        folder = inputs_dir / str(k)
        folder.mkdir()
        image = write_input(folder, "image", png(20 + k, 16))
        job = f"01JAHEAD{k:018d}"
        out.append(
            work_item(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec(), {"image": image}, job_id=job)
        )
    return out


def test_queue_ahead_is_validated() -> None:
    assert AgentConfig("http://gpu-1:8188", queue_ahead=2).slots == 3
    with pytest.raises(ValueError, match="queue_ahead"):
        AgentConfig("http://gpu-1:8188", queue_ahead=-1)


async def test_the_next_prompt_waits_on_the_agent_and_can_be_cancelled(
    make_standin: StandInFactory,
    pools: list[ComfyPool],
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    spawn: Spawn,
) -> None:
    standin = await make_standin()
    standin.hang_at("3")
    agent = AgentConfig(standin.url, name="a", max_concurrent_jobs=1, queue_ahead=1)
    pool = await started(pools, catalog, agent)
    assert pool.capacity() == 2
    works = upscales(inputs_dir, 3)
    sinks = [RecordingSink() for _ in works]
    tasks = [spawn(pool.run(w, s)) for w, s in zip(works, sinks, strict=True)]
    await standin.wait_for(
        lambda: standin.running_prompt is not None and len(standin.pending_prompts) == 1
    )
    await asyncio.sleep(0.1)
    assert len(standin.received.prompts) == 2  # the third waits in the service, not there
    assert pool.load() == 2
    (queued_on_agent,) = standin.pending_prompts
    waiting = next(
        k
        for k, s in enumerate(sinks)
        if s.checkpoints and s.checkpoints[0]["prompt_id"] == queued_on_agent
    )
    tasks[waiting].cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await tasks[waiting]
    await standin.wait_for(lambda: standin.received.deletes == [queued_on_agent])
    await standin.wait_for(lambda: len(standin.received.prompts) == 3)  # its slot went on
    standin.release("3")
    rest = [k for k in range(3) if k != waiting]
    async with asyncio.timeout(10):
        await asyncio.gather(*(tasks[k] for k in rest))
    sizes = {(2 * works[k].inputs["image"].width, 32) for k in rest}
    assert {sinks[k].image_sizes()[0] for k in rest} == sizes


async def test_jobs_go_to_an_idle_agent_before_a_queue(
    make_standin: StandInFactory,
    pools: list[ComfyPool],
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    spawn: Spawn,
) -> None:
    a, b = await make_standin(), await make_standin()
    for standin in (a, b):
        standin.hang_at("3")
    pool = await started(
        pools,
        catalog,
        AgentConfig(a.url, name="a", queue_ahead=1, priority=5),
        AgentConfig(b.url, name="b", queue_ahead=1),
    )
    works = upscales(inputs_dir, 3)
    tasks = []
    for work in works:
        tasks.append(spawn(pool.run(work, RecordingSink())))
        await asyncio.sleep(0.05)
    await a.wait_for(lambda: len(a.received.prompts) + len(b.received.prompts) == 3)
    # One each first (priority breaks the tie), then the third queues behind the first.
    assert (len(a.received.prompts), len(b.received.prompts)) == (2, 1)
    for standin in (a, b):
        standin.release("3")
    async with asyncio.timeout(10):
        await asyncio.gather(*tasks)


async def test_cancelling_the_running_job_interrupts_it_and_the_queued_one_runs(
    make_standin: StandInFactory,
    pools: list[ComfyPool],
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    spawn: Spawn,
) -> None:
    standin = await make_standin()
    standin.hang_at("3")
    pool = await started(pools, catalog, AgentConfig(standin.url, name="a"))  # the defaults
    assert pool.capacity() == 2
    works = upscales(inputs_dir, 2)
    sinks = [RecordingSink() for _ in works]
    tasks = [spawn(pool.run(w, s)) for w, s in zip(works, sinks, strict=True)]
    await standin.wait_for(
        lambda: standin.running_prompt is not None and len(standin.pending_prompts) == 1
    )
    running = standin.running_prompt
    first = next(k for k, s in enumerate(sinks) if s.checkpoints[0]["prompt_id"] == running)
    tasks[first].cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await tasks[first]
    assert standin.received.interrupts == [{"prompt_id": running}]
    assert standin.received.deletes == []  # the prompt queued ahead is left alone
    standin.release("3")
    async with asyncio.timeout(10):
        await tasks[1 - first]
    assert sinks[1 - first].image_sizes() == [(2 * works[1 - first].inputs["image"].width, 32)]
    assert len(standin.received.prompts) == 2


async def test_a_job_queued_ahead_is_reattached_after_a_restart_never_run_twice(
    make_standin: StandInFactory,
    pools: list[ComfyPool],
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    spawn: Spawn,
) -> None:
    standin = await make_standin()
    standin.hang_at("3")
    pool = await started(pools, catalog, AgentConfig(standin.url, name="a"))
    works = upscales(inputs_dir, 2)
    sinks = [RecordingSink() for _ in works]
    tasks = [spawn(pool.run(w, s)) for w, s in zip(works, sinks, strict=True)]
    await standin.wait_for(
        lambda: standin.running_prompt is not None and len(standin.pending_prompts) == 1
    )
    for task in tasks:  # the coordinator stops: both prompts stay on the agent
        task.cancel(SHUTDOWN)
    for task in tasks:
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(5):
                await task
    assert standin.received.deletes == [] and standin.received.interrupts == []
    checkpoints = [sink.checkpoints[-1] for sink in sinks]
    assert {c["prompt_id"] for c in checkpoints} == {
        standin.running_prompt,
        *standin.pending_prompts,
    }
    later = await started(pools, catalog, AgentConfig(standin.url, name="a"))
    again = [RecordingSink() for _ in works]
    resumed = [
        spawn(later.run(dataclasses.replace(w, resume=c), s))
        for w, c, s in zip(works, checkpoints, again, strict=True)
    ]
    client_id = checkpoints[0]["client_id"]
    # Both runs follow their prompts on one socket under the old client id (ComfyUI keeps one
    # socket per client id: a second would take the first one's messages).
    await standin.wait_for(lambda: standin.received.ws_connects.count(client_id) == 2)
    await asyncio.sleep(0.1)
    assert standin.received.ws_connects.count(client_id) == 2
    standin.release("3")
    async with asyncio.timeout(10):
        await asyncio.gather(*resumed)
    for work, sink in zip(works, again, strict=True):
        assert sink.image_sizes() == [(2 * work.inputs["image"].width, 32)]
    assert len(standin.received.prompts) == 2  # followed where they were: never queued again
