"""A gRPC client that stops reading its response stream (a SYNC call delivering BYTES,
megabytes: more than any flow-control window). The job must not depend on the caller's
reading: it ends and is stored while the server's write waits. The stream itself is bounded by
the caller's deadline when that comes first: past it the server's handler ends and gives its
stream slot back (the server's own bound, ``upload_idle_timeout_s``, 30 s by default, is longer
here; it is tested in test_stalled_streams.py)."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path

import grpc
from imagetasks.v1 import (
    common_pb2,
    generation_service_pb2_grpc,
    job_pb2,
    job_service_pb2_grpc,
    tasks_pb2,
)
from imagetasks.v1 import job_service_pb2 as jpb
from PIL import Image

from tests.support.generation import REQUEST_TYPES, comfy_service
from tests.support.grpc_helpers import send_all, upload_messages

DEADLINE_S = 20.0  # the job (a stand-in upscale) ends well within it, even on a loaded machine


def _noise_png(side: int) -> bytes:
    """Incompressible: its upscale is megabytes."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, "PNG")
    return buf.getvalue()


def _streams(service: object) -> float | None:
    registry = service.metrics.registry  # type: ignore[attr-defined]
    value: float | None = registry.get_sample_value("aiserver_active_streams")
    return value


async def test_a_client_that_stops_reading_a_bytes_stream_leaves_its_job_stored(
    tmp_path: Path,
) -> None:
    image = _noise_png(512)
    async with comfy_service(tmp_path) as (service, _):
        target = f"127.0.0.1:{service.grpc_port}"
        # No BDP probing: the window stays small, as for a reader that stopped.
        async with (
            grpc.aio.insecure_channel(target, options=[("grpc.http2.bdp_probe", 0)]) as slow,
            grpc.aio.insecure_channel(target) as other,
        ):
            stub = generation_service_pb2_grpc.GenerationServiceStub(slow)
            call = stub.ImageUpscale(timeout=DEADLINE_S)
            params = tasks_pb2.ImageUpscaleParams(
                options=common_pb2.JobOptions(mode=common_pb2.RESPONSE_MODE_SYNC)
            )
            messages = upload_messages(REQUEST_TYPES["ImageUpscale"], params, {"image": image})
            await send_all(call, messages)
            accepted = await call.read()  # then reads nothing more
            name = accepted.event.job
            jobs = job_service_pb2_grpc.JobServiceStub(other)
            async with asyncio.timeout(DEADLINE_S - 2):  # ends and is stored meanwhile
                while True:
                    job = (await jobs.GetJob(jpb.GetJobRequest(name=name))).job
                    if job.state == job_pb2.Job.STATE_SUCCEEDED:
                        break
                    assert job.state in (job_pb2.Job.STATE_QUEUED, job_pb2.Job.STATE_RUNNING)
                    await asyncio.sleep(0.1)
            assert job.outputs[0].size_bytes > 1 << 20
            assert _streams(service) == 1  # the stalled stream, still held
            async with asyncio.timeout(DEADLINE_S + 10):  # the caller's deadline ends it
                while _streams(service) != 0:
                    await asyncio.sleep(0.1)
            assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The job that ended before its caller left stays as it ended.
            job = (await jobs.GetJob(jpb.GetJobRequest(name=name))).job
            assert job.state == job_pb2.Job.STATE_SUCCEEDED
