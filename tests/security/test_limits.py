"""Limits, each through gRPC and HTTP: upload bytes, pixels, batch size, prompt length,
unfinished jobs per key, request rate, streaming calls, deadlines. Every refusal is a clean
status with its reason (RESOURCE_EXHAUSTED ones with a retry delay where waiting helps), and
the service keeps serving."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imagetasks.v1 import (
    common_pb2,
    job_pb2,
    job_service_pb2_grpc,
    tasks_pb2,
    transform_service_pb2,
    transform_service_pb2_grpc,
)
from imagetasks.v1 import job_service_pb2 as jpb
from PIL import Image

from aiserver.api.guard import peer_host
from aiserver.gateway import Gateway, GatewaySettings
from aiserver.ratelimit import RateLimiter
from aiserver.server import Service
from tests.security.conftest import (
    ASYNC,
    PNG,
    auth,
    bearer,
    channel_to,
    http_base,
    keyed_service,
)
from tests.support.generation import generate
from tests.support.grpc_helpers import rich_status, send_all, upload_messages

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def noise_png(width: int, height: int) -> bytes:
    im = Image.effect_noise((width, height), 64).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def img2img(prompt: str = "a lighthouse", **kw: Any) -> tasks_pb2.ImageToImageParams:
    return tasks_pb2.ImageToImageParams(positive_prompt=prompt, steps=2, **kw)


async def convert(ch: grpc.aio.Channel, data: bytes, metadata: Any = ()) -> list[Any]:
    call = transform_service_pb2_grpc.TransformServiceStub(ch).ConvertImage(metadata=metadata)
    await send_all(
        call,
        upload_messages(
            transform_service_pb2.ConvertImageRequest,
            tasks_pb2.ConvertImageParams(output_format=common_pb2.IMAGE_FORMAT_PNG),
            {"image": data},
        ),
    )
    return [r async for r in call]


async def grpc_error(awaitable: Any) -> tuple[grpc.StatusCode, str, dict[str, Any]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    _, details = rich_status(caught.value)
    return caught.value.code(), details["ErrorInfo"].reason, details


async def assert_serving(service: Service) -> None:
    async with channel_to(service) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def retry_delay(details: dict[str, Any]) -> float:
    d = details["RetryInfo"].retry_delay
    return float(d.seconds + d.nanos / 1e9)


async def test_upload_bytes_and_pixels(tmp_path: Path) -> None:
    big = noise_png(200, 200)  # ~120 kB of noise
    limits = {"max_upload_bytes": 50_000, "max_pixels": 10_000}
    async with (
        keyed_service(tmp_path, **limits) as (service, comfy),
        channel_to(service) as ch,
        httpx.AsyncClient(base_url=http_base(service), timeout=30) as http,
    ):
        assert len(big) > 50_000
        key = bearer("alice")
        code, reason, _ = await grpc_error(convert(ch, big, key))
        assert (code, reason) == (RESOURCE_EXHAUSTED, "UPLOAD_TOO_LARGE")
        code, reason, _ = await grpc_error(
            generate(ch, "ImageToImage", img2img(), {"image": big}, metadata=key)
        )
        assert (code, reason) == (RESOURCE_EXHAUSTED, "UPLOAD_TOO_LARGE")
        res = await http.post(
            "/api/ImageToImage",
            files={"image": ("big.png", big)},
            data={"PositivePrompt": "x"},
            headers=auth("alice"),
        )
        assert res.status_code == 413
        assert res.json()["responseStatus"]["errorCode"] == "UPLOAD_TOO_LARGE"
        wide = noise_png(120, 100)  # 12,000 pixels, small file
        assert len(wide) < 50_000
        code, reason, _ = await grpc_error(convert(ch, wide, key))
        assert (code, reason) == (RESOURCE_EXHAUSTED, "IMAGE_TOO_MANY_PIXELS")
        code, reason, _ = await grpc_error(
            generate(ch, "ImageToImage", img2img(), {"image": wide}, metadata=key)
        )
        assert (code, reason) == (RESOURCE_EXHAUSTED, "IMAGE_TOO_MANY_PIXELS")
        for route in ("/api/ConvertImage", "/api/ImageToImage"):
            res = await http.post(
                route,
                files={"image": ("wide.png", wide)},
                data={"PositivePrompt": "x", "OutputFormat": "png"},
                headers=auth("alice"),
            )
            assert res.status_code == 413, route
            assert res.json()["responseStatus"]["errorCode"] == "IMAGE_TOO_MANY_PIXELS"
        assert comfy[0].received.prompts == []
        await convert(ch, PNG, key)  # within limits: fine
        await assert_serving(service)


async def test_batch_size_and_prompt_length(tmp_path: Path) -> None:
    limits = {"max_batch_size": 2, "max_prompt_chars": 50}
    async with (
        keyed_service(tmp_path, **limits) as (service, comfy),
        channel_to(service) as ch,
        httpx.AsyncClient(base_url=http_base(service), timeout=30) as http,
    ):
        key = bearer("alice")
        cases = [
            (img2img(batch_size=3), "params.batch_size", {"BatchSize": "3"}, "BatchSize"),
            (img2img("p" * 51), "params.positive_prompt", {"PositivePrompt": "p" * 51}, None),
            (
                img2img(negative_prompt="n" * 51),
                "params.negative_prompt",
                {"NegativePrompt": "n" * 51},
                "NegativePrompt",
            ),
        ]
        for params, field, form, http_field in cases:
            code, _, details = await grpc_error(
                generate(ch, "ImageToImage", params, {"image": PNG}, metadata=key)
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert field in [v.field for v in details["BadRequest"].field_violations]
            res = await http.post(
                "/api/ImageToImage",
                files={"image": ("a.png", PNG)},
                data={"PositivePrompt": "ok", **form},
                headers=auth("alice"),
            )
            assert res.status_code == 400, res.text
            names = [e["fieldName"] for e in res.json()["responseStatus"]["errors"]]
            assert (http_field or "PositivePrompt") in names
        assert comfy[0].received.prompts == []
        # At the limits exactly: accepted.
        ok = await generate(
            ch, "ImageToImage", img2img("p" * 50, batch_size=2), {"image": PNG}, metadata=key
        )
        assert ok.final.state == job_pb2.Job.STATE_SUCCEEDED and len(ok.final.outputs) == 2


async def test_unfinished_jobs_per_key(tmp_path: Path) -> None:
    async with (
        keyed_service(tmp_path, max_active_jobs_per_key=2) as (service, comfy),
        channel_to(service) as ch,
        httpx.AsyncClient(base_url=http_base(service), timeout=30) as http,
    ):
        comfy[0].hang_at("7")
        key = bearer("alice")
        first = await generate(
            ch, "ImageToImage", img2img(options=common_pb2.JobOptions(mode=2, ref_id="r1")),
            {"image": PNG}, metadata=key,
        )  # fmt: skip
        await generate(ch, "ImageToImage", img2img(options=ASYNC), {"image": PNG}, metadata=key)
        code, reason, details = await grpc_error(
            generate(ch, "ImageToImage", img2img(options=ASYNC), {"image": PNG}, metadata=key)
        )
        assert (code, reason) == (RESOURCE_EXHAUSTED, "TOO_MANY_JOBS")
        assert retry_delay(details) > 0
        # Resending a job it already has is no new work: answered, not refused.
        again = await generate(
            ch, "ImageToImage", img2img(options=common_pb2.JobOptions(mode=2, ref_id="r1")),
            {"image": PNG}, metadata=key,
        )  # fmt: skip
        assert again.events[0].job == first.events[0].job and again.of("accepted")[0].existing
        res = await http.post(
            "/api/QueueImageToImage",
            files={"image": ("a.png", PNG)},
            data={"PositivePrompt": "x"},
            headers=auth("alice"),
        )
        assert res.status_code == 429
        assert res.headers["retry-after"] == "5"
        assert res.json()["responseStatus"]["errorCode"] == "TOO_MANY_JOBS"
        # Another key has its own allowance.
        other = await generate(
            ch, "ImageToImage", img2img(options=ASYNC), {"image": PNG}, metadata=bearer("bob")
        )
        assert other.kinds == ["accepted"]
        # A finished job frees its place.
        jobs = job_service_pb2_grpc.JobServiceStub(ch)
        await jobs.CancelJob(jpb.CancelJobRequest(name=first.events[0].job), metadata=key)
        later = await generate(
            ch, "ImageToImage", img2img(options=ASYNC), {"image": PNG}, metadata=key
        )
        assert later.kinds == ["accepted"]
        comfy[0].release("7")
        await assert_serving(service)


async def test_request_rate_per_key(tmp_path: Path) -> None:
    async with (
        # One token per 4 s: a loaded machine cannot refill the bucket between the calls.
        keyed_service(tmp_path, rate_limit_per_s=0.25, rate_limit_burst=3) as (service, _),
        channel_to(service) as ch,
        httpx.AsyncClient(base_url=http_base(service), timeout=30) as http,
    ):
        jobs = job_service_pb2_grpc.JobServiceStub(ch)
        for _ in range(3):
            await jobs.ListJobs(jpb.ListJobsRequest(), metadata=bearer("alice"))
        code, reason, details = await grpc_error(
            jobs.ListJobs(jpb.ListJobsRequest(), metadata=bearer("alice"))
        )
        assert (code, reason) == (RESOURCE_EXHAUSTED, "RATE_LIMITED")
        assert 0 < retry_delay(details) <= 4
        # Streaming and upload calls count the same.
        code, reason, _ = await grpc_error(convert(ch, PNG, bearer("alice")))
        assert reason == "RATE_LIMITED"
        # Per key: bob is not slowed by alice; health is never counted.
        await jobs.ListJobs(jpb.ListJobsRequest(), metadata=bearer("bob"))
        for _ in range(10):
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        res = await http.get("/v1/jobs", headers=auth("alice"))
        assert res.status_code == 429 and int(res.headers["retry-after"]) >= 1
        assert res.json()["responseStatus"]["errorCode"] == "RATE_LIMITED"
        await asyncio.sleep(retry_delay(details) + 0.6)
        await jobs.ListJobs(jpb.ListJobsRequest(), metadata=bearer("alice"))


async def test_request_rate_per_peer_in_open_mode(tmp_path: Path) -> None:
    async with (
        keyed_service(tmp_path, api_keys="", rate_limit_per_s=1.0, rate_limit_burst=2) as (
            service,
            _,
        ),
        channel_to(service) as ch,
    ):
        jobs = job_service_pb2_grpc.JobServiceStub(ch)
        await jobs.ListJobs(jpb.ListJobsRequest())
        await jobs.ListJobs(jpb.ListJobsRequest())
        _, reason, _ = await grpc_error(jobs.ListJobs(jpb.ListJobsRequest()))
        assert reason == "RATE_LIMITED"


async def test_streaming_calls_server_wide(tmp_path: Path) -> None:
    async with (
        keyed_service(tmp_path, max_streaming_calls=2) as (service, _),
        channel_to(service) as ch,
        httpx.AsyncClient(base_url=http_base(service), timeout=30) as http,
    ):
        stub = transform_service_pb2_grpc.TransformServiceStub(ch)
        params = transform_service_pb2.ConvertImageRequest(
            params=tasks_pb2.ConvertImageParams(output_format=common_pb2.IMAGE_FORMAT_PNG)
        )
        held = []
        for who in ("alice", "bob"):  # two uploads left open: two streams held
            call = stub.ConvertImage(metadata=bearer(who))
            await call.write(params)
            held.append(call)
        async with asyncio.timeout(10):
            while service_streams(service) < 2:
                await asyncio.sleep(0.01)
        code, reason, details = await grpc_error(convert(ch, PNG, bearer("alice")))
        assert (code, reason) == (RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS")
        assert retry_delay(details) > 0
        res = await http.post(
            "/api/ConvertImage",
            files={"image": ("a.png", PNG)},
            data={"OutputFormat": "png"},
            headers=auth("alice"),
        )
        assert res.status_code == 429 and res.headers["retry-after"] == "1"
        # Unary calls are not streams.
        await job_service_pb2_grpc.JobServiceStub(ch).ListJobs(
            jpb.ListJobsRequest(), metadata=bearer("alice")
        )
        for call in held:
            call.cancel()
        async with asyncio.timeout(10):
            while service_streams(service) > 0:
                await asyncio.sleep(0.01)
        assert (await convert(ch, PNG, bearer("alice")))[0].info.width == 32


def service_streams(service: Service) -> int:
    value = service.metrics.registry.get_sample_value("aiserver_active_streams")
    return int(value or 0)


async def test_deadlines_end_to_end(tmp_path: Path) -> None:
    async with (
        keyed_service(tmp_path) as (service, comfy),
        channel_to(service) as ch,
    ):
        # An upload that stalls past its deadline: DEADLINE_EXCEEDED, nothing left behind.
        stub = transform_service_pb2_grpc.TransformServiceStub(ch)
        call = stub.ConvertImage(metadata=bearer("alice"), timeout=1.0)
        await call.write(
            transform_service_pb2.ConvertImageRequest(
                params=tasks_pb2.ConvertImageParams(output_format=common_pb2.IMAGE_FORMAT_PNG)
            )
        )
        await call.write(
            transform_service_pb2.ConvertImageRequest(
                chunk=common_pb2.FileChunk(field="image", data=PNG[:100])
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            _ = [r async for r in call]
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        tmp = service.settings.data_dir / "spool" / "tmp"
        async with asyncio.timeout(10):
            while any(tmp.iterdir()):
                await asyncio.sleep(0.05)
        # Over HTTP: a Sync generation past the gateway's deadline is 504, and the job goes.
        comfy[0].hang_at("7")
        gateway = Gateway(
            f"127.0.0.1:{service.grpc_port}",
            port=0,
            settings=GatewaySettings.from_settings(service.settings, sync_timeout_s=1.0),
        )
        await gateway.start()
        try:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
                res = await http.post(
                    "/api/ImageToImage",
                    files={"image": ("a.png", PNG)},
                    data={"PositivePrompt": "x", "Sync": "true"},
                    headers=auth("alice"),
                )
            assert res.status_code == 504, res.text
        finally:
            await gateway.stop()
        jobs = job_service_pb2_grpc.JobServiceStub(ch)
        async with asyncio.timeout(20):
            while True:
                listed = await jobs.ListJobs(jpb.ListJobsRequest(), metadata=bearer("alice"))
                if listed.jobs and listed.jobs[0].state == job_pb2.Job.STATE_CANCELLED:
                    break
                await asyncio.sleep(0.05)
        await assert_serving(service)


def test_token_bucket_refills_and_forgets_the_least_recent() -> None:
    now = [0.0]
    limiter = RateLimiter(4.0, burst=2, max_tracked=3, clock=lambda: now[0])
    assert limiter.take("a") is None and limiter.take("a") is None
    wait = limiter.take("a")
    assert wait is not None and abs(wait - 0.25) < 1e-9
    now[0] += 0.25
    assert limiter.take("a") is None
    assert RateLimiter(3.0).burst == 6  # default burst: twice the rate
    for key in ("b", "c", "d"):
        limiter.take(key)
    assert len(limiter) == 3  # "a" was forgotten (a forgotten bucket is a full one)
    assert limiter.take("a") is None and limiter.take("a") is None
    assert peer_host("ipv4:10.1.2.3:5555") == "10.1.2.3"
    assert peer_host("ipv6:[::1]:5555") == "[::1]"
    assert peer_host("unix:/tmp/s") == "unix:/tmp/s"
