"""Output images over the websocket (SaveImageWebsocket): no file in the agent's output/, no
/view; a run that missed the frames downloads the temporary copy instead of queueing again."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from aiserver.providers.base import SHUTDOWN, WorkItem
from aiserver.providers.comfy.pool import AgentConfig, ComfyPool
from aiserver.providers.comfy.settings import PoolSettings
from aiserver.providers.comfy.socket_outputs import (
    SAVE_OVER_SOCKET,
    SOCKET_NODE_SUFFIX,
    SocketImages,
    over_socket,
)
from aiserver.providers.comfy.workflows import WorkflowCatalog
from aiserver.tasks import ImageToImageSpec, ImageUpscaleSpec, TaskKind
from tests.comfy.conftest import Spawn, StandInFactory
from tests.comfy.helpers import FAST, RecordingSink, png, work_item, write_input
from tests.comfy.test_messages import recording
from tests.support.comfy_standin import ComfyStandIn

SETTINGS = PoolSettings(
    probe_interval_s=0.2,
    backoff_initial_s=0.05,
    backoff_max_s=0.2,
    timeouts=FAST,
    outputs_over_websocket=True,
)


@pytest.fixture
async def pools() -> AsyncIterator[list[ComfyPool]]:
    made: list[ComfyPool] = []
    yield made
    for pool in made:
        await pool.close()


async def started(pools: list[ComfyPool], catalog: WorkflowCatalog, url: str) -> ComfyPool:
    pool = ComfyPool([AgentConfig(url, name="a")], catalog, settings=SETTINGS)
    pools.append(pool)
    async with asyncio.timeout(5):
        await pool.start()
    return pool


def upscale(inputs_dir: Path) -> WorkItem:
    image = write_input(inputs_dir, "image", png(40, 30))
    return work_item(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec(), {"image": image})


def img2img(inputs_dir: Path, batch_size: int = 1) -> WorkItem:
    image = write_input(inputs_dir, "image", png(64, 48))
    spec = ImageToImageSpec(positive_prompt="a lighthouse", steps=3, batch_size=batch_size)  # type: ignore[call-arg]
    return work_item(TaskKind.IMAGE_TO_IMAGE, spec, {"image": image})


async def run(pool: ComfyPool, work: WorkItem) -> RecordingSink:
    sink = RecordingSink()
    async with asyncio.timeout(15):
        await pool.run(work, sink)
    return sink


def files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def views(standin: ComfyStandIn) -> list[str]:
    return [path for _, path, _ in standin.received.requests if path.endswith("/view")]


async def test_images_come_over_the_socket_and_leave_no_output_file(
    standin: ComfyStandIn, pools: list[ComfyPool], catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    pool = await started(pools, catalog, standin.url)
    sink = await run(pool, img2img(inputs_dir, batch_size=2))
    assert sink.image_sizes() == [(64, 48)] * 2
    assert {i.mime_type for i in sink.images} == {"image/png"}
    assert views(standin) == []
    assert files(standin.output_dir) == []
    assert len(files(standin.temp_dir)) == 2  # the copies a missed frame would be fetched from
    (body,) = standin.received.prompts
    assert body["prompt"]["9"]["class_type"] == "PreviewImage"
    sender = body["prompt"]["9" + SOCKET_NODE_SUFFIX]
    assert sender["class_type"] == SAVE_OVER_SOCKET
    assert sender["inputs"]["images"] == body["prompt"]["9"]["inputs"]["images"]
    assert sender["inputs"]["aiserver_run"] == body["prompt_id"]  # never a cached sender
    assert sink.checkpoints[0]["outputs"] == "socket"
    assert sink.fractions()[-1] == 1.0


async def test_the_same_job_twice_still_gets_its_frames(
    standin: ComfyStandIn, pools: list[ComfyPool], catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    pool = await started(pools, catalog, standin.url)
    work = upscale(inputs_dir)
    first = await run(pool, work)
    again = await run(pool, work)  # same inputs, same upload names: upstream nodes cached
    assert first.image_sizes() == again.image_sizes() == [(80, 60)]
    assert views(standin) == []


async def test_frames_lost_in_a_drop_come_from_the_temporary_copy(
    make_standin: StandInFactory,
    pools: list[ComfyPool],
    catalog: WorkflowCatalog,
    inputs_dir: Path,
) -> None:
    standin = await make_standin(step_delay_s=0.01)
    # Just before the output nodes: the frames go out while the socket is down.
    standin.drop_websockets_at("9", outage_s=0.2)
    pool = await started(pools, catalog, standin.url)
    sink = await run(pool, img2img(inputs_dir))
    assert sink.image_sizes() == [(64, 48)]
    assert len(standin.received.prompts) == 1  # followed, never queued again
    assert len(views(standin)) == 1
    assert files(standin.output_dir) == []


async def test_reattach_before_the_output_node_takes_its_frames(
    make_standin: StandInFactory,
    pools: list[ComfyPool],
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    spawn: Spawn,
) -> None:
    standin = await make_standin()
    standin.hang_at("3")
    pool = await started(pools, catalog, standin.url)
    work = upscale(inputs_dir)
    sink = RecordingSink()
    task = spawn(pool.run(work, sink))
    await standin.wait_for(lambda: standin.running_prompt is not None)
    task.cancel(SHUTDOWN)
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await task
    (checkpoint,) = sink.checkpoints
    later = await started(pools, catalog, standin.url)
    again = RecordingSink()
    resumed = spawn(later.run(dataclasses.replace(work, resume=checkpoint), again))
    await standin.wait_for(lambda: standin.received.ws_connects.count(checkpoint["client_id"]) == 2)
    standin.release("3")
    async with asyncio.timeout(5):
        await resumed
    assert again.image_sizes() == [(80, 60)]
    assert len(standin.received.prompts) == 1
    assert views(standin) == []  # the frames reached the re-attached socket


async def test_reattach_after_the_frames_went_out_downloads_the_copy(
    standin: ComfyStandIn, pools: list[ComfyPool], catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    pool = await started(pools, catalog, standin.url)
    work = upscale(inputs_dir)
    standin.hang_at("5")
    sink = RecordingSink()
    task = asyncio.create_task(pool.run(work, sink))
    await standin.wait_for(lambda: standin.running_prompt is not None)
    task.cancel(SHUTDOWN)
    with pytest.raises(asyncio.CancelledError):
        await task
    (checkpoint,) = sink.checkpoints
    standin.release("5")  # the frames go to a socket that is gone
    await standin.wait_for(lambda: standin.history(checkpoint["prompt_id"]) is not None)
    later = await started(pools, catalog, standin.url)
    again = await run(later, dataclasses.replace(work, resume=checkpoint))
    assert again.image_sizes() == [(80, 60)]
    assert len(standin.received.prompts) == 1  # re-attached, not re-run
    assert len(views(standin)) == 1


def test_only_file_saving_image_outputs_are_swapped(
    catalog: WorkflowCatalog, tmp_path: Path
) -> None:
    image = write_input(tmp_path, "image", png(16, 16))
    work = work_item(TaskKind.IMAGE_TO_TEXT, None, {"image": image})  # type: ignore[arg-type]
    built = catalog.get(TaskKind.IMAGE_TO_TEXT).build(work, {"image": "x.png"})
    assert over_socket(built, "p").socket_outputs == {}  # text outputs stay


def test_socket_images_are_complete_only_with_every_announced_frame() -> None:
    from aiserver.providers.comfy.messages import Preview

    images = SocketImages(frozenset({"9_ws"}))
    assert not images.node_complete("9_ws")
    images.add(Preview(b"a", "image/png", "p", "9_ws"))
    images.expect("9_ws", 2)
    assert not images.node_complete("9_ws")
    images.add(Preview(b"b", "image/png", "p", "9_ws"))
    assert images.node_complete("9_ws")
    assert [f.image for f in images.frames("9_ws")] == [b"a", b"b"]


@pytest.mark.parametrize("flags", [False, True])
async def test_standin_orders_frame_and_progress_as_recorded(
    make_standin: StandInFactory, flags: bool
) -> None:
    """With preview metadata the frame precedes its progress; without, it follows it."""
    name = "metadata" if flags else "legacy"
    trace = recording(f"ws_trace_saveimagewebsocket_{name}")
    recorded = [m.get("type") or "<binary>" for m in trace["ws_messages"]]
    expected = [k for k in recorded if k in ("progress", "<binary>")]
    standin = await make_standin()
    standin.add_input("probe_in_ws.png", png(40, 30))
    body = {**trace["post_prompt_request"], "prompt_id": "p-order"}
    kinds: list[str] = []
    url = standin.url.replace("http://", "ws://") + f"/ws?clientId={body['client_id']}"
    async with connect(url) as ws, httpx.AsyncClient(base_url=standin.url) as http:
        if flags:
            flag = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
            await ws.send(json.dumps(flag))
        assert (await http.post("/prompt", json=body)).status_code == 200
        async with asyncio.timeout(10):
            while "execution_success" not in kinds:
                frame = await ws.recv()
                kinds.append("<binary>" if isinstance(frame, bytes) else json.loads(frame)["type"])
    assert [k for k in kinds if k in ("progress", "<binary>")] == expected


async def test_an_agent_without_preview_metadata_gets_files_and_view(
    make_standin: StandInFactory,
    pools: list[ComfyPool],
    catalog: WorkflowCatalog,
    inputs_dir: Path,
) -> None:
    """Frames naming no prompt cannot be routed on a shared socket: SaveImage and /view."""
    standin = await make_standin(feature_flags=False)
    pool = await started(pools, catalog, standin.url)
    sink = await run(pool, upscale(inputs_dir))
    assert sink.image_sizes() == [(80, 60)]
    (body,) = standin.received.prompts
    assert body["prompt"]["5"]["class_type"] == "SaveImage"
    assert len(views(standin)) == 1
    assert "outputs" not in sink.checkpoints[0]
