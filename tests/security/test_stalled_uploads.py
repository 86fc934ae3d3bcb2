"""Uploads that stop sending, or send too slowly, end with DEADLINE_EXCEEDED and leave no spool
file behind (gRPC: raw streams that send params then nothing, a partial chunk then nothing,
nothing at all, or a trickle)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest
from imagetasks.v1 import common_pb2, tasks_pb2, transform_service_pb2_grpc
from imagetasks.v1 import transform_service_pb2 as tpb

from aiserver.server import Service
from tests.support.grpc_helpers import rich_status


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {
        "upload_idle_timeout_s": 0.5,
        "upload_timeout_s": 2.5,
        "http_header_timeout_s": 0.5,
        "spool_memory_mb": 8,  # an upload holds up to 2 MiB in memory, then spills
    }


def _params() -> Any:
    return tpb.ConvertImageRequest(
        params=tasks_pb2.ConvertImageParams(output_format=common_pb2.IMAGE_FORMAT_PNG)
    )


def _chunk(data: bytes) -> Any:
    return tpb.ConvertImageRequest(
        chunk=common_pb2.FileChunk(field="image", data=data, file_name="x.png")
    )


async def _outcome(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    return caught.value


@pytest.mark.parametrize("sent", ["nothing", "params", "small partial chunk", "partial chunk"])
async def test_a_stalled_upload_ends_and_its_spool_file_is_gone(
    service: Service, channel: grpc.aio.Channel, sent: str
) -> None:
    stub = transform_service_pb2_grpc.TransformServiceStub(channel)
    call = stub.ConvertImage(timeout=30)
    if sent != "nothing":
        await call.write(_params())
    if sent == "small partial chunk":  # a crop's or conversion's small input stays in memory
        await call.write(_chunk(b"\x89PNG\r\n\x1a\n" + b"\x00" * 5000))
        await asyncio.sleep(0.2)
        assert not list(service.spool.tmp_dir.iterdir())
    if sent == "partial chunk":  # past its share of the memory: spooled as it arrives
        await call.write(_chunk(b"\x89PNG\r\n\x1a\n" + b"\x00" * (3 << 20)))
        await asyncio.sleep(0.2)
        assert list(service.spool.tmp_dir.iterdir()), "the chunk should be spooled meanwhile"
    started = asyncio.get_running_loop().time()
    err = await _outcome(call)  # and never half-close
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.details()
    assert rich_status(err)[1]["ErrorInfo"].reason == "UPLOAD_STALLED"
    assert asyncio.get_running_loop().time() - started < 5
    assert not list(service.spool.tmp_dir.iterdir())
    assert service.spool.memory.used == 0


async def test_a_trickling_upload_hits_the_total_deadline(
    service: Service, channel: grpc.aio.Channel
) -> None:
    stub = transform_service_pb2_grpc.TransformServiceStub(channel)
    call = stub.ConvertImage(timeout=30)
    await call.write(_params())

    async def trickle() -> None:
        while not call.done():
            await call.write(_chunk(b"\x00" * 100))
            await asyncio.sleep(0.2)  # under the idle timeout, forever

    writer = asyncio.create_task(trickle())
    try:
        err = await _outcome(call)
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.details()
    assert rich_status(err)[1]["ErrorInfo"].reason == "UPLOAD_TOO_SLOW"
    assert not list(service.spool.tmp_dir.iterdir())


async def test_many_stalled_uploads_over_grpc_and_http_all_end(
    service: Service, channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    stub = transform_service_pb2_grpc.TransformServiceStub(channel)
    calls = [stub.ConvertImage(timeout=30) for _ in range(20)]
    for i, call in enumerate(calls):
        if i % 3:
            await call.write(_params())
        if i % 3 == 2:
            await call.write(_chunk(b"\x00" * 3000))
    head = (
        b"POST /api/ConvertImage HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 100000\r\n\r\n"
        b'--B\r\nContent-Disposition: form-data; name="OutputFormat"\r\n\r\npng\r\n'
        b'--B\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        + b"\x00"
        * 3000
    )

    async def stalled_http(i: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.http_port)
        writer.write(head[: 40 + i * 150])  # a partial head, or a partial body
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(-1), 10)
        finally:
            writer.close()

    errors, answers = await asyncio.gather(
        asyncio.gather(*(_outcome(call) for call in calls)),
        asyncio.gather(*(stalled_http(i) for i in range(20))),
    )
    assert {err.code() for err in errors} == {grpc.StatusCode.DEADLINE_EXCEEDED}
    for answer in answers:  # closed: nothing for a partial head, else 408
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert any(answer.startswith(b"HTTP/1.1 408") for answer in answers)
    await asyncio.sleep(0.3)
    assert not list(service.spool.tmp_dir.iterdir())
    # Slow clients are the clients' doing: no ERROR, no traceback.
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]
