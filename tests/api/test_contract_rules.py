"""The contract's buf.validate rules, enforced by the server: reasons and field paths callers
rely on, over real gRPC calls."""

from __future__ import annotations

import time
from typing import Any

import grpc
import protovalidate
import pytest
from google.protobuf import message_factory
from imagetasks.v1 import (
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    common_pb2,
    generation_service_pb2,
    generation_service_pb2_grpc,
    job_service_pb2,
    job_service_pb2_grpc,
    tasks_pb2,
    transform_service_pb2,
    transform_service_pb2_grpc,
)

from aiserver.api.validation import check_request, violations_of
from aiserver.errors import ServiceError
from aiserver.gateway.routes import contract_files
from tests.support.grpc_helpers import rich_status, send_all, upload_messages, violated_fields
from tests.support.images import encode, quadrant_image

SHA = "0" * 64


def test_every_contract_message_compiles() -> None:
    """A rule protovalidate cannot compile would fail every call of its message at run time."""
    checked = 0
    for file in contract_files():
        for desc in file.message_types_by_name.values():
            for msg_desc in (desc, *desc.nested_types):
                protovalidate.collect_violations(message_factory.GetMessageClass(msg_desc)())
                checked += 1
    assert checked > 40


async def _fails(call: Any) -> tuple[grpc.StatusCode, str, list[str]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        result = call
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    err = caught.value
    _status, details = rich_status(err)
    return err.code(), details["ErrorInfo"].reason, violated_fields(details)


async def _upload(method: Any, request_type: Any, params: Any) -> tuple[Any, str, list[str]]:
    call = method()
    await send_all(
        call, upload_messages(request_type, params, {"image": encode(quadrant_image(8, 8), "PNG")})
    )
    return await _fails(call)


UNARY_CASES = [
    # (stub, method, request, reason, fields)
    ("jobs", "ListJobs", job_service_pb2.ListJobsRequest(page_size=1001), "INVALID_PAGE_SIZE",
     ["page_size"]),
    ("jobs", "ListJobs", job_service_pb2.ListJobsRequest(states=[0]), "UNKNOWN_STATE",
     ["states"]),
    ("jobs", "ListJobs", job_service_pb2.ListJobsRequest(task=99), "UNKNOWN_TASK", ["task"]),
    ("jobs", "GetJob", job_service_pb2.GetJobRequest(name="jobs/a/b"), "INVALID_NAME", ["name"]),
    ("jobs", "CancelJob", job_service_pb2.CancelJobRequest(name="x"), "INVALID_NAME", ["name"]),
    ("artifacts", "GetArtifact", artifact_service_pb2.GetArtifactRequest(name="artifacts/../x"),
     "INVALID_ARTIFACT_NAME", ["name"]),
]  # fmt: skip

STREAM_CASES = [
    ("jobs", "WatchJob", job_service_pb2.WatchJobRequest(name="jobs/"), "INVALID_NAME", ["name"]),
    ("artifacts", "ReadArtifact",
     artifact_service_pb2.ReadArtifactRequest(
         name=f"artifacts/2026/01/31/{SHA}.png", read_offset=-1),
     "INVALID_RANGE", ["read_offset"]),
    ("artifacts", "GetVariant",
     artifact_service_pb2.GetVariantRequest(
         name=f"artifacts/2026/01/31/{SHA}.png", spec="width=16", width=16),
     "INVALID_VARIANT_SPEC", ["spec"]),
    ("artifacts", "GetVariant",
     artifact_service_pb2.GetVariantRequest(
         name=f"artifacts/2026/01/31/{SHA}.png", spec="width=0"),
     "INVALID_VARIANT_SPEC", ["spec"]),
]  # fmt: skip


def _stubs(channel: grpc.aio.Channel) -> dict[str, Any]:
    return {
        "jobs": job_service_pb2_grpc.JobServiceStub(channel),
        "artifacts": artifact_service_pb2_grpc.ArtifactServiceStub(channel),
        "transform": transform_service_pb2_grpc.TransformServiceStub(channel),
        "generation": generation_service_pb2_grpc.GenerationServiceStub(channel),
    }


@pytest.mark.parametrize(("stub", "method", "request_", "reason", "fields"), UNARY_CASES)
async def test_unary_requests_are_checked(
    channel: grpc.aio.Channel, stub: str, method: str, request_: Any, reason: str, fields: Any
) -> None:
    call = getattr(_stubs(channel)[stub], method)(request_)
    assert await _fails(call) == (grpc.StatusCode.INVALID_ARGUMENT, reason, fields)


@pytest.mark.parametrize(("stub", "method", "request_", "reason", "fields"), STREAM_CASES)
async def test_server_stream_requests_are_checked(
    channel: grpc.aio.Channel, stub: str, method: str, request_: Any, reason: str, fields: Any
) -> None:
    call = getattr(_stubs(channel)[stub], method)(request_)
    assert await _fails(call) == (grpc.StatusCode.INVALID_ARGUMENT, reason, fields)


async def test_upload_params_are_checked_on_arrival(channel: grpc.aio.Channel) -> None:
    stubs = _stubs(channel)
    transform, generation = stubs["transform"], stubs["generation"]
    tpb, gpb = transform_service_pb2, generation_service_pb2
    got = await _upload(
        transform.ConvertImage, tpb.ConvertImageRequest, tasks_pb2.ConvertImageParams()
    )
    assert got == (grpc.StatusCode.INVALID_ARGUMENT, "MISSING_FORMAT", ["params.output_format"])
    params = tasks_pb2.ConvertImageParams(output_format=common_pb2.IMAGE_FORMAT_PNG, quality=101)
    got = await _upload(transform.ConvertImage, tpb.ConvertImageRequest, params)
    assert got == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_QUALITY", ["params.quality"])
    params_crop = tasks_pb2.CropImageParams(x=-1, width=4, height=4)
    got = await _upload(transform.CropImage, tpb.CropImageRequest, params_crop)
    assert got == (grpc.StatusCode.INVALID_ARGUMENT, "CROP_OUT_OF_BOUNDS", ["params.x"])
    got = await _upload(transform.CropImage, tpb.CropImageRequest, tasks_pb2.CropImageParams())
    assert got[1:] == ("INVALID_CROP", ["params.width", "params.height"])
    # Every violation is reported, each on its own field.
    blank = tasks_pb2.ImageToImageParams(
        positive_prompt="  ",
        steps=0,
        batch_size=11,
        denoise=0,
        seed=-1,
        options=common_pb2.JobOptions(tag="a\nb", reply_to="ftp://example.com/"),
    )
    code, reason, fields = await _upload(generation.ImageToImage, gpb.ImageToImageRequest, blank)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PARAMETERS")
    assert fields == [
        "params.positive_prompt",
        "params.denoise",
        "params.batch_size",
        "params.seed",
        "params.steps",
        "params.options.tag",
        "params.options.reply_to",
    ]
    only_url = tasks_pb2.ImageUpscaleParams(
        options=common_pb2.JobOptions(reply_to="gopher://example.com/")
    )
    got = await _upload(generation.ImageUpscale, gpb.ImageUpscaleRequest, only_url)
    assert got == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REPLY_TO",
        ["params.options.reply_to"],
    )


def test_a_valid_request_passes() -> None:
    params = tasks_pb2.ImageToImageParams(
        positive_prompt="a cat",
        negative_prompt="",
        denoise=0.5,
        steps=25,
        batch_size=1,
        seed=0,
        cfg_scale=7,
        options=common_pb2.JobOptions(ref_id="r-1", tag="t", reply_to="https://hooks.example/x"),
    )
    assert violations_of(params) == []
    check_request(params)
    with pytest.raises(ServiceError):
        check_request(tasks_pb2.ImageToImageParams(positive_prompt=""))


def test_rules_are_compiled_once() -> None:
    """The cost per call is the evaluation only; the figure goes into the report."""
    params = tasks_pb2.ImageToImageParams(
        positive_prompt="a cat " * 50, steps=25, options=common_pb2.JobOptions(tag="x")
    )
    check_request(params)  # compiled (or already cached) here
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        check_request(params)
    per_call_us = (time.perf_counter() - start) / n * 1e6
    print(f"check_request(ImageToImageParams): {per_call_us:.1f} us per call")
    assert per_call_us < 2000  # compiling per call would cost milliseconds


def test_a_small_valid_message_is_checked_once_and_an_invalid_one_every_time() -> None:
    from aiserver.api import validation

    params = tasks_pb2.ImageUpscaleParams(
        seed=7, options=common_pb2.JobOptions(mode=common_pb2.RESPONSE_MODE_SYNC)
    )
    key = (params.DESCRIPTOR.full_name, params.SerializeToString(deterministic=True))
    validation._VALID.pop(key, None)
    assert violations_of(params) == []
    assert key in validation._VALID  # the next equal message is looked up, not walked
    assert violations_of(tasks_pb2.ImageUpscaleParams.FromString(key[1])) == []

    bad = tasks_pb2.ImageUpscaleParams(options=common_pb2.JobOptions(tag="x" * 500))
    for _ in range(2):
        assert [p for p, _r, _t in violations_of(bad)] == ["options.tag"]
    assert not any(k[1] == bad.SerializeToString(deterministic=True) for k in validation._VALID)
