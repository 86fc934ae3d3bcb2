"""gRPC clients that stop reading a server stream (small HTTP/2 windows, no deadline): each
class of stream - a SYNC task call streaming its events and BYTES, ReadArtifact, WatchJob -
ends once a message has waited ``upload_idle_timeout_s``; its streaming slot goes, the call
ends on the client (the connection carrying it is shut), the job is not touched. A client
that reads slowly but steadily is not cut (README, "Limits")."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from imagetasks.v1 import (
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    common_pb2,
    generation_service_pb2_grpc,
    job_pb2,
    job_service_pb2_grpc,
    tasks_pb2,
)
from imagetasks.v1 import job_service_pb2 as jpb
from PIL import Image

from aiserver.api.stalls import MAX_SPARED
from aiserver.server import Service
from tests.support.generation import REQUEST_TYPES, comfy_service, generate
from tests.support.grpc_helpers import send_all, upload_messages

IDLE_S = 2.0
CHUNK = 256 * 1024  # a megabytes output is many messages: the slow read outlasts IDLE_S
ENDS_WITHIN_S = 30.0  # bounds the test only: on a loaded machine the cut comes at ~IDLE_S
# No BDP probing and a 1 KiB lookahead: the window stays small, as for a reader that stopped.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]


def _noise_png(side: int) -> bytes:
    """Incompressible: its upscale is megabytes."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, "PNG")
    return buf.getvalue()


def _sample(service: Service, name: str, **labels: str) -> float:
    value = service.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def _streams(service: Service) -> float:
    return _sample(service, "aiserver_active_streams")


def _stalled(service: Service) -> float:
    return _sample(service, "aiserver_rejected_requests_total", reason="STREAM_STALLED")


@asynccontextmanager
async def _service(tmp_path: Path) -> AsyncIterator[Service]:
    settings = {"upload_idle_timeout_s": IDLE_S, "chunk_bytes": CHUNK}
    async with comfy_service(tmp_path, **settings) as (service, _):
        yield service


async def _upscale(service: Service, channel: grpc.aio.Channel, mode: int) -> Any:
    """An ImageUpscale call of a megabytes-large output, its upload sent."""
    stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
    call = stub.ImageUpscale()  # no deadline: nothing but the server ends a stalled call
    params = tasks_pb2.ImageUpscaleParams(options=common_pb2.JobOptions(mode=mode))
    messages = upload_messages(REQUEST_TYPES["ImageUpscale"], params, {"image": _noise_png(512)})
    await send_all(call, messages)
    return call


async def _finished_job(service: Service, other: grpc.aio.Channel, name: str) -> job_pb2.Job:
    jobs = job_service_pb2_grpc.JobServiceStub(other)
    async with asyncio.timeout(ENDS_WITHIN_S):
        while True:
            job = (await jobs.GetJob(jpb.GetJobRequest(name=name))).job
            if job.state not in (job_pb2.Job.STATE_QUEUED, job_pb2.Job.STATE_RUNNING):
                return job
            await asyncio.sleep(0.1)


async def _ends(service: Service, call: Any) -> grpc.StatusCode:
    """The stalled call ends on both sides: the client's, and the server's slot."""
    async with asyncio.timeout(ENDS_WITHIN_S):
        code = await call.code()
        while _streams(service) != 0:
            await asyncio.sleep(0.05)
    assert _stalled(service) == 1
    result: grpc.StatusCode = code
    return result


async def _job_of_size(service: Service) -> job_pb2.Job:
    """A finished job whose output is megabytes."""
    target = f"127.0.0.1:{service.grpc_port}"
    async with grpc.aio.insecure_channel(target) as channel:
        call = await _upscale(service, channel, common_pb2.RESPONSE_MODE_ASYNC)
        name = (await call.read()).event.job
        await call.code()
        job = await _finished_job(service, channel, name)
    assert job.state == job_pb2.Job.STATE_SUCCEEDED
    assert job.outputs[0].size_bytes > 8 * CHUNK
    return job


async def test_a_sync_call_whose_client_stops_reading_ends_and_its_job_is_stored(
    tmp_path: Path,
) -> None:
    async with _service(tmp_path) as service:
        target = f"127.0.0.1:{service.grpc_port}"
        async with (
            grpc.aio.insecure_channel(target, options=SMALL_WINDOW) as slow,
            grpc.aio.insecure_channel(target) as other,
        ):
            call = await _upscale(service, slow, common_pb2.RESPONSE_MODE_SYNC)
            name = (await call.read()).event.job  # then reads nothing more
            assert await _ends(service, call) == grpc.StatusCode.UNAVAILABLE
            # The caller stopped reading; it did not leave: its job runs on and is stored.
            job = await _finished_job(service, other, name)
            assert job.state == job_pb2.Job.STATE_SUCCEEDED
            assert job.outputs[0].size_bytes > 1 << 20
            # The client's channel connects again.
            jobs = job_service_pb2_grpc.JobServiceStub(slow)
            again = (await jobs.GetJob(jpb.GetJobRequest(name=name), timeout=10)).job
            assert again.state == job_pb2.Job.STATE_SUCCEEDED


async def test_a_read_artifact_whose_client_stops_reading_ends(tmp_path: Path) -> None:
    async with _service(tmp_path) as service:
        job = await _job_of_size(service)
        target = f"127.0.0.1:{service.grpc_port}"
        async with grpc.aio.insecure_channel(target, options=SMALL_WINDOW) as slow:
            stub = artifact_service_pb2_grpc.ArtifactServiceStub(slow)
            call = stub.ReadArtifact(
                artifact_service_pb2.ReadArtifactRequest(name=job.outputs[0].name)
            )
            await call.read()  # one chunk, then nothing
            assert await _ends(service, call) == grpc.StatusCode.UNAVAILABLE


async def test_a_watch_whose_client_stops_reading_ends(tmp_path: Path) -> None:
    async with _service(tmp_path) as service:
        target = f"127.0.0.1:{service.grpc_port}"
        async with grpc.aio.insecure_channel(target) as channel:
            params = tasks_pb2.ImageToImageParams(
                positive_prompt="a lighthouse " * 300,  # the job's events carry its params
                negative_prompt="fog " * 1000,
                steps=2,
                options=common_pb2.JobOptions(mode=common_pb2.RESPONSE_MODE_ASYNC),
            )
            got = await generate(channel, "ImageToImage", params, {"image": _noise_png(32)})
            name = got.events[0].job
            job = await _finished_job(service, channel, name)
            assert job.state == job_pb2.Job.STATE_SUCCEEDED
            replay = job_service_pb2_grpc.JobServiceStub(channel).WatchJob(
                jpb.WatchJobRequest(name=name)
            )
            sizes = [msg.ByteSize() async for msg in replay]
        assert sum(sizes[1:]) > 4 * 1024  # more than the small window holds
        async with grpc.aio.insecure_channel(target, options=SMALL_WINDOW) as slow:
            call = job_service_pb2_grpc.JobServiceStub(slow).WatchJob(
                jpb.WatchJobRequest(name=name)
            )
            await call.read()
            assert await _ends(service, call) == grpc.StatusCode.UNAVAILABLE


async def test_a_client_reading_slowly_but_steadily_is_not_cut(tmp_path: Path) -> None:
    async with _service(tmp_path) as service:
        job = await _job_of_size(service)
        target = f"127.0.0.1:{service.grpc_port}"
        async with grpc.aio.insecure_channel(target, options=SMALL_WINDOW) as slow:
            stub = artifact_service_pb2_grpc.ArtifactServiceStub(slow)
            call = stub.ReadArtifact(
                artifact_service_pb2.ReadArtifactRequest(name=job.outputs[0].name)
            )
            got = 0
            async for msg in call:  # each chunk taken within the idle time, all of them not
                got += len(msg.data)
                await asyncio.sleep(IDLE_S / 5)
            assert got == job.outputs[0].size_bytes > 5 * CHUNK
            assert await call.code() == grpc.StatusCode.OK
        assert _stalled(service) == 0


async def test_a_sync_job_cut_for_a_stalled_reader_mid_run_runs_on(tmp_path: Path) -> None:
    """A stall while the job still runs: the caller stopped reading, it did not leave (a SYNC
    caller that leaves takes its job with it). The stall is set on the watched stream by hand
    (a running job's few events fit any window); the watch then ends the call as usual."""
    async with (
        comfy_service(tmp_path, upload_idle_timeout_s=IDLE_S) as (service, comfy),
        grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel,
    ):
        comfy[0].hang_at("7")  # the ImageToImage KSampler waits for release
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        call = stub.ImageToImage()
        params = tasks_pb2.ImageToImageParams(
            positive_prompt="a lighthouse",
            steps=2,
            options=common_pb2.JobOptions(mode=common_pb2.RESPONSE_MODE_SYNC),
        )
        await send_all(
            call,
            upload_messages(REQUEST_TYPES["ImageToImage"], params, {"image": _noise_png(32)}),
        )
        name = (await call.read()).event.job
        async with asyncio.timeout(ENDS_WITHIN_S):
            while comfy[0].running_prompt is None:
                await asyncio.sleep(0.02)
        guard = service._guard
        assert guard is not None and guard.stalls is not None
        (writer,) = guard.stalls._writers
        async with asyncio.timeout(ENDS_WITHIN_S):
            while _stalled(service) == 0:  # until the watch's sweep sees it (events move on)
                writer.writing_since = -1e9  # a message waited since long ago
                await asyncio.sleep(0.01)
        await _ends(service, call)
        comfy[0].release("7")
        job = await _finished_job(service, channel, name)
        assert job.state == job_pb2.Job.STATE_SUCCEEDED


async def test_a_connection_with_a_live_stream_is_spared_a_bounded_number_of_times(
    tmp_path: Path,
) -> None:
    """A proxy's connection carries many clients' streams: one stalled stream does not shut
    it while another is open; MAX_SPARED of them do (their core streams stay until then)."""
    async with _service(tmp_path) as service:
        job = await _job_of_size(service)
        target = f"127.0.0.1:{service.grpc_port}"
        async with grpc.aio.insecure_channel(target, options=SMALL_WINDOW) as shared:
            live = job_service_pb2_grpc.JobServiceStub(shared).WatchJobs(jpb.WatchJobsRequest())
            artifacts = artifact_service_pb2_grpc.ArtifactServiceStub(shared)
            request = artifact_service_pb2.ReadArtifactRequest(name=job.outputs[0].name)
            stalled = []
            for _ in range(MAX_SPARED):
                call = artifacts.ReadArtifact(request)
                await call.read()
                stalled.append(call)
            async with asyncio.timeout(ENDS_WITHIN_S):
                while _stalled(service) < MAX_SPARED or _streams(service) != 1:
                    await asyncio.sleep(0.05)
            # Their handlers are gone; the connection, the live watch and the streams stay.
            assert not live.done()
            assert not any(call.done() for call in stalled)
            one_more = artifacts.ReadArtifact(request)
            await one_more.read()
            for call in (one_more, live, *stalled):
                async with asyncio.timeout(ENDS_WITHIN_S):
                    assert await call.code() == grpc.StatusCode.UNAVAILABLE
            assert _stalled(service) == MAX_SPARED + 1
