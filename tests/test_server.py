"""The server as operators see it: reflection, health, request ids, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imagetasks.v1 import common_pb2, tasks_pb2, transform_service_pb2_grpc
from imagetasks.v1 import transform_service_pb2 as tpb
from PIL import Image

from aiserver.server import Service
from tests.support.grpc_helpers import upload_messages
from tests.support.images import encode, quadrant_image
from tests.support.process import server_process

GRPCURL = str(Path(sys.executable).parent / "grpcurl")


async def grpcurl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        GRPCURL, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_grpcurl_lists_services_through_reflection(service: Service) -> None:
    rc, out, err = await grpcurl("-plaintext", f"127.0.0.1:{service.grpc_port}", "list")
    assert rc == 0, err
    listed = set(out.split())
    assert {
        "imagetasks.v1.TransformService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= listed
    rc, out, err = await grpcurl(
        "-plaintext", f"127.0.0.1:{service.grpc_port}", "describe", "imagetasks.v1.CropImageParams"
    )
    assert rc == 0, err
    assert "int32 width" in out


async def test_grpcurl_health_check(service: Service) -> None:
    target = f"127.0.0.1:{service.grpc_port}"
    rc, out, err = await grpcurl("-plaintext", target, "grpc.health.v1.Health/Check")
    assert rc == 0, err
    assert json.loads(out) == {"status": "SERVING"}
    rc, out, err = await grpcurl(
        "-plaintext",
        "-d",
        '{"service": "imagetasks.v1.TransformService"}',
        target,
        "grpc.health.v1.Health/Check",
    )
    assert rc == 0, err
    assert json.loads(out) == {"status": "SERVING"}


async def test_request_id_is_echoed_in_trailers(channel: grpc.aio.Channel) -> None:
    stub = transform_service_pb2_grpc.TransformServiceStub(channel)
    params = tasks_pb2.ConvertImageParams(output_format=common_pb2.IMAGE_FORMAT_PNG)
    call = stub.ConvertImage(
        upload_messages(
            tpb.ConvertImageRequest, params, {"image": encode(quadrant_image(), "PNG")}
        ),
        metadata=(("x-request-id", "test-req-42"),),
    )
    async for _ in call:
        pass
    trailers = dict(await call.trailing_metadata())
    assert trailers["x-request-id"] == "test-req-42"


async def test_graceful_shutdown_finishes_in_flight_calls(service: Service) -> None:
    target = f"127.0.0.1:{service.grpc_port}"
    big = encode(Image.frombytes("RGB", (2000, 2000), os.urandom(2000 * 2000 * 3)), "PNG")
    async with grpc.aio.insecure_channel(target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING

        stub = transform_service_pb2_grpc.TransformServiceStub(ch)
        params = tasks_pb2.ConvertImageParams(output_format=common_pb2.IMAGE_FORMAT_TIFF)
        in_flight = stub.ConvertImage(
            upload_messages(tpb.ConvertImageRequest, params, {"image": big})
        )
        first_reply = await in_flight.read()  # the server is working on it
        assert first_reply.WhichOneof("payload") == "info"
        stopping = asyncio.create_task(service.stop(grace_s=10))

        update = await asyncio.wait_for(watch.read(), 5)
        assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
        received = 0
        while (reply := await in_flight.read()) is not grpc.aio.EOF:
            received += len(reply.chunk)
        assert received == first_reply.info.size_bytes
        assert await in_flight.code() == grpc.StatusCode.OK
        await asyncio.wait_for(stopping, 15)


async def test_console_script_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    async with server_process(tmp_path / "data") as server:
        async with grpc.aio.insecure_channel(server.target) as ch:
            reply: Any = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        server.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.proc.wait(), 20) == 0
