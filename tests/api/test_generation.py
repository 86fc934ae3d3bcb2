"""The generative tasks end to end: gRPC in, ComfyUI stand-ins behind, events and bytes out."""

from __future__ import annotations

import asyncio
import io
import random
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imagetasks.v1 import agent_service_pb2 as agpb
from imagetasks.v1 import (
    agent_service_pb2_grpc,
    artifact_service_pb2_grpc,
    common_pb2,
    job_pb2,
    job_service_pb2_grpc,
    tasks_pb2,
)
from imagetasks.v1 import (
    artifact_service_pb2 as apb,
)
from imagetasks.v1 import (
    job_service_pb2 as jpb,
)
from PIL import Image

from aiserver.server import Service
from tests.support.generation import Collected, comfy_service, generate, sha256
from tests.support.grpc_helpers import rich_status, violated_fields
from tests.support.images import encode, quadrant_image

PNG = encode(quadrant_image(64, 48), "PNG")
MASK = encode(Image.new("RGB", (32, 24), (255, 0, 0)), "PNG")
SUCCEEDED = job_pb2.Job.STATE_SUCCEEDED


def img2img(prompt: str = "a lighthouse at dawn", **kw: Any) -> tasks_pb2.ImageToImageParams:
    return tasks_pb2.ImageToImageParams(positive_prompt=prompt, steps=3, **kw)


def channel_to(service: Service) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}")


def assert_lifecycle(got: Collected) -> None:
    kinds = got.kinds
    assert kinds[0] == "accepted" and kinds[-1] == "finished"
    fractions = [
        p.fraction for p in got.of("progress") if p.stage == job_pb2.JobProgress.STAGE_RUNNING
    ]
    assert fractions == sorted(fractions), "progress never goes backwards"
    seqs = [e.sequence for e in got.events if e.WhichOneof("kind") != "output_chunk"]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_image_to_image_streams_progress_then_output_bytes(tmp_path: Path) -> None:
    # Steps slower than the progress rate limit (20/s), so each one reaches the caller.
    async with (
        comfy_service(tmp_path, step_delay_s=0.08) as (service, _),
        channel_to(service) as ch,
    ):
        got = await generate(ch, "ImageToImage", img2img(seed=42), {"image": PNG})
        assert_lifecycle(got)
        steps = [p.step for p in got.of("progress") if p.node_type == "KSampler" and p.max_steps]
        assert steps and steps == sorted(steps) and set(steps) <= {1, 2, 3}
        assert {p.max_steps for p in got.of("progress") if p.max_steps} == {3}
        (output,) = got.of("output")
        data = got.output_bytes(0)
        assert output.artifact.sha256 == sha256(data)
        assert output.artifact.seed == 42
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (64, 48)
        final = got.final
        assert final.state == SUCCEEDED and final.agent == "gpu-0" and final.provider
        assert final.image_to_image.positive_prompt == "a lighthouse at dawn"


async def test_an_input_of_several_megabytes_reaches_the_agent(tmp_path: Path) -> None:
    # Incompressible pixels: about 6 MB of PNG, past aiohttp's 1 MiB inline-body limit.
    noisy = Image.frombytes("RGB", (1400, 1400), random.Random(7).randbytes(1400 * 1400 * 3))
    buffer = io.BytesIO()
    noisy.save(buffer, "PNG", compress_level=0)
    data = buffer.getvalue()
    assert len(data) > 5_000_000
    async with comfy_service(tmp_path) as (service, comfy), channel_to(service) as ch:
        got = await generate(ch, "ImageToImage", img2img(), {"image": data})
        assert got.final.state == SUCCEEDED, got.final.error
        uploaded = [p for p in comfy[0].input_dir.iterdir() if p.is_file()]
        assert [p.read_bytes() == data for p in uploaded] == [True]


async def test_batch_reports_one_output_per_image_and_random_seed(tmp_path: Path) -> None:
    async with comfy_service(tmp_path) as (service, _), channel_to(service) as ch:
        got = await generate(ch, "ImageToImage", img2img(batch_size=3), {"image": PNG})
        outputs = got.of("output")
        assert [o.index for o in outputs] == [0, 1, 2]
        assert all(o.artifact.HasField("seed") for o in outputs)
        assert len(got.final.outputs) == 3


async def test_image_with_mask(tmp_path: Path) -> None:
    params = tasks_pb2.ImageWithMaskParams(
        positive_prompt="a red door", mask_channel=tasks_pb2.MASK_CHANNEL_RED, steps=2
    )
    async with comfy_service(tmp_path) as (service, comfy), channel_to(service) as ch:
        got = await generate(ch, "ImageWithMask", params, {"image": PNG, "mask": MASK})
        assert got.final.state == SUCCEEDED
        assert [i.field for i in got.final.inputs] == ["image", "mask"]
        classes = {n["class_type"] for n in comfy[0].received.prompts[-1]["prompt"].values()}
        assert {"SetLatentNoiseMask", "ImageToMask"} <= classes


async def test_image_to_image_and_inpaint_keep_the_input_size(tmp_path: Path) -> None:
    # The VAE works on multiples of 8 (100x70 -> 96x64); the bound ImageScale gives the
    # input's size back.
    odd = encode(quadrant_image(100, 70), "PNG")
    mask = encode(Image.new("RGB", (100, 70), (255, 0, 0)), "PNG")
    inpaint = tasks_pb2.ImageWithMaskParams(positive_prompt="a red door", steps=1)
    async with comfy_service(tmp_path) as (service, _), channel_to(service) as ch:
        for task, params, files in (
            ("ImageToImage", img2img(), {"image": odd}),
            ("ImageWithMask", inpaint, {"image": odd, "mask": mask}),
        ):
            got = await generate(ch, task, params, files)
            (output,) = got.of("output")
            assert (output.artifact.width, output.artifact.height) == (100, 70), task
            with Image.open(io.BytesIO(got.output_bytes())) as im:
                assert im.size == (100, 70), task


async def test_image_upscale_is_exactly_twice_the_size(tmp_path: Path) -> None:
    odd = encode(quadrant_image(37, 23), "PNG")
    async with comfy_service(tmp_path) as (service, _), channel_to(service) as ch:
        got = await generate(ch, "ImageUpscale", tasks_pb2.ImageUpscaleParams(), {"image": odd})
        (output,) = got.of("output")
        assert (output.artifact.width, output.artifact.height) == (74, 46)
        with Image.open(io.BytesIO(got.output_bytes())) as im:
            assert im.size == (74, 46)


async def test_image_to_text_returns_the_caption(tmp_path: Path) -> None:
    async with comfy_service(tmp_path) as (service, _), channel_to(service) as ch:
        got = await generate(ch, "ImageToText", tasks_pb2.ImageToTextParams(), {"image": PNG})
        (text,) = got.of("text_output")
        assert text.text.strip()
        assert got.final.text_outputs[0].text == text.text
        assert not got.of("output")


async def test_hostile_prompt_reaches_comfyui_byte_identical(tmp_path: Path) -> None:
    hostile = 'quote " brace } {"a": [1]} back\\slash \n newline 🦜 emoji "}]},{"x":"'
    negative = "\\u0000 not an escape, ${var} $(cmd) `tick`"
    async with comfy_service(tmp_path) as (service, comfy), channel_to(service) as ch:
        params = img2img(hostile, negative_prompt=negative)
        got = await generate(ch, "ImageToImage", params, {"image": PNG})
        assert got.final.state == SUCCEEDED
        texts = [
            node["inputs"]["text"]
            for node in comfy[0].received.prompts[-1]["prompt"].values()
            if node["class_type"] == "CLIPTextEncode"
        ]
        assert sorted(texts) == sorted([hostile, negative])


async def test_async_mode_returns_after_accepted_then_watch_and_read(tmp_path: Path) -> None:
    async with comfy_service(tmp_path) as (service, _), channel_to(service) as ch:
        params = img2img(options=common_pb2.JobOptions(mode=common_pb2.RESPONSE_MODE_ASYNC))
        got = await generate(ch, "ImageToImage", params, {"image": PNG})
        assert got.kinds == ["accepted"]
        name = got.events[0].job
        jobs = job_service_pb2_grpc.JobServiceStub(ch)
        watched = [r.event async for r in jobs.WatchJob(jpb.WatchJobRequest(name=name), timeout=30)]
        assert watched[0].WhichOneof("kind") == "accepted"
        assert watched[-1].WhichOneof("kind") == "finished"
        assert not any(e.WhichOneof("kind") == "output_chunk" for e in watched)
        job = (await jobs.GetJob(jpb.GetJobRequest(name=name))).job
        assert job.state == SUCCEEDED
        artifact = job.outputs[0]
        reader = artifact_service_pb2_grpc.ArtifactServiceStub(ch)
        data = b"".join(
            [r.data async for r in reader.ReadArtifact(apb.ReadArtifactRequest(name=artifact.name))]
        )
        assert sha256(data) == artifact.sha256
        tail = b"".join(
            [
                r.data
                async for r in reader.ReadArtifact(
                    apb.ReadArtifactRequest(name=artifact.name, read_offset=10, read_limit=5)
                )
            ]
        )
        assert tail == data[10:15]


async def test_references_only_delivery_sends_no_bytes(tmp_path: Path) -> None:
    async with comfy_service(tmp_path) as (service, _), channel_to(service) as ch:
        options = common_pb2.JobOptions(delivery=common_pb2.OUTPUT_DELIVERY_REFERENCES)
        got = await generate(ch, "ImageToImage", img2img(options=options), {"image": PNG})
        assert "output" in got.kinds and "output_chunk" not in got.kinds


async def test_ref_id_is_idempotent(tmp_path: Path) -> None:
    async with comfy_service(tmp_path) as (service, comfy), channel_to(service) as ch:
        options = common_pb2.JobOptions(ref_id="order-17", tag="batch-a")
        first = await generate(ch, "ImageToImage", img2img(options=options), {"image": PNG})
        second = await generate(ch, "ImageToImage", img2img(options=options), {"image": PNG})
        assert first.events[0].job == second.events[0].job
        assert second.of("accepted")[0].existing and not first.of("accepted")[0].existing
        assert len(comfy[0].received.prompts) == 1
        jobs = job_service_pb2_grpc.JobServiceStub(ch)
        listed = await jobs.ListJobs(jpb.ListJobsRequest(ref_id="order-17"))
        assert [j.name for j in listed.jobs] == [first.events[0].job]
        assert listed.jobs[0].tag == "batch-a"


async def test_missing_model_fails_the_job_with_the_node_details(tmp_path: Path) -> None:
    async with comfy_service(tmp_path) as (service, _comfy), channel_to(service) as ch:
        got = await generate(
            ch, "ImageToImage", img2img(model="no_such_model.safetensors"), {"image": PNG}
        )
        final = got.final
        assert final.state == job_pb2.Job.STATE_FAILED
        assert final.error.code in (
            grpc.StatusCode.FAILED_PRECONDITION.value[0],
            grpc.StatusCode.INVALID_ARGUMENT.value[0],
        )
        assert "no_such_model.safetensors" in final.error.message


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (tasks_pb2.ImageToImageParams(positive_prompt="  "), "params.positive_prompt"),
        (img2img(denoise=1.5), "params.denoise"),
        (img2img(batch_size=11), "params.batch_size"),
        (img2img(seed=-1), "params.seed"),
        (img2img(cfg_scale=float("nan")), "params.cfg_scale"),
        (img2img("x" * 5000), "params.positive_prompt"),
        (img2img(options=common_pb2.JobOptions(reply_to="ftp://x")), "params.options.reply_to"),
    ],
)
async def test_invalid_parameters_are_refused_before_any_work(
    tmp_path: Path, params: Any, field: str
) -> None:
    async with comfy_service(tmp_path) as (service, comfy), channel_to(service) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generate(ch, "ImageToImage", params, {"image": PNG})
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        _, details = rich_status(caught.value)
        assert field in violated_fields(details)
        assert comfy[0].received.prompts == []


@pytest.mark.parametrize(
    "side",
    [
        64,  # small: checked on the event loop
        300,  # past the inline limit: checked in the image pool
    ],
)
async def test_a_damaged_input_is_refused_before_any_work(tmp_path: Path, side: int) -> None:
    pixels = (bytes(range(256)) * (side * side * 3 // 256 + 1))[: side * side * 3]
    whole = encode(Image.frombytes("RGB", (side, side), pixels), "PNG")
    async with comfy_service(tmp_path) as (service, comfy), channel_to(service) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generate(
                ch,
                "ImageUpscale",
                tasks_pb2.ImageUpscaleParams(),
                {"image": whole[: len(whole) * 2 // 3]},
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        _, details = rich_status(caught.value)
        assert details["ErrorInfo"].reason in ("IMAGE_TRUNCATED", "IMAGE_CORRUPT")
        assert "image" in violated_fields(details)
        assert comfy[0].received.prompts == []
        # The whole file goes through.
        got = await generate(ch, "ImageUpscale", tasks_pb2.ImageUpscaleParams(), {"image": whole})
        assert got.final.state == SUCCEEDED


async def test_an_input_past_the_inline_pixels_has_its_header_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 200x200 px in a few kB: small enough to open on the event loop, too many pixels to
    # decode there. The header read on the loop serves the image pool's decode too.
    from aiserver.imaging import safe_open

    reads: list[str] = []
    identify = safe_open._identify

    def counted(fp: Any, field: str, *args: Any) -> Any:
        reads.append(field)
        return identify(fp, field, *args)

    monkeypatch.setattr(safe_open, "_identify", counted)
    image = encode(quadrant_image(200, 200), "PNG")
    assert len(image) < 256 * 1024
    async with comfy_service(tmp_path) as (service, _), channel_to(service) as ch:
        got = await generate(ch, "ImageUpscale", tasks_pb2.ImageUpscaleParams(), {"image": image})
        assert got.final.state == SUCCEEDED
        assert got.final.inputs[0].width == 200
    assert reads == ["image"]


async def test_deadline_cancels_the_comfyui_prompt(tmp_path: Path) -> None:
    async with comfy_service(tmp_path) as (service, comfy), channel_to(service) as ch:
        comfy[0].hang_at("7")  # the KSampler of the ImageToImage workflow never finishes
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generate(ch, "ImageToImage", img2img(), {"image": PNG}, timeout=3)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        jobs = job_service_pb2_grpc.JobServiceStub(ch)
        async with asyncio.timeout(20):
            while True:
                listed = await jobs.ListJobs(jpb.ListJobsRequest())
                if listed.jobs[0].state == job_pb2.Job.STATE_CANCELLED:
                    break
                await asyncio.sleep(0.05)
            while not comfy[0].received.interrupts and not comfy[0].received.deletes:
                await asyncio.sleep(0.05)


async def test_cancel_job_rpc_interrupts_a_running_prompt(tmp_path: Path) -> None:
    async with comfy_service(tmp_path) as (service, comfy), channel_to(service) as ch:
        comfy[0].hang_at("7")
        params = img2img(options=common_pb2.JobOptions(mode=common_pb2.RESPONSE_MODE_ASYNC))
        name = (await generate(ch, "ImageToImage", params, {"image": PNG})).events[0].job
        jobs = job_service_pb2_grpc.JobServiceStub(ch)
        async with asyncio.timeout(20):
            while comfy[0].running_prompt is None:
                await asyncio.sleep(0.02)
            cancelled = (await jobs.CancelJob(jpb.CancelJobRequest(name=name))).job
            assert cancelled.state == job_pb2.Job.STATE_CANCELLED
            while not comfy[0].received.interrupts:
                await asyncio.sleep(0.02)


async def test_failover_to_a_second_agent_when_the_first_dies(tmp_path: Path) -> None:
    async with comfy_service(tmp_path, agents=2) as (service, comfy), channel_to(service) as ch:
        comfy[0].hang_at("7", interruptible=False)
        call = asyncio.create_task(generate(ch, "ImageToImage", img2img(), {"image": PNG}))
        async with asyncio.timeout(20):
            while comfy[0].running_prompt is None:
                await asyncio.sleep(0.02)
        await comfy[0].kill()
        got = await asyncio.wait_for(call, 60)
        assert "retrying" in got.kinds
        assert got.final.state == SUCCEEDED and got.final.agent == "gpu-1"


async def test_unknown_job_is_not_found(tmp_path: Path) -> None:
    async with comfy_service(tmp_path) as (service, _), channel_to(service) as ch:
        jobs = job_service_pb2_grpc.JobServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await jobs.GetJob(jpb.GetJobRequest(name="jobs/01NOSUCHJOB"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await jobs.GetJob(jpb.GetJobRequest(name="../etc/passwd"))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_generation_health_follows_the_agents(tmp_path: Path) -> None:
    fast_probes = {"agent_probe_interval_s": 0.2}
    async with (
        comfy_service(tmp_path, **fast_probes) as (service, comfy),
        channel_to(service) as ch,
    ):
        health = health_pb2_grpc.HealthStub(ch)
        request = health_pb2.HealthCheckRequest(service="imagetasks.v1.GenerationService")
        async with asyncio.timeout(20):
            while (await health.Check(request)).status != health_pb2.HealthCheckResponse.SERVING:
                await asyncio.sleep(0.1)
            await comfy[0].kill()
            while (await health.Check(request)).status == health_pb2.HealthCheckResponse.SERVING:
                await asyncio.sleep(0.1)


async def test_without_any_provider_generation_is_refused_clearly(
    service: Service, channel: grpc.aio.Channel
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(channel, "ImageToImage", img2img(), {"image": PNG})
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    _, details = rich_status(caught.value)
    assert details["ErrorInfo"].reason == "NO_PROVIDER"


async def test_list_agents_shows_state_tasks_and_models(tmp_path: Path) -> None:
    fast_probes = {"agent_probe_interval_s": 0.2}
    async with (
        comfy_service(tmp_path, agents=2, **fast_probes) as (service, comfy),
        channel_to(service) as ch,
    ):
        stub = agent_service_pb2_grpc.AgentServiceStub(ch)
        async with asyncio.timeout(20):
            while True:
                agents = (await stub.ListAgents(agpb.ListAgentsRequest())).agents
                if all(a.state == agpb.Agent.STATE_ONLINE for a in agents):
                    break
                await asyncio.sleep(0.05)
        by_name = {a.name: a for a in agents}
        assert set(by_name) == {"gpu-0", "gpu-1"}
        gpu0 = by_name["gpu-0"]
        assert gpu0.kind == agpb.Agent.KIND_COMFYUI and gpu0.url == comfy[0].url
        assert common_pb2.TASK_IMAGE_TO_IMAGE in gpu0.tasks
        assert any(m.startswith("checkpoints/") for m in gpu0.models)
        assert gpu0.priority > by_name["gpu-1"].priority
        await comfy[1].kill()
        async with asyncio.timeout(20):
            while True:
                agents = (await stub.ListAgents(agpb.ListAgentsRequest())).agents
                if {a.name: a for a in agents}["gpu-1"].state == agpb.Agent.STATE_OFFLINE:
                    break
                await asyncio.sleep(0.05)


async def test_reply_to_webhook_is_signed_and_retried(tmp_path: Path) -> None:
    import json

    from aiserver.webhooks import verify
    from tests.webhooks.receiver import Receiver

    secret = "whsec-test"
    async with Receiver(500) as receiver:
        async with (
            comfy_service(tmp_path, webhook_secret=secret, webhook_allow_hosts=("127.0.0.1",)) as (
                service,
                _,
            ),
            channel_to(service) as ch,
        ):
            options = common_pb2.JobOptions(reply_to=receiver.url, ref_id="hook-1")
            got = await generate(ch, "ImageToImage", img2img(options=options), {"image": PNG})
            async with asyncio.timeout(30):  # first delivery answered 500, then retried
                while len(receiver.requests) < 2:
                    await asyncio.sleep(0.05)
        delivered = receiver.requests[-1]
        verify(secret.encode(), delivered.headers, delivered.body, 300)
        body = json.loads(delivered.body)
        assert body["state"] == "SUCCEEDED" and body["refId"] == "hook-1"
        assert body["jobId"] == got.final.name.split("/", 1)[1]
        assert body["outputs"][0]["url"].endswith(got.final.outputs[0].url)
        assert receiver.requests[0].headers["webhook-id"] == delivered.headers["webhook-id"]
