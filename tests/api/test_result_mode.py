"""RESPONSE_MODE_RESULT: a waited-for call that streams only what its result needs.

Each test reads the real service over a real channel; where the contract says "as in SYNC",
the same job is also run with SYNC and the two compared.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from imagetasks.v1 import artifact_service_pb2 as apb
from imagetasks.v1 import (
    artifact_service_pb2_grpc,
    common_pb2,
    job_pb2,
    job_service_pb2_grpc,
    tasks_pb2,
)
from imagetasks.v1 import job_service_pb2 as jpb

from tests.support.comfy_standin import ComfyStandIn
from tests.support.generation import Collected, comfy_service, generate, run_workflow, sha256
from tests.support.images import encode, quadrant_image

PNG = encode(quadrant_image(64, 48), "PNG")
RESULT = common_pb2.RESPONSE_MODE_RESULT
SYNC = common_pb2.RESPONSE_MODE_SYNC
REFERENCES = common_pb2.OUTPUT_DELIVERY_REFERENCES
_KSAMPLER = "7"  # the KSampler node of the ImageToImage workflow


def img2img(mode: int, **options: Any) -> tasks_pb2.ImageToImageParams:
    return tasks_pb2.ImageToImageParams(
        positive_prompt="a lighthouse at dawn",
        steps=3,
        batch_size=2,
        options=common_pb2.JobOptions(mode=mode, **options),
    )


def channel_to(service: Any) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}")


def assert_one_job_in_order(got: Collected) -> None:
    assert len({e.job for e in got.events}) == 1 and got.events[0].job.startswith("jobs/")
    seqs = [e.sequence for e in got.events if e.WhichOneof("kind") != "output_chunk"]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_bytes_delivery_streams_the_outputs_and_finished_only(tmp_path: Path) -> None:
    # Steps slower than the progress rate limit: a SYNC call of this job hears progress.
    async with (
        comfy_service(tmp_path, step_delay_s=0.08) as (service, _),
        channel_to(service) as ch,
    ):
        got = await generate(ch, "ImageToImage", img2img(RESULT), {"image": PNG})
        kinds = [k for k in got.kinds if k != "output_chunk"]
        assert kinds == ["output", "output", "finished"], got.kinds
        assert got.kinds[1] == "output_chunk"  # each output's bytes right after it
        assert_one_job_in_order(got)
        final = got.final
        assert final.state == job_pb2.Job.STATE_SUCCEEDED
        assert [a.name for a in final.outputs] == [o.artifact.name for o in got.of("output")]
        for index, artifact in enumerate(final.outputs):
            assert sha256(got.output_bytes(index)) == artifact.sha256

        sync = await generate(ch, "ImageToImage", img2img(SYNC), {"image": PNG})
        assert {"accepted", "progress"} <= set(sync.kinds)  # what RESULT leaves out


async def test_references_delivery_streams_finished_alone(tmp_path: Path) -> None:
    async with comfy_service(tmp_path) as (service, _), channel_to(service) as ch:
        params = img2img(RESULT, delivery=REFERENCES, ref_id="r-1")
        got = await generate(ch, "ImageToImage", params, {"image": PNG})
        assert got.kinds == ["finished"]
        final = got.final
        assert final.state == job_pb2.Job.STATE_SUCCEEDED and final.ref_id == "r-1"
        assert len(final.outputs) == 2
        reader = artifact_service_pb2_grpc.ArtifactServiceStub(ch)
        request = apb.ReadArtifactRequest(name=final.outputs[0].name)
        data = b"".join([r.data async for r in reader.ReadArtifact(request)])
        assert sha256(data) == final.outputs[0].sha256

        # A text task: its texts are in the finished job, no text_output event.
        caption = tasks_pb2.ImageToTextParams(options=common_pb2.JobOptions(mode=RESULT))
        got = await generate(ch, "ImageToText", caption, {"image": PNG})
        assert got.kinds == ["finished"]
        assert got.final.text_outputs and got.final.text_outputs[0].text.strip()


async def test_run_workflow_takes_the_mode_too(tmp_path: Path) -> None:
    async with comfy_service(tmp_path) as (service, _), channel_to(service) as ch:
        parameters = {"prompt": "more sea", "right": 32, "steps": 1}
        got = await run_workflow(
            ch, "outpaint", parameters, {"image": PNG}, options=common_pb2.JobOptions(mode=RESULT)
        )
        assert [k for k in got.kinds if k != "output_chunk"] == ["output", "finished"]
        assert got.final.state == job_pb2.Job.STATE_SUCCEEDED
        assert sha256(got.output_bytes()) == got.final.outputs[0].sha256
        options = common_pb2.JobOptions(mode=RESULT, delivery=REFERENCES)
        got = await run_workflow(ch, "outpaint", parameters, {"image": PNG}, options=options)
        assert got.kinds == ["finished"]


async def test_a_failed_job_ends_as_in_sync(tmp_path: Path) -> None:
    async with comfy_service(tmp_path) as (service, _), channel_to(service) as ch:
        finals = {}
        for mode in (SYNC, RESULT):
            params = img2img(mode, ref_id=f"fail-{mode}")
            params.model = "no_such_model.safetensors"
            got = await generate(ch, "ImageToImage", params, {"image": PNG})  # status OK
            finals[mode] = got.final
            if mode == RESULT:
                assert got.kinds == ["finished"]
        assert finals[RESULT].state == finals[SYNC].state == job_pb2.Job.STATE_FAILED
        assert finals[RESULT].error == finals[SYNC].error
        assert "no_such_model.safetensors" in finals[RESULT].error.message


async def _cancelled_while_running(
    ch: grpc.aio.Channel, comfy: ComfyStandIn, mode: int, ref_id: str
) -> Collected:
    """An ImageToImage call whose job is cancelled (CancelJob) while ComfyUI runs it; the job
    is found by ``ref_id``, as a RESULT caller that has heard nothing yet would find it."""
    call = asyncio.create_task(
        generate(ch, "ImageToImage", img2img(mode, ref_id=ref_id), {"image": PNG})
    )
    jobs = job_service_pb2_grpc.JobServiceStub(ch)
    async with asyncio.timeout(20):
        while True:
            listed = (await jobs.ListJobs(jpb.ListJobsRequest(ref_id=ref_id))).jobs
            if listed and listed[0].state == job_pb2.Job.STATE_RUNNING:
                break
            await asyncio.sleep(0.02)
        while comfy.running_prompt is None:
            await asyncio.sleep(0.02)
        await jobs.CancelJob(jpb.CancelJobRequest(name=listed[0].name))
        return await call


async def test_a_cancelled_job_ends_as_in_sync(tmp_path: Path) -> None:
    async with comfy_service(tmp_path) as (service, comfy), channel_to(service) as ch:
        comfy[0].hang_at(_KSAMPLER)
        sync = await _cancelled_while_running(ch, comfy[0], SYNC, "c-sync")
        result = await _cancelled_while_running(ch, comfy[0], RESULT, "c-result")
        assert result.kinds == ["finished"]
        assert result.final.state == sync.final.state == job_pb2.Job.STATE_CANCELLED
        assert result.final.error == sync.final.error
        assert result.final.error.code == grpc.StatusCode.CANCELLED.value[0]


async def test_the_deadline_cancels_the_job_as_in_sync(tmp_path: Path) -> None:
    async with comfy_service(tmp_path) as (service, comfy), channel_to(service) as ch:
        comfy[0].hang_at(_KSAMPLER)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generate(
                ch, "ImageToImage", img2img(RESULT, ref_id="late"), {"image": PNG}, timeout=3
            )
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        jobs = job_service_pb2_grpc.JobServiceStub(ch)
        async with asyncio.timeout(20):
            while True:
                (job,) = (await jobs.ListJobs(jpb.ListJobsRequest(ref_id="late"))).jobs
                if job.state == job_pb2.Job.STATE_CANCELLED:
                    break
                await asyncio.sleep(0.05)
            while not comfy[0].received.interrupts and not comfy[0].received.deletes:
                await asyncio.sleep(0.05)
