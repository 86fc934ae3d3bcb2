"""Another socket under our client id (a coordinator that took over our prompts): ComfyUI then
sends our messages to it, and its close unregisters the id; our runs notice and re-open."""

from __future__ import annotations

import asyncio
from pathlib import Path

from websockets.asyncio.client import connect

from aiserver.providers.comfy.pool import AgentConfig, ComfyPool
from aiserver.providers.comfy.workflows import WorkflowCatalog
from tests.comfy.conftest import StandInFactory
from tests.comfy.test_socket_outputs import SETTINGS, img2img, run


async def test_a_second_socket_under_our_client_id_silences_ours_and_the_runs_still_succeed(
    make_standin: StandInFactory, catalog: WorkflowCatalog, tmp_path: Path
) -> None:
    standin = await make_standin(step_delay_s=0.05)
    pool = ComfyPool([AgentConfig(standin.url, name="a")], catalog, settings=SETTINGS)
    try:
        async with asyncio.timeout(5):
            await pool.start()
        works = []
        for k in range(3):
            folder = tmp_path / f"in{k}"
            folder.mkdir()
            works.append(img2img(folder))
        tasks = [asyncio.create_task(run(pool, w)) for w in works]
        await standin.wait_for(lambda: len(standin.received.prompts) >= 2)
        (client_id,) = {body["client_id"] for body in standin.received.prompts}
        before = len(standin.received.ws_connects)
        url = standin.url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
        # It takes our id's messages while open; its close then pops the id (ours silent again).
        async with connect(url, close_timeout=0.5):
            await asyncio.wait(tasks, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        sinks = await asyncio.gather(*tasks)
    finally:
        await pool.close()
    assert [s.image_sizes() for s in sinks] == [[(64, 48)]] * 3
    # Ours re-opened (at least once: the second socket took the id) under the same id: ComfyUI
    # routes its prompts by it.
    assert len(standin.received.ws_connects) > before + 1
    assert set(standin.received.ws_connects) == {client_id}
