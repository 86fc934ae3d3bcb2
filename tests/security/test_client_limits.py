"""Limits a client meets: uploads open per client address (gRPC and HTTP: 429 / RESOURCE_EXHAUSTED
with a retry delay), and limits waiting cannot fix (413 without ``Retry-After``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import grpc
import httpx
import pytest
from imagetasks.v1 import common_pb2, tasks_pb2, transform_service_pb2_grpc
from imagetasks.v1 import transform_service_pb2 as tpb

from aiserver.server import Service
from tests.security.hostile import gif_many_frames
from tests.support.grpc_helpers import rich_status
from tests.support.images import encode, quadrant_image
from tests.support.tcp_cut import TcpCut

PNG = encode(quadrant_image(16, 12), "PNG")


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"max_uploads_per_client": 2}


def _params() -> Any:
    return tpb.ConvertImageRequest(
        params=tasks_pb2.ConvertImageParams(output_format=common_pb2.IMAGE_FORMAT_PNG)
    )


async def test_grpc_uploads_per_client_address_are_capped(
    service: Service, channel: grpc.aio.Channel
) -> None:
    stub = transform_service_pb2_grpc.TransformServiceStub(channel)
    open_calls = [stub.ConvertImage(timeout=30) for _ in range(2)]
    for call in open_calls:
        await call.write(_params())
    await asyncio.sleep(0.2)
    third = stub.ConvertImage(timeout=30)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in third:
            pass
    err = caught.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _, details = rich_status(err)
    assert details["ErrorInfo"].reason == "TOO_MANY_UPLOADS"
    assert details["RetryInfo"].retry_delay.seconds >= 1
    # The HTTP shim is not that address: its clients are counted one by one.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http_port}") as http:
        res = await http.post(
            "/api/ConvertImage",
            data={"OutputFormat": "png"},
            files={"image": ("a.png", PNG, "image/png")},
        )
        assert res.status_code == 200, res.text
    # A finished upload frees its place.
    for call in open_calls:
        call.cancel()
    await asyncio.sleep(0.2)
    replies = [
        r
        async for r in stub.ConvertImage(
            iter(
                [
                    _params(),
                    tpb.ConvertImageRequest(chunk=common_pb2.FileChunk(field="image", data=PNG)),
                ]
            ),
            timeout=30,
        )
    ]
    assert replies[0].WhichOneof("payload") == "info"


async def test_http_uploads_per_client_address_are_capped(service: Service) -> None:
    head = (
        b"POST /api/ConvertImage HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 100000\r\n\r\n"
        b'--B\r\nContent-Disposition: form-data; name="OutputFormat"\r\n\r\npng\r\n'
    )
    held = []
    for _ in range(2):
        _reader, writer = await asyncio.open_connection("127.0.0.1", service.http_port)
        writer.write(head)
        await writer.drain()
        held.append(writer)
    await asyncio.sleep(0.3)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http_port}") as http:
            res = await http.post(
                "/v1/images:convert",
                data={"outputFormat": "png"},
                files={"image": ("a.png", PNG, "image/png")},
            )
            assert res.status_code == 429, res.text
            assert res.json()["responseStatus"]["errorCode"] == "TOO_MANY_UPLOADS"
            assert int(res.headers["retry-after"]) >= 1
    finally:
        for writer in held:
            writer.close()
    await asyncio.sleep(0.3)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http_port}") as http:
        res = await http.post(
            "/api/ConvertImage",
            data={"OutputFormat": "png"},
            files={"image": ("a.png", PNG, "image/png")},
        )
        assert res.status_code == 200, res.text


async def test_limits_waiting_cannot_fix_are_413_without_retry_after(service: Service) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http_port}") as http:
        res = await http.post(
            "/api/ConvertImage",
            data={"OutputFormat": "png"},
            files={"image": ("many.gif", gif_many_frames(), "image/gif")},
        )
    assert res.status_code == 413, res.text
    assert res.json()["responseStatus"]["errorCode"] == "IMAGE_TOO_MANY_FRAMES"
    assert "retry-after" not in res.headers


async def _convert(stub: Any) -> str:
    chunk = tpb.ConvertImageRequest(chunk=common_pb2.FileChunk(field="image", data=PNG))
    replies = [r async for r in stub.ConvertImage(iter([_params(), chunk]), timeout=30)]
    return str(replies[0].WhichOneof("payload"))


def _held(service: Service) -> int:
    """Upload bytes the spool holds: in memory, or in files being written."""
    on_disk = 0
    for part in service.spool.tmp_dir.iterdir():
        with contextlib.suppress(FileNotFoundError):
            on_disk += part.stat().st_size
    return service.spool.memory.used + on_disk


async def test_a_client_cut_off_mid_upload_frees_its_places_and_spool_files(
    service: Service, channel: grpc.aio.Channel
) -> None:
    """The client's connection dies mid-upload (a reset, no cancel of its calls: through a
    relay that is cut): the memory its uploads held (or their spool files) is given back, and
    its places under ``max_uploads_per_client``, or that address could upload nothing again."""
    async with TcpCut("127.0.0.1", service.grpc_port) as relay:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}") as doomed:
            stub = transform_service_pb2_grpc.TransformServiceStub(doomed)
            calls = [stub.ConvertImage(timeout=60) for _ in range(2)]  # the address's two
            for call in calls:
                await call.write(_params())
                for _ in range(3):
                    data = os.urandom(1 << 20)
                    await call.write(
                        tpb.ConvertImageRequest(
                            chunk=common_pb2.FileChunk(field="image", data=data)
                        )
                    )
            async with asyncio.timeout(10):  # both received, mid-upload
                while _held(service) < 2 * (2 << 20):
                    await asyncio.sleep(0.02)
            relay.cut()
            async with asyncio.timeout(10):
                while _held(service):
                    await asyncio.sleep(0.02)
            for call in calls:
                call.cancel()
    stub = transform_service_pb2_grpc.TransformServiceStub(channel)
    done = await asyncio.gather(_convert(stub), _convert(stub))
    assert done == ["info", "info"]
