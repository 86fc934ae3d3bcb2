"""Progress a caller sees never goes back, even when a node's raw steps start over.

A second sampler pass or the next batch of a tiled upscale reports steps 1..max again: the raw
fraction of that node drops. No recorded trace does this, so the stand-in is told to.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

from aiserver.providers.comfy.pool import AgentConfig, ComfyPool, PoolSettings
from aiserver.providers.comfy.workflows import WorkflowCatalog
from aiserver.tasks import ImageToImageSpec, TaskKind
from tests.comfy.conftest import StandInFactory
from tests.comfy.helpers import FAST, RecordingSink, png, work_item, write_input

KSAMPLER = "7"  # in workflows/image_to_image.json


async def test_fraction_never_decreases_when_a_node_restarts_its_steps(
    make_standin: StandInFactory, catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    standin = await make_standin()
    standin.repeat_steps(KSAMPLER)
    image = write_input(inputs_dir, "image", png(48, 32))
    spec = ImageToImageSpec(positive_prompt="a lighthouse", steps=4)
    work = work_item(TaskKind.IMAGE_TO_IMAGE, spec, {"image": image})
    sink = RecordingSink()
    pool = ComfyPool(
        [AgentConfig(standin.url, name="agent-a")], catalog, settings=PoolSettings(timeouts=FAST)
    )
    async with pool:
        async with asyncio.timeout(15):
            await pool.run(work, sink)
    sampler = [u for u in sink.progress_updates if u.node == KSAMPLER and u.max_steps]
    steps = [u.step for u in sampler]
    # The agent really restarted the node's steps: the raw progress fell back.
    assert any(b < a for a, b in itertools.pairwise(steps)), steps
    fractions = sink.fractions()
    assert fractions == sorted(fractions), fractions
    assert fractions[-1] == 1.0 and len(sink.images) == 1
