"""Nothing left on the agent: inputs under names reused once their job ended, outputs never in
``output/`` (the pool with the service's settings)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aiserver.providers.base import WorkItem
from aiserver.providers.comfy.pool import AgentConfig, ComfyPool
from aiserver.providers.comfy.settings import PoolSettings
from aiserver.providers.comfy.workflows import WorkflowCatalog
from aiserver.tasks import ImageUpscaleSpec, TaskKind
from tests.comfy.conftest import Spawn
from tests.comfy.helpers import FAST, RecordingSink, decoded_size, png, work_item, write_input
from tests.support.comfy_standin import ComfyStandIn

SETTINGS = PoolSettings(
    probe_interval_s=0.2,
    backoff_initial_s=0.05,
    backoff_max_s=0.2,
    timeouts=FAST,
    outputs_over_websocket=True,
    reuse_input_names=True,
)


@pytest.fixture
async def pool(standin: ComfyStandIn, catalog: WorkflowCatalog) -> AsyncIterator[ComfyPool]:
    agent = AgentConfig(standin.url, name="a", max_concurrent_jobs=4)
    made = ComfyPool([agent], catalog, settings=SETTINGS)
    async with asyncio.timeout(5):
        await made.start()
    yield made
    await made.close()


def upscales(inputs_dir: Path, count: int) -> list[WorkItem]:
    out = []
    for k in range(count):
        folder = inputs_dir / str(k)
        folder.mkdir()
        image = write_input(folder, "image", png(20 + k, 16, (k * 17 % 256, 90, 30)))
        job = f"01JFILES{k:018d}"
        out.append(
            work_item(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec(), {"image": image}, job_id=job)
        )
    return out


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


async def test_jobs_one_after_another_reuse_one_input_name(
    standin: ComfyStandIn, pool: ComfyPool, inputs_dir: Path
) -> None:
    for work in upscales(inputs_dir, 5):
        sink = RecordingSink()
        async with asyncio.timeout(10):
            await pool.run(work, sink)
        source = work.inputs["image"]
        assert sink.image_sizes() == [(2 * source.width, 2 * source.height)]
        assert decoded_size(sink.images[0].data) == (2 * source.width, 2 * source.height)
    names = {u.name for u in standin.received.uploads}
    assert len(names) == 1 and all(u.overwrite for u in standin.received.uploads)
    (only,) = files(standin.input_dir)
    assert only.name in names
    assert only.read_bytes() == standin.received.uploads[-1].data  # the last job's input
    assert files(standin.output_dir) == []


async def test_concurrent_jobs_hold_one_name_each_until_they_end(
    standin: ComfyStandIn, pool: ComfyPool, inputs_dir: Path
) -> None:
    works = upscales(inputs_dir, 12)
    sinks = [RecordingSink() for _ in works]
    async with asyncio.timeout(20):
        await asyncio.gather(*(pool.run(w, s) for w, s in zip(works, sinks, strict=True)))
    for work, sink in zip(works, sinks, strict=True):
        source = work.inputs["image"]  # each job got its own input, not a neighbour's
        assert sink.image_sizes() == [(2 * source.width, 2 * source.height)]
    # The agent's slots (4 running + 1 queued ahead): the most in flight at once.
    assert len(files(standin.input_dir)) <= 5
    assert files(standin.output_dir) == []


async def test_a_cancelled_job_gives_its_name_back(
    standin: ComfyStandIn, pool: ComfyPool, inputs_dir: Path, spawn: Spawn
) -> None:
    first, second = upscales(inputs_dir, 2)
    standin.hang_at("3")
    task = spawn(pool.run(first, RecordingSink()))
    await standin.wait_for(lambda: standin.running_prompt is not None)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await task
    standin.release("3")
    sink = RecordingSink()
    async with asyncio.timeout(10):
        await pool.run(second, sink)
    assert sink.image_sizes() == [(42, 32)]  # its own input, though under the same name
    assert len({u.name for u in standin.received.uploads}) == 1


async def test_many_jobs_leave_only_the_inputs_of_their_slots(
    standin: ComfyStandIn, pool: ComfyPool, inputs_dir: Path
) -> None:
    """Nothing outlives its job on the agent: after 60 jobs, 8 at a time, ``output/`` and
    ``temp/`` are empty and ``input/`` holds one file per slot (the most in flight at once),
    which the next jobs overwrite. The stand-in writes what ComfyUI would: uploads to
    ``input/``, ``SaveImage`` to ``output/``, ``PreviewImage`` to ``temp/``."""
    works = upscales(inputs_dir, 60)
    gate = asyncio.Semaphore(8)
    peak = 0

    async def one(work: WorkItem) -> RecordingSink:
        nonlocal peak
        sink = RecordingSink()
        async with gate:
            await pool.run(work, sink)
        peak = max(peak, len(files(standin.input_dir)))
        return sink

    async with asyncio.timeout(60):
        sinks = await asyncio.gather(*(one(w) for w in works))
    for work, sink in zip(works, sinks, strict=True):
        source = work.inputs["image"]
        assert sink.image_sizes() == [(2 * source.width, 2 * source.height)]
    assert len(standin.received.prompts) == 60
    assert files(standin.output_dir) == files(standin.temp_dir) == []
    assert peak <= 5 and len(files(standin.input_dir)) <= 5  # 4 running + 1 queued ahead
