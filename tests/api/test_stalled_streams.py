"""gRPC clients that stop reading a server stream (small HTTP/2 windows, no deadline): each
class of stream - a SYNC task call streaming its events and BYTES, ReadArtifact, WatchJob -
ends once a message has waited the stream idle time; its streaming slot goes, the call
ends on the client (the connection carrying it is shut), the job is not touched. A client
that reads slowly but steadily, or a handler with nothing to send, is not cut; a connection
still serving other calls (a proxy's) is not shut for a stalled stream, up to a process-wide
bound (README, "Limits")."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
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

from aiserver.config import load_settings
from aiserver.security import Security
from aiserver.server import Service
from tests.support.generation import REQUEST_TYPES, comfy_service, generate
from tests.support.grpc_helpers import send_all, upload_messages

IDLE_S = 2.0
CHUNK = 256 * 1024  # a megabytes output is many messages: the slow read outlasts IDLE_S
ENDS_WITHIN_S = 30.0  # bounds the test only: on a loaded machine the cut comes at ~IDLE_S
# No BDP probing and a 1 KiB lookahead: the window stays small, as for a reader that stopped.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
OWN_CONNECTION = [*SMALL_WINDOW, ("grpc.use_local_subchannel_pool", 1)]  # not shared


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


def _ended_as(service: Service, method: str, code: str) -> float:
    return _sample(service, "aiserver_rpcs_total", method=method, code=code)


_STREAMED = (
    "ArtifactService/ReadArtifact",
    "JobService/WatchJob",
    "GenerationService/ImageUpscale",
    "GenerationService/ImageToImage",
)


async def _rest(call: Any) -> list[Any]:
    """The messages left on a call already read with ``read()``."""
    got = []
    while (msg := await call.read()) != grpc.aio.EOF:
        got.append(msg)
    return got


def _target(service: Service) -> str:
    host = service.settings.grpc_host
    return f"{host}:{service.grpc_port}"


@asynccontextmanager
async def _service(tmp_path: Path, **overrides: Any) -> AsyncIterator[Service]:
    settings = {"stream_idle_timeout_s": IDLE_S, "chunk_bytes": CHUNK, **overrides}
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
    # Recorded as what the client saw.
    assert sum(_ended_as(service, method, code.name) for method in _STREAMED) == 1
    result: grpc.StatusCode = code
    return result


async def _job_of_size(service: Service) -> job_pb2.Job:
    """A finished job whose output is megabytes."""
    target = _target(service)
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


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_a_stalled_stream_of_an_ipv6_client_ends(tmp_path: Path) -> None:
    """grpc percent-encodes an IPv6 peer (``ipv6:%5B::1%5D:port``): its socket is found."""
    async with _service(tmp_path, grpc_host="[::1]") as service:
        job = await _job_of_size(service)
        async with grpc.aio.insecure_channel(_target(service), options=SMALL_WINDOW) as slow:
            stub = artifact_service_pb2_grpc.ArtifactServiceStub(slow)
            call = stub.ReadArtifact(
                artifact_service_pb2.ReadArtifactRequest(name=job.outputs[0].name)
            )
            await call.read()
            assert await _ends(service, call) == grpc.StatusCode.UNAVAILABLE


async def test_a_handler_with_nothing_to_send_is_not_cut(tmp_path: Path) -> None:
    """A watch of a job that sends nothing for longer than the idle time waits on its
    servicer, not on its client: it stays, and gets the job's end."""
    async with (
        comfy_service(tmp_path, stream_idle_timeout_s=IDLE_S) as (service, comfy),
        grpc.aio.insecure_channel(_target(service)) as channel,
    ):
        comfy[0].hang_at("7")
        params = tasks_pb2.ImageToImageParams(
            positive_prompt="a lighthouse",
            steps=2,
            options=common_pb2.JobOptions(mode=common_pb2.RESPONSE_MODE_ASYNC),
        )
        got = await generate(channel, "ImageToImage", params, {"image": _noise_png(32)})
        name = got.events[0].job
        async with asyncio.timeout(ENDS_WITHIN_S):
            while comfy[0].running_prompt is None:
                await asyncio.sleep(0.02)
        watch = job_service_pb2_grpc.JobServiceStub(channel).WatchJob(
            jpb.WatchJobRequest(name=name)
        )
        await watch.read()
        await asyncio.sleep(IDLE_S * 2.5)  # several sweeps past the idle time
        assert not watch.done()
        assert _stalled(service) == 0
        comfy[0].release("7")
        async with asyncio.timeout(ENDS_WITHIN_S):
            rest = await _rest(watch)
        assert rest[-1].event.finished.job.state == job_pb2.Job.STATE_SUCCEEDED
        assert await watch.code() == grpc.StatusCode.OK


async def _hung_sync_call(channel: grpc.aio.Channel) -> tuple[Any, str]:
    """A SYNC ImageToImage call whose job runs until its KSampler is released."""
    stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
    call = stub.ImageToImage()
    params = tasks_pb2.ImageToImageParams(
        positive_prompt="a lighthouse",
        steps=2,
        options=common_pb2.JobOptions(mode=common_pb2.RESPONSE_MODE_SYNC),
    )
    await send_all(
        call, upload_messages(REQUEST_TYPES["ImageToImage"], params, {"image": _noise_png(32)})
    )
    return call, (await call.read()).event.job


async def _stall_reads(channel: grpc.aio.Channel, artifact: str, n: int) -> list[Any]:
    stub = artifact_service_pb2_grpc.ArtifactServiceStub(channel)
    calls = []
    for _ in range(n):
        call = stub.ReadArtifact(artifact_service_pb2.ReadArtifactRequest(name=artifact))
        await call.read()  # one chunk, then nothing
        calls.append(call)
    return calls


async def test_a_healthy_sync_call_outlives_many_stalled_streams_on_its_connection(
    tmp_path: Path,
) -> None:
    """A proxy's connection carries a healthy SYNC caller and many clients that stopped
    reading: their handlers go, the connection (and the SYNC call, and its job) stays."""
    async with comfy_service(tmp_path, stream_idle_timeout_s=IDLE_S, chunk_bytes=CHUNK) as (
        service,
        comfy,
    ):
        job = await _job_of_size(service)
        async with grpc.aio.insecure_channel(_target(service), options=SMALL_WINDOW) as shared:
            comfy[0].hang_at("7")
            healthy, name = await _hung_sync_call(shared)
            stalled = await _stall_reads(shared, job.outputs[0].name, 24)
            async with asyncio.timeout(ENDS_WITHIN_S):
                while _stalled(service) < len(stalled) or _streams(service) != 1:
                    await asyncio.sleep(0.05)
            assert not healthy.done()
            assert not any(call.done() for call in stalled)  # left open, handlers gone
            assert _ended_as(service, "ArtifactService/ReadArtifact", "CANCELLED") == 24
            comfy[0].release("7")
            async with asyncio.timeout(ENDS_WITHIN_S):
                events = [msg.event for msg in await _rest(healthy)]
            assert await healthy.code() == grpc.StatusCode.OK
            assert events[-1].HasField("finished")
            jobs = job_service_pb2_grpc.JobServiceStub(shared)
            done = (await jobs.GetJob(jpb.GetJobRequest(name=name))).job
            assert done.state == job_pb2.Job.STATE_SUCCEEDED
            for call in stalled:
                call.cancel()


async def test_past_the_spared_bound_the_connection_holding_most_is_shut(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The core keeps each spared stream's unsent message: past ``stream_max_spared`` the
    connection holding the most spared streams is shut, its live call with it (logged)."""
    async with _service(tmp_path, stream_max_spared=4) as service:
        job = await _job_of_size(service)
        target = _target(service)
        async with (
            grpc.aio.insecure_channel(target, options=OWN_CONNECTION) as shared,
            grpc.aio.insecure_channel(target, options=OWN_CONNECTION) as other,
        ):
            live = job_service_pb2_grpc.JobServiceStub(shared).WatchJobs(jpb.WatchJobsRequest())
            other_live = job_service_pb2_grpc.JobServiceStub(other).WatchJobs(
                jpb.WatchJobsRequest()
            )
            few = await _stall_reads(other, job.outputs[0].name, 1)
            stalled = await _stall_reads(shared, job.outputs[0].name, 4)
            async with asyncio.timeout(ENDS_WITHIN_S):
                while _stalled(service) < 5:
                    await asyncio.sleep(0.05)
            for call in (live, *stalled):
                async with asyncio.timeout(ENDS_WITHIN_S):
                    assert await call.code() == grpc.StatusCode.UNAVAILABLE
            # The other connection, holding fewer, stays.
            assert not other_live.done() and not few[0].done()
            assert any(
                r.levelno == logging.WARNING and "shutting the connection of" in r.getMessage()
                for r in caplog.records
            )


def test_the_stream_idle_time_is_the_upload_idle_time_unless_set() -> None:
    def idle(**env: str) -> float:
        settings = load_settings({f"AISERVER_{k.upper()}": v for k, v in env.items()})
        return Security.from_settings(settings).stream_idle_s

    assert idle(upload_idle_timeout_s="7") == 7.0
    assert idle(upload_idle_timeout_s="7", stream_idle_timeout_s="3") == 3.0
    assert idle(upload_idle_timeout_s="7", stream_idle_timeout_s="0") == 0.0
    off = Security.from_settings(load_settings({"AISERVER_STREAM_IDLE_TIMEOUT_S": "0"}))
    assert off.guard(None).stalls is None
