"""One websocket per agent: every run on it shares the socket; a drop is recovered for all."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from websockets.asyncio.server import ServerConnection, serve

from aiserver.jobs.model import Stage
from aiserver.providers.base import ProviderUnavailable, WorkItem
from aiserver.providers.comfy import messages as msg
from aiserver.providers.comfy.channel import Subscription
from aiserver.providers.comfy.client import ComfyClient
from aiserver.providers.comfy.workflows import WorkflowCatalog
from aiserver.providers.failures import Cause
from aiserver.tasks import ImageToImageSpec, TaskKind
from tests.comfy.conftest import Spawn, StandInFactory
from tests.comfy.helpers import DirectAgent, RecordingSink, png, work_item, write_input
from tests.support.comfy_standin import ComfyStandIn


def jobs(inputs_dir: Path, count: int) -> list[WorkItem]:
    out = []
    for k in range(count):
        folder = inputs_dir / str(k)
        folder.mkdir()
        image = write_input(folder, "image", png(64, 48, (k * 40 % 256, 60, 210)))
        spec = ImageToImageSpec(positive_prompt=f"lighthouse {k}", steps=3)  # type: ignore[call-arg]
        work = work_item(TaskKind.IMAGE_TO_IMAGE, spec, {"image": image}, job_id=f"01JOB{k:021d}")
        out.append(work)
    return out


async def run_all(
    client: DirectAgent, catalog: WorkflowCatalog, works: list[WorkItem]
) -> list[RecordingSink]:
    sinks = [RecordingSink() for _ in works]
    async with asyncio.timeout(20):
        await asyncio.gather(
            *(client.run(w, catalog.get(w.task), s) for w, s in zip(works, sinks, strict=True))
        )
    return sinks


async def test_concurrent_runs_share_one_websocket_and_ask_no_queue(
    standin: ComfyStandIn, client: DirectAgent, catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    sinks = await run_all(client, catalog, jobs(inputs_dir, 4))
    assert [s.image_sizes() for s in sinks] == [[(64, 48)]] * 4
    (socket_id,) = set(standin.received.ws_connects)
    assert len(standin.received.ws_connects) == 1
    assert {s.checkpoints[0]["client_id"] for s in sinks} == {socket_id}
    assert {body["client_id"] for body in standin.received.prompts} == {socket_id}
    paths = [path for _, path, _ in standin.received.requests]
    assert not any(p.endswith("/queue") for p in paths)  # positions come from the channel
    # Each run saw only its own prompt's progress: one prompt id per checkpoint, all distinct.
    assert len({s.checkpoints[0]["prompt_id"] for s in sinks}) == 4
    for sink in sinks:
        fractions = sink.fractions()
        assert fractions == sorted(fractions) and fractions[-1] == 1.0


async def test_queue_positions_count_the_prompts_ahead(
    standin: ComfyStandIn,
    client: DirectAgent,
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    spawn: Spawn,
) -> None:
    standin.pause_queue()
    works = jobs(inputs_dir, 3)
    sinks = [RecordingSink() for _ in works]
    tasks = []
    for work, sink in zip(works, sinks, strict=True):
        tasks.append(spawn(client.run(work, catalog.get(work.task), sink)))
        await standin.wait_for(
            lambda s=sink: any(u.stage is Stage.PENDING for u in s.progress_updates)
        )  # type: ignore[misc]
    firsts = [next(u for u in s.progress_updates if u.stage is Stage.PENDING) for s in sinks]
    assert [u.queue_position for u in firsts] == [0, 1, 2]
    standin.resume_queue()
    async with asyncio.timeout(20):
        await asyncio.gather(*tasks)
    assert [s.image_sizes() for s in sinks] == [[(64, 48)]] * 3


async def test_a_drop_is_recovered_once_for_every_run_on_the_socket(
    make_standin: StandInFactory, catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    standin = await make_standin(step_delay_s=0.01)
    standin.drop_websockets_at("7", outage_s=0.1)
    client = DirectAgent("agent-a", standin.url)
    try:
        sinks = await run_all(client, catalog, jobs(inputs_dir, 3))
    finally:
        await client.aclose()
    assert [s.image_sizes() for s in sinks] == [[(64, 48)]] * 3
    socket_id = sinks[0].checkpoints[0]["client_id"]
    assert standin.received.ws_connects == [socket_id, socket_id]  # one reconnect, shared
    assert len(standin.received.prompts) == 3  # followed, never queued again


async def test_a_closed_client_fails_its_runs_as_unavailable(
    standin: ComfyStandIn, catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    client = DirectAgent("agent-a", standin.url)
    await client.aclose()
    (work,) = jobs(inputs_dir, 1)
    with pytest.raises(ProviderUnavailable) as caught:
        await client.run(work, catalog.get(work.task), RecordingSink())
    assert caught.value.cause is Cause.CLIENT_CLOSED


async def test_an_agent_restart_loses_every_prompt_on_the_socket_and_each_run_says_so(
    standin: ComfyStandIn,
    client: DirectAgent,
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    spawn: Spawn,
) -> None:
    standin.hang_at("7")
    works = jobs(inputs_dir, 2)
    tasks = [spawn(client.run(w, catalog.get(w.task), RecordingSink())) for w in works]
    await standin.wait_for(lambda: len(standin.received.prompts) == 2)
    await standin.kill()
    await standin.restart()  # same port, empty queue and history
    for task in tasks:
        with pytest.raises(ProviderUnavailable) as caught:
            async with asyncio.timeout(10):
                await task
        assert caught.value.cause is Cause.PROMPT_LOST
    # Both runs came back through one new socket, then asked after their own prompt.
    socket_id = standin.received.ws_connects[0]
    assert standin.received.ws_connects == [socket_id, socket_id]


async def test_the_websocket_is_opened_without_compression() -> None:
    """Frames are small JSON and already-compressed images: inflating each one only cost CPU
    (and the agent the deflate of every image it sends), so no permessage-deflate is offered."""
    offered: list[str | None] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        offered.append(ws.request.headers.get("Sec-WebSocket-Extensions"))
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        agent = ComfyClient("plain", f"http://127.0.0.1:{port}")
        socket = await agent.open_websocket("c1")
        await socket.close()
        await agent.aclose()
    assert offered == [None]


def drained(sub: Subscription) -> list[msg.Message]:
    out = []
    while (message := sub.recv_nowait()) is not None:
        out.append(message)
    return out


async def test_a_subscription_hears_the_queue_until_its_prompt_starts_and_waits_to_deadlines(
    standin: ComfyStandIn, client: DirectAgent, catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    loop = asyncio.get_running_loop()
    channel = client.transport.channel
    waiting = await channel.subscribe("prompt-waiting")
    running = await channel.subscribe("prompt-running")
    running.started()
    (work,) = jobs(inputs_dir, 1)
    async with asyncio.timeout(10):
        job = asyncio.create_task(client.run(work, catalog.get(work.task), RecordingSink()))
        # A far deadline: the message comes first (its timer stays set, for the next wait).
        assert isinstance(await waiting.recv(loop.time() + 30), msg.Status)
        await job
    assert any(isinstance(m, msg.Status) for m in drained(waiting))  # the queue emptied
    assert drained(running) == []  # started: queue changes are not its business
    # A nearer deadline than the timer left set: it still times out at its own.
    asked = loop.time()
    async with asyncio.timeout(3):
        with pytest.raises(TimeoutError):
            await waiting.recv(asked + 0.05)
    assert 0.05 <= loop.time() - asked < 1.0
    waiting.close()
    running.close()
