"""Runs over ComfyClient against the stand-in: every task, errors, cancel, drops, re-attach."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from pathlib import Path

import httpx
import pytest

from aiserver.errors import ErrorKind, ServiceError
from aiserver.jobs.model import Stage
from aiserver.providers.base import ProviderFailure, ProviderUnavailable, WorkItem
from aiserver.providers.comfy.workflows import WorkflowCatalog, default_workflows_dir
from aiserver.providers.failures import Cause
from aiserver.tasks import (
    DEFAULT_NEGATIVE_PROMPT,
    ImageToImageSpec,
    ImageToTextSpec,
    ImageUpscaleSpec,
    ImageWithMaskSpec,
    TaskKind,
)
from tests.comfy.conftest import Spawn, StandInFactory
from tests.comfy.helpers import (
    FAST,
    HOSTILE,
    DirectAgent,
    RecordingSink,
    decoded_size,
    png,
    work_item,
    write_input,
)
from tests.support.comfy_standin import ComfyStandIn

JOB = "01JTESTJOB0000000000000000"


def img2img(inputs_dir: Path, **spec: object) -> WorkItem:
    image = write_input(inputs_dir, "image", png(64, 48))
    values = {"positive_prompt": "a lighthouse", "steps": 3, **spec}
    return work_item(TaskKind.IMAGE_TO_IMAGE, ImageToImageSpec(**values), {"image": image})  # type: ignore[arg-type]


async def run(client: DirectAgent, catalog: WorkflowCatalog, work: WorkItem) -> RecordingSink:
    sink = RecordingSink()
    async with asyncio.timeout(15):
        await client.run(work, catalog.get(work.task), sink)
    return sink


def assert_cause(error: BaseException, cause: Cause, *, lost: bool, retryable: bool) -> None:
    """The failure's type says what the pool and the scheduler will do with it."""
    assert isinstance(error, ProviderFailure)
    assert (error.cause, error.agent_lost, error.retryable) == (cause, lost, retryable)
    assert error.reached_agent and error.agent == "agent-a"


def assert_progress_sane(sink: RecordingSink) -> None:
    fractions = sink.fractions()
    assert fractions == sorted(fractions), fractions
    assert all(0.0 <= f <= 1.0 for f in fractions)
    stages = sink.stages()
    assert stages[0] == "UPLOADING" and stages[-1] == "DOWNLOADING"
    order = ["UPLOADING", "PENDING", "RUNNING", "DOWNLOADING"]
    assert [order.index(s) for s in stages] == sorted(order.index(s) for s in stages)
    assert "RUNNING" in stages


async def test_image_to_image_batch(
    standin: ComfyStandIn, client: DirectAgent, catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    work = img2img(inputs_dir, batch_size=3, seed=42)
    sink = await run(client, catalog, work)
    assert sink.image_sizes() == [(64, 48)] * 3
    assert all(decoded_size(i.data) == (64, 48) and i.mime_type == "image/png" for i in sink.images)
    assert {i.seed for i in sink.images} == {42}
    assert_progress_sane(sink)
    sampler = [u for u in sink.progress_updates if u.node_type == "KSampler" and u.max_steps]
    assert [u.step for u in sampler] == [1, 2, 3]
    assert all(u.stage is Stage.RUNNING and u.node == "7" for u in sampler)
    running = [u for u in sink.progress_updates if u.stage is Stage.RUNNING]
    assert running[-1].fraction == 1.0
    (checkpoint,) = sink.checkpoints
    body = standin.received.queued(checkpoint["prompt_id"])
    assert checkpoint == {
        "agent": "agent-a",
        "prompt_id": body["prompt_id"],
        "client_id": body["client_id"],
        "seed": "42",
    }
    assert body["client_id"] in standin.received.ws_connects  # the socket came first
    graph = body["prompt"]
    assert graph["6"]["inputs"]["amount"] == 3
    assert graph["7"]["inputs"]["seed"] == 42
    assert graph["4"]["inputs"]["text"] == DEFAULT_NEGATIVE_PROMPT
    assert (graph["7"]["inputs"]["denoise"], graph["7"]["inputs"]["cfg"]) == (0.5, 7.0)
    upload = standin.received.uploads[0]
    assert upload.name == f"{JOB}-image-{work.inputs['image'].sha256[:8]}.png"
    assert graph["1"]["inputs"]["image"] == upload.name


async def test_random_seed_is_reported(
    standin: ComfyStandIn, client: DirectAgent, catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    sink = await run(client, catalog, img2img(inputs_dir))
    seed = standin.received.prompts[-1]["prompt"]["7"]["inputs"]["seed"]
    assert isinstance(seed, int) and sink.images[0].seed == seed
    assert sink.checkpoints[0]["seed"] == str(seed)


async def test_image_with_mask_resizes_the_mask(
    standin: ComfyStandIn, client: DirectAgent, catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    image = write_input(inputs_dir, "image", png(80, 64))
    mask = write_input(inputs_dir, "mask", png(20, 16, (0, 0, 0, 0), "RGBA"))
    spec = ImageWithMaskSpec(positive_prompt="a boat", mask_channel="alpha", steps=2, batch_size=2)
    sink = await run(
        client, catalog, work_item(TaskKind.IMAGE_WITH_MASK, spec, {"image": image, "mask": mask})
    )
    assert sink.image_sizes() == [(80, 64), (80, 64)]
    assert_progress_sane(sink)
    graph = standin.received.prompts[-1]["prompt"]
    assert (graph["8"]["inputs"]["width"], graph["8"]["inputs"]["height"]) == (80, 64)
    assert graph["6"]["inputs"]["channel"] == "alpha"
    assert graph["6"]["inputs"]["image"].startswith(f"{JOB}-mask-")


@pytest.mark.parametrize("model", ["", "RealESRGAN_x4plus.pth"])
async def test_image_upscale_is_exactly_twice(
    standin: ComfyStandIn,
    client: DirectAgent,
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    model: str,
) -> None:
    image = write_input(inputs_dir, "image", png(97, 61))
    spec = ImageUpscaleSpec(model=model)
    sink = await run(client, catalog, work_item(TaskKind.IMAGE_UPSCALE, spec, {"image": image}))
    assert sink.image_sizes() == [(194, 122)]
    assert decoded_size(sink.images[0].data) == (194, 122)
    assert_progress_sane(sink)
    tiles = [
        u for u in sink.progress_updates if u.node_type == "ImageUpscaleWithModel" and u.max_steps
    ]
    assert tiles and tiles[-1].step == tiles[-1].max_steps == 1
    loader = standin.received.prompts[-1]["prompt"]["2"]["inputs"]["model_name"]
    assert loader == (model or "RealESRGAN_x2.pth")


async def test_image_to_text_caption(
    standin: ComfyStandIn, client: DirectAgent, catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    image = write_input(inputs_dir, "image", png(96, 64, (200, 30, 30)))
    spec = ImageToTextSpec(prompt=HOSTILE)
    sink = RecordingSink()
    async with asyncio.timeout(15):
        await client.run(
            work_item(TaskKind.IMAGE_TO_TEXT, spec, {"image": image}),
            catalog.get(TaskKind.IMAGE_TO_TEXT),
            sink,
        )
    assert [(t.text, t.node) for t in sink.texts] == [("an image of 96x64 pixels, mostly red", "4")]
    assert sink.images == []
    fractions = sink.fractions()
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    graph = standin.received.prompts[-1]["prompt"]
    assert graph["3"]["inputs"]["text_input"] == HOSTILE
    assert graph["2"]["inputs"]["model"] == "microsoft/Florence-2-base"


async def test_hostile_prompts_arrive_byte_identical(
    standin: ComfyStandIn, client: DirectAgent, catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    negative = HOSTILE[::-1] + '"}]},{"'
    await run(
        client, catalog, img2img(inputs_dir, positive_prompt=HOSTILE, negative_prompt=negative)
    )
    raw = json.loads(standin.received.raw_prompts[-1])
    assert raw["prompt"]["3"]["inputs"]["text"].encode() == HOSTILE.encode()
    assert raw["prompt"]["4"]["inputs"]["text"].encode() == negative.encode()
    assert set(raw["prompt"]) == {str(n) for n in range(1, 11)}  # no node was injected


async def test_missing_model_is_a_clear_precondition(
    standin: ComfyStandIn, client: DirectAgent, catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    with pytest.raises(ServiceError) as caught:
        await run(client, catalog, img2img(inputs_dir, model="sdxl_missing.safetensors"))
    error = caught.value
    assert (error.kind, error.reason) == (ErrorKind.FAILED_PRECONDITION, "COMFYUI_MODEL_MISSING")
    assert error.metadata["node_id"] == "2"
    assert error.metadata["class_type"] == "CheckpointLoaderSimple"
    assert error.metadata["input_name"] == "ckpt_name"
    assert error.metadata["received_value"] == "sdxl_missing.safetensors"
    assert "not in" in error.metadata["comfy_message"]
    assert [v.field for v in error.violations] == ["params.model"]
    assert "sdxl_missing.safetensors" in error.message
    assert_cause(error, Cause.AGENT_LACKS, lost=False, retryable=False)
    assert isinstance(error, ProviderFailure) and error.agent_outdated


async def test_bad_sampler_is_invalid_argument(
    client: DirectAgent, catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    with pytest.raises(ServiceError) as caught:
        await run(client, catalog, img2img(inputs_dir, sampler="no_such_sampler"))
    error = caught.value
    assert (error.kind, error.reason) == (ErrorKind.INVALID_ARGUMENT, "COMFYUI_PROMPT_INVALID")
    assert error.metadata["input_name"] == "sampler_name"
    assert [v.field for v in error.violations] == ["params.sampler"]
    assert_cause(error, Cause.PROMPT_REJECTED, lost=False, retryable=False)
    assert isinstance(error, ProviderFailure) and not error.agent_outdated


async def test_unknown_node_type_is_node_missing(
    make_standin: StandInFactory, catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    standin = await make_standin(missing_nodes=["Florence2Run"])
    client = DirectAgent("agent-a", standin.url, timeouts=FAST)
    image = write_input(inputs_dir, "image", png(32, 32))
    try:
        with pytest.raises(ServiceError) as caught:
            await run(
                client,
                catalog,
                work_item(TaskKind.IMAGE_TO_TEXT, ImageToTextSpec(), {"image": image}),
            )
    finally:
        await client.aclose()
    assert (caught.value.kind, caught.value.reason) == (
        ErrorKind.FAILED_PRECONDITION,
        "COMFYUI_NODE_MISSING",
    )
    assert_cause(caught.value, Cause.AGENT_LACKS, lost=False, retryable=False)


async def test_execution_error_is_mapped(
    standin: ComfyStandIn, client: DirectAgent, catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    standin.fail_node("7", "torch.OutOfMemoryError", "CUDA out of memory")
    with pytest.raises(ServiceError) as caught:
        await run(client, catalog, img2img(inputs_dir))
    error = caught.value
    assert (error.kind, error.reason) == (ErrorKind.INTERNAL, "COMFYUI_EXECUTION_ERROR")
    assert error.metadata["exception_type"] == "torch.OutOfMemoryError"
    assert error.metadata["exception_message"] == "CUDA out of memory"
    assert (error.metadata["node_id"], error.metadata["node_type"]) == ("7", "KSampler")
    assert standin.received.interrupts == [] and standin.received.deletes == []
    assert_cause(error, Cause.EXECUTION_ERROR, lost=False, retryable=False)


async def test_loader_failure_is_a_precondition(
    client: DirectAgent, catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    image = write_input(inputs_dir, "image", png(16, 16))
    spec = ImageUpscaleSpec(model="corrupt_for_probe.pth")
    with pytest.raises(ServiceError) as caught:
        await run(client, catalog, work_item(TaskKind.IMAGE_UPSCALE, spec, {"image": image}))
    assert caught.value.kind is ErrorKind.FAILED_PRECONDITION
    assert caught.value.metadata["exception_type"] == "IndexError"  # as ws_trace_exec_error


async def test_cancel_pending_deletes_from_the_queue(
    standin: ComfyStandIn,
    client: DirectAgent,
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    spawn: Spawn,
) -> None:
    standin.pause_queue()
    sink = RecordingSink()
    task = spawn(client.run(img2img(inputs_dir), catalog.get(TaskKind.IMAGE_TO_IMAGE), sink))
    await standin.wait_for(lambda: bool(standin.pending_prompts))
    await standin.wait_for(lambda: any(u.stage is Stage.PENDING for u in sink.progress_updates))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await task
    pid = sink.checkpoints[0]["prompt_id"]
    assert standin.received.deletes == [pid]
    assert standin.pending_prompts == []
    assert standin.received.interrupts == []
    pending = [u for u in sink.progress_updates if u.stage is Stage.PENDING]
    assert pending[0].queue_position == 0


async def test_cancel_running_interrupts_that_prompt(
    standin: ComfyStandIn,
    client: DirectAgent,
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    spawn: Spawn,
) -> None:
    standin.hang_at("7")
    sink = RecordingSink()
    task = spawn(client.run(img2img(inputs_dir), catalog.get(TaskKind.IMAGE_TO_IMAGE), sink))
    await standin.wait_for(lambda: any(u.node == "7" for u in sink.progress_updates))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await task
    pid = sink.checkpoints[0]["prompt_id"]
    assert standin.received.interrupts == [{"prompt_id": pid}]
    await standin.wait_for(lambda: standin.history(pid) is not None)
    history = standin.history(pid)
    assert history is not None and history["status"]["messages"][-1][0] == "execution_interrupted"


async def test_interrupted_by_someone_else_is_cancelled(
    standin: ComfyStandIn,
    client: DirectAgent,
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    spawn: Spawn,
) -> None:
    standin.hang_at("7")
    sink = RecordingSink()
    task = spawn(client.run(img2img(inputs_dir), catalog.get(TaskKind.IMAGE_TO_IMAGE), sink))
    await standin.wait_for(lambda: any(u.node == "7" for u in sink.progress_updates))
    async with httpx.AsyncClient(base_url=standin.url) as http:
        await http.post("/interrupt")
    with pytest.raises(ServiceError) as caught:
        async with asyncio.timeout(5):
            await task
    assert (caught.value.kind, caught.value.reason) == (ErrorKind.CANCELLED, "COMFYUI_INTERRUPTED")
    assert_cause(caught.value, Cause.INTERRUPTED, lost=False, retryable=False)


@pytest.mark.parametrize("jobs_api", [True, False])
@pytest.mark.parametrize("drop_at", ["7", "9"])
async def test_websocket_drop_mid_job_still_completes(
    make_standin: StandInFactory,
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    jobs_api: bool,
    drop_at: str,
) -> None:
    # "9" is the SaveImage node: its executed message is lost, outputs come from HTTP.
    standin = await make_standin(jobs_api=jobs_api, step_delay_s=0.01)
    standin.drop_websockets_at(drop_at, outage_s=0.0 if drop_at == "7" else 0.2)
    client = DirectAgent("agent-a", standin.url, timeouts=FAST)
    try:
        sink = await run(client, catalog, img2img(inputs_dir, batch_size=2))
    finally:
        await client.aclose()
    assert sink.image_sizes() == [(64, 48)] * 2
    client_id = sink.checkpoints[0]["client_id"]
    assert standin.received.ws_connects == [client_id, client_id]
    fractions = sink.fractions()
    assert fractions == sorted(fractions)
    assert len(standin.received.prompts) == 1  # followed, never queued again
    paths = [path for _, path, _ in standin.received.requests]
    pid = sink.checkpoints[0]["prompt_id"]
    if jobs_api:  # the state is read back from /api/jobs/{id} ...
        assert f"/api/jobs/{pid}" in paths and f"/history/{pid}" not in paths
    elif drop_at == "9":  # ... or, on older servers, from /queue then /history/{id}
        assert f"/history/{pid}" in paths
    if drop_at == "9":  # the outage swallowed "executed": the outputs came over HTTP
        sent = [event for sid, event, _ in standin.received.sent if sid == client_id]
        assert "executed" not in sent and "execution_success" not in sent


async def test_hang_fires_the_idle_timeout(
    standin: ComfyStandIn, catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    standin.hang_at("7")
    timeouts = dataclasses.replace(FAST, idle_s=0.4, poll_s=0.1)
    client = DirectAgent("agent-a", standin.url, timeouts=timeouts)
    try:
        with pytest.raises(ProviderUnavailable) as caught:
            await run(client, catalog, img2img(inputs_dir))
    finally:
        await client.aclose()
    assert caught.value.metadata["cause"] == "idle_timeout"
    assert_cause(caught.value, Cause.IDLE_TIMEOUT, lost=True, retryable=True)
    assert caught.value.metadata["agent"] == "agent-a"
    pid = caught.value.metadata["prompt_id"]
    assert standin.received.interrupts == [{"prompt_id": pid}]  # not left hogging the agent


async def test_queue_wait_timeout_withdraws_the_prompt(
    standin: ComfyStandIn, catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    standin.set_queue_delay(30)
    client = DirectAgent(
        "agent-a", standin.url, timeouts=dataclasses.replace(FAST, queue_wait_s=0.3)
    )
    try:
        with pytest.raises(ProviderUnavailable) as caught:
            await run(client, catalog, img2img(inputs_dir))
    finally:
        await client.aclose()
    assert caught.value.metadata["cause"] == "queue_timeout"
    assert_cause(caught.value, Cause.QUEUE_TIMEOUT, lost=False, retryable=True)
    assert standin.received.deletes == [caught.value.metadata["prompt_id"]]
    assert standin.pending_prompts == []


@pytest.mark.parametrize("route", ["/prompt", "/upload/image", "/view"])
async def test_http_500_is_unavailable(
    standin: ComfyStandIn,
    client: DirectAgent,
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    route: str,
) -> None:
    standin.fail_http(route)
    with pytest.raises(ProviderUnavailable) as caught:
        await run(client, catalog, img2img(inputs_dir))
    assert caught.value.metadata["cause"] == "server_error"
    assert caught.value.metadata["status"] == "500"
    assert_cause(caught.value, Cause.SERVER_ERROR, lost=True, retryable=True)


async def test_killed_agent_mid_job_is_unavailable(
    standin: ComfyStandIn, catalog: WorkflowCatalog, inputs_dir: Path, spawn: Spawn
) -> None:
    standin.hang_at("7")
    client = DirectAgent(
        "agent-a", standin.url, timeouts=dataclasses.replace(FAST, reconnect_s=0.3)
    )
    sink = RecordingSink()
    task = spawn(client.run(img2img(inputs_dir), catalog.get(TaskKind.IMAGE_TO_IMAGE), sink))
    try:
        await standin.wait_for(lambda: any(u.node == "7" for u in sink.progress_updates))
        await standin.kill()
        with pytest.raises(ProviderUnavailable) as caught:
            async with asyncio.timeout(5):
                await task
    finally:
        await client.aclose()
    assert caught.value.metadata["agent"] == "agent-a"
    assert caught.value.metadata["cause"] in ("websocket", "connection")
    assert caught.value.cause in (Cause.WEBSOCKET, Cause.CONNECTION)
    assert caught.value.agent_lost and caught.value.retryable


async def test_connection_refused_is_unavailable(
    catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    client = DirectAgent("gone", "http://127.0.0.1:9", timeouts=FAST)
    try:
        with pytest.raises(ProviderUnavailable) as caught:
            await run(client, catalog, img2img(inputs_dir))
    finally:
        await client.aclose()
    assert caught.value.kind is ErrorKind.UNAVAILABLE and caught.value.retry_after_s is None
    assert caught.value.cause is Cause.WEBSOCKET and caught.value.agent == "gone"  # opened first
    assert caught.value.agent_lost and caught.value.retryable


# ---- re-attaching ----------------------------------------------------------------------------


async def queue_as_an_earlier_process(
    standin: ComfyStandIn, catalog: WorkflowCatalog, work: WorkItem, seed: int
) -> dict[str, str]:
    """What a crashed process left behind: uploads, a queued prompt, its checkpoint."""
    client_id, prompt_id = uuid.uuid4().hex, str(uuid.uuid4())
    async with httpx.AsyncClient(base_url=standin.url) as http:
        uploads = {}
        for name, item in work.inputs.items():
            file_name = f"{work.job_id}-{name}-{item.sha256[:8]}.png"
            answer = await http.post(
                "/upload/image", files={"image": (file_name, item.path.read_bytes())}
            )
            uploads[name] = answer.json()["name"]
        built = catalog.get(work.task).build(work, uploads, seed=seed)
        body = {"prompt": built.graph, "client_id": client_id, "prompt_id": prompt_id}
        assert (await http.post("/prompt", json=body)).status_code == 200
    return {"agent": "agent-a", "prompt_id": prompt_id, "client_id": client_id, "seed": str(seed)}


async def test_reattach_to_a_prompt_still_queued(
    standin: ComfyStandIn,
    client: DirectAgent,
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    spawn: Spawn,
) -> None:
    standin.pause_queue()
    first = img2img(inputs_dir, batch_size=2)
    resume = await queue_as_an_earlier_process(standin, catalog, first, seed=7)
    work = dataclasses.replace(first, attempt=2, resume=resume)
    sink = RecordingSink()
    task = spawn(client.run(work, catalog.get(work.task), sink))
    await standin.wait_for(lambda: any(u.stage is Stage.PENDING for u in sink.progress_updates))
    standin.resume_queue()
    async with asyncio.timeout(10):
        await task
    assert sink.image_sizes() == [(64, 48)] * 2
    assert {i.seed for i in sink.images} == {7}
    assert len(standin.received.prompts) == 1  # nothing queued again
    assert sink.checkpoints == []
    assert standin.received.ws_connects[-1] == resume["client_id"]


@pytest.mark.parametrize("jobs_api", [True, False])
async def test_reattach_to_a_prompt_that_already_ended(
    make_standin: StandInFactory, catalog: WorkflowCatalog, inputs_dir: Path, jobs_api: bool
) -> None:
    standin = await make_standin(jobs_api=jobs_api)
    first = img2img(inputs_dir)
    resume = await queue_as_an_earlier_process(standin, catalog, first, seed=11)
    await standin.wait_for(lambda: standin.history(resume["prompt_id"]) is not None)
    client = DirectAgent("agent-a", standin.url, timeouts=FAST)
    try:
        sink = await run(client, catalog, dataclasses.replace(first, resume=resume))
    finally:
        await client.aclose()
    assert sink.image_sizes() == [(64, 48)]
    assert sink.images[0].seed == 11
    assert len(standin.received.prompts) == 1


async def test_reattach_after_the_agent_forgot_queues_again(
    standin: ComfyStandIn, client: DirectAgent, catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    first = img2img(inputs_dir)
    resume = {
        "agent": "agent-a",
        "prompt_id": str(uuid.uuid4()),
        "client_id": "c0ffee",
        "seed": "5",
    }
    sink = await run(client, catalog, dataclasses.replace(first, resume=resume))
    assert sink.image_sizes() == [(64, 48)]
    body = standin.received.prompts[-1]
    assert (body["prompt_id"], body["client_id"]) == (resume["prompt_id"], "c0ffee")
    assert body["prompt"]["7"]["inputs"]["seed"] == 5


async def test_reattach_to_a_failed_prompt_raises_its_error(
    standin: ComfyStandIn, client: DirectAgent, catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    standin.fail_node("8", "RuntimeError", "decoder exploded")
    first = img2img(inputs_dir)
    resume = await queue_as_an_earlier_process(standin, catalog, first, seed=3)
    await standin.wait_for(lambda: standin.history(resume["prompt_id"]) is not None)
    with pytest.raises(ServiceError) as caught:
        await run(client, catalog, dataclasses.replace(first, resume=resume))
    assert caught.value.reason == "COMFYUI_EXECUTION_ERROR"
    assert caught.value.metadata["exception_message"] == "decoder exploded"


async def test_partly_valid_prompt_without_our_output_is_refused(
    standin: ComfyStandIn, client: DirectAgent, tmp_path: Path, inputs_dir: Path
) -> None:
    # A user graph with a second output: ComfyUI answers 200 and runs only the valid one.
    user = tmp_path / "user"
    user.mkdir()
    builtin = default_workflows_dir()
    graph = json.loads((builtin / "image_upscale.json").read_text(encoding="utf-8"))
    graph["6"] = {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
    (user / "image_upscale.json").write_text(json.dumps(graph), encoding="utf-8")
    binding = json.loads((builtin / "image_upscale.binding.json").read_text(encoding="utf-8"))
    binding["nodes"].append("PreviewImage")
    (user / "image_upscale.binding.json").write_text(json.dumps(binding), encoding="utf-8")
    catalog = WorkflowCatalog.load(user_dir=user)
    image = write_input(inputs_dir, "image", png(16, 16))
    work = work_item(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec(model="absent.pth"), {"image": image})
    with pytest.raises(ServiceError) as caught:
        await run(client, catalog, work)
    assert caught.value.reason == "COMFYUI_MODEL_MISSING"
    pid = standin.received.prompts[-1]["prompt_id"]
    assert standin.received.deletes == [pid]  # the rest of it is taken off the queue


async def test_prompt_deleted_by_someone_else_is_noticed(
    standin: ComfyStandIn,
    client: DirectAgent,
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    spawn: Spawn,
) -> None:
    standin.pause_queue()
    sink = RecordingSink()
    task = spawn(client.run(img2img(inputs_dir), catalog.get(TaskKind.IMAGE_TO_IMAGE), sink))
    await standin.wait_for(lambda: bool(standin.pending_prompts))
    async with httpx.AsyncClient(base_url=standin.url) as http:
        await http.post("/queue", json={"clear": True})
    with pytest.raises(ProviderUnavailable) as caught:
        async with asyncio.timeout(5):
            await task
    assert caught.value.metadata["cause"] == "prompt_lost"
    # The agent answers, it only forgot the prompt: not lost, the job runs again.
    assert_cause(caught.value, Cause.PROMPT_LOST, lost=False, retryable=True)


async def test_missing_output_file_is_not_the_agents_fault(
    standin: ComfyStandIn, client: DirectAgent, catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    standin.fail_http("/view", status=404)
    with pytest.raises(ProviderUnavailable) as caught:
        await run(client, catalog, img2img(inputs_dir))
    assert_cause(caught.value, Cause.OUTPUT_MISSING, lost=False, retryable=True)


async def test_refused_credentials_lose_the_agent(
    make_standin: StandInFactory, catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    standin = await make_standin(api_key="s3cret")
    client = DirectAgent("agent-a", standin.url)
    try:
        with pytest.raises(ProviderUnavailable) as caught:
            await run(client, catalog, img2img(inputs_dir))
    finally:
        await client.aclose()
    assert caught.value.metadata["status"] == "401"
    assert_cause(caught.value, Cause.AUTH, lost=True, retryable=True)


@pytest.mark.parametrize("route", ["/prompt", "/upload/image"])
async def test_a_malformed_answer_is_the_agents_fault_not_a_crash(
    standin: ComfyStandIn,
    client: DirectAgent,
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    route: str,
) -> None:
    """200 with a body that is not the JSON the route answers (a proxy's page, a truncated
    answer): a clear, retryable failure of this agent, not a parse error escaping as a bug."""
    standin.fail_http(route, status=200)
    with pytest.raises(ProviderUnavailable) as caught:
        await run(client, catalog, img2img(inputs_dir))
    assert caught.value.metadata["cause"] == "protocol"
    assert route in str(caught.value) and "JSON" in str(caught.value)
    err = caught.value
    assert isinstance(err, ProviderFailure) and err.retryable and err.agent == "agent-a"


@pytest.mark.parametrize("frame", ["garbage", "truncated"])
async def test_a_bad_websocket_frame_mid_run_is_survived(
    standin: ComfyStandIn, catalog: WorkflowCatalog, inputs_dir: Path, frame: str
) -> None:
    """Mid-run, the socket carries a binary frame of no known shape (skipped), or a frame cut
    short by a connection that then dies (a drop: the run re-opens the socket and follows
    its prompt). Either way the run completes, its prompt queued once."""
    standin.hang_at("7")
    client = DirectAgent("agent-a", standin.url, timeouts=FAST)
    try:
        running = asyncio.ensure_future(run(client, catalog, img2img(inputs_dir)))
        async with asyncio.timeout(10):
            while standin.running_prompt is None:
                await asyncio.sleep(0.01)
        if frame == "garbage":
            standin.send_binary_frames(b"\x00\x00\x00\x09" + bytes(range(256)))
        else:
            standin.cut_websockets_mid_frame()
        await asyncio.sleep(0.2)
        standin.release("7")
        sink = await asyncio.wait_for(running, 20)
    finally:
        await client.aclose()
    assert sink.image_sizes() == [(64, 48)]
    assert len(standin.received.prompts) == 1
