"""Output images over the websocket (SaveImageWebsocket): no file in the agent's output/ or
temp/, no /view; a run that missed the frames queues the same graph again (upstream cached)."""

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
    RECOVERS,
    SAVE_OVER_SOCKET,
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


def cached(standin: ComfyStandIn, prompt_id: str) -> list[str]:
    """The nodes ComfyUI served from its cache for ``prompt_id`` (``execution_cached``)."""
    return next(
        data["nodes"]
        for _, event, data in standin.received.sent
        if event == "execution_cached" and data["prompt_id"] == prompt_id
    )


async def test_images_come_over_the_socket_and_leave_no_output_file(
    standin: ComfyStandIn, pools: list[ComfyPool], catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    pool = await started(pools, catalog, standin.url)
    sink = await run(pool, img2img(inputs_dir, batch_size=2))
    assert sink.image_sizes() == [(64, 48)] * 2
    assert {i.mime_type for i in sink.images} == {"image/png"}
    assert views(standin) == []
    assert files(standin.output_dir) == files(standin.temp_dir) == []
    (body,) = standin.received.prompts
    sender = body["prompt"]["9"]  # the bound output, in place of SaveImage
    assert sender["class_type"] == SAVE_OVER_SOCKET
    assert sender["inputs"]["images"] == ["10", 0]
    assert sender["inputs"]["filename_prefix"].endswith("01JTESTJOB0000000000000000")  # the job
    assert sender["inputs"]["aiserver_run"] == body["prompt_id"]  # never a cached sender
    assert len(body["prompt"]) == len(catalog.get(TaskKind.IMAGE_TO_IMAGE).graph)
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


async def test_frames_lost_in_a_drop_are_sent_again_from_the_cache(
    make_standin: StandInFactory,
    pools: list[ComfyPool],
    catalog: WorkflowCatalog,
    inputs_dir: Path,
) -> None:
    standin = await make_standin(step_delay_s=0.01)
    # Just before the output node: its frames go out while the socket is down.
    standin.drop_websockets_at("9", outage_s=0.2)
    pool = await started(pools, catalog, standin.url)
    sink = await run(pool, img2img(inputs_dir))
    assert sink.image_sizes() == [(64, 48)]
    first, second = standin.received.prompts
    # The same graph under a new prompt id: everything but the sender comes from the cache.
    assert second["prompt_id"] != first["prompt_id"]
    assert second["prompt"]["9"]["inputs"][RECOVERS] == first["prompt_id"]
    assert sorted(cached(standin, second["prompt_id"])) == sorted(set(first["prompt"]) - {"9"})
    assert [c["prompt_id"] for c in sink.checkpoints] == [first["prompt_id"], second["prompt_id"]]
    assert len(standin.received.uploads) == 1  # the input was not sent again
    assert views(standin) == []
    assert files(standin.output_dir) == files(standin.temp_dir) == []


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


@pytest.mark.parametrize("jobs_api", [True, False])  # the graph from /api/jobs or /history
async def test_reattach_after_the_frames_went_out_queues_the_graph_again(
    make_standin: StandInFactory,
    pools: list[ComfyPool],
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    jobs_api: bool,
) -> None:
    standin = await make_standin(jobs_api=jobs_api)
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
    first, second = standin.received.prompts
    # The graph that ran, read back from the agent (its input checked to be this job's), again:
    # only the sender runs; the new prompt id is checkpointed before it is queued.
    assert first["prompt_id"] == checkpoint["prompt_id"]
    assert second["prompt"]["5"]["inputs"][RECOVERS] == checkpoint["prompt_id"]
    assert {k: v for k, v in second["prompt"].items() if k != "5"} == {
        k: v for k, v in first["prompt"].items() if k != "5"
    }
    assert sorted(cached(standin, second["prompt_id"])) == sorted(set(first["prompt"]) - {"5"})
    assert again.checkpoints[-1]["prompt_id"] == second["prompt_id"]
    assert len(standin.received.uploads) == 1
    assert files(standin.output_dir) == files(standin.temp_dir) == []


async def test_reattach_never_runs_another_jobs_input(
    standin: ComfyStandIn, pools: list[ComfyPool], catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    """The ended prompt's input file was overwritten meanwhile (names are reused): the job is
    submitted afresh with its own input and seed, never the graph over someone else's file."""
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
    standin.release("5")
    await standin.wait_for(lambda: standin.history(checkpoint["prompt_id"]) is not None)
    (upload,) = standin.received.uploads
    standin.add_input(upload.name, png(10, 10))  # another job's input under the same name
    later = await started(pools, catalog, standin.url)
    again = await run(later, dataclasses.replace(work, resume=checkpoint))
    assert again.image_sizes() == [(80, 60)]  # its own 40x30 input, upscaled
    assert len(standin.received.prompts) == 2
    assert len(standin.received.uploads) == 2
    assert RECOVERS not in standin.received.prompts[1]["prompt"]["5"]["inputs"]


def test_only_file_saving_image_outputs_are_swapped(
    catalog: WorkflowCatalog, tmp_path: Path
) -> None:
    image = write_input(tmp_path, "image", png(16, 16))
    work = work_item(TaskKind.IMAGE_TO_TEXT, None, {"image": image})  # type: ignore[arg-type]
    built = catalog.get(TaskKind.IMAGE_TO_TEXT).build(work, {"image": "x.png"})
    assert over_socket(built, "p").socket_outputs == frozenset()  # text outputs stay
    work = upscale(tmp_path)
    built = catalog.get(TaskKind.IMAGE_UPSCALE).build(work, {"image": "x.png"})
    sent = over_socket(built, "p")
    assert sent.socket_outputs == frozenset({"5"})  # the bound SaveImage, by node id
    assert sent.graph["5"]["class_type"] == "SaveImageWebsocket"


def test_socket_images_are_complete_only_with_every_announced_frame() -> None:
    from aiserver.providers.comfy.messages import Preview

    images = SocketImages(frozenset({"9"}))
    assert not images.node_complete("9") and not images.complete()
    images.add(Preview(b"a", "image/png", "p", "9"))
    images.expect("9", 2)
    assert not images.node_complete("9")
    images.add(Preview(b"b", "image/png", "p", "9"))
    assert images.node_complete("9") and images.complete()
    assert [f.image for f in images.frames("9")] == [b"a", b"b"]


@pytest.mark.parametrize("flags", [False, True])
async def test_standin_orders_frame_and_progress_as_recorded(
    make_standin: StandInFactory, flags: bool
) -> None:
    """As ComfyUI's progress hook sends them: progress_state, then with preview metadata the
    frame and its progress; without, the progress and then the frame (also seen live against
    ComfyUI 0.8.0 on the CPU)."""
    name = "metadata" if flags else "legacy"
    trace = recording(f"ws_trace_saveimagewebsocket_{name}")
    recorded = [m.get("type") or "<binary>" for m in trace["ws_messages"]]
    order = ("progress_state", "progress", "<binary>")

    def sender(kinds: list[str]) -> list[str]:  # from the sender's executing to the end
        start = max(i for i, k in enumerate(kinds) if k == "executing" and i < len(kinds) - 3)
        return [k for k in kinds[start:] if k in order]

    expected = sender(recorded)
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
    assert sender(kinds) == expected


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
