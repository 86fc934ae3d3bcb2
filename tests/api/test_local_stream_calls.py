"""The in-process shim's server-streaming calls (``aiserver.api.local_calls``): the handler's
steps run in the reading task, in the call's own context. A warm variant is read without a
task; a handler that waits is cancelled with its reader, or by ``cancel()`` from another
task, and its stream slot is given back; its context variables never reach the reader."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from imagetasks.v1 import artifact_service_pb2

from aiserver.api.local_calls import LocalCalls
from aiserver.logs import request_id_var
from aiserver.server import Service
from tests.support.artifacts import put_ref
from tests.support.images import encode, quadrant_image

_WAIT = "/test.Local/Wait"


def _local(service: Service) -> LocalCalls:
    assert service.gateway is not None and service.gateway.backend is not None
    local = service.gateway.backend.local
    assert isinstance(local, LocalCalls)
    return local


def _waiting_handler(started: asyncio.Event, ended: list[str]) -> Any:
    async def wait(request: bytes, context: Any) -> AsyncIterator[bytes]:
        try:
            yield b"first"
            started.set()
            await asyncio.Event().wait()  # until cancelled
            yield b"never"
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise
        finally:
            ended.append("closed")

    return grpc.unary_stream_rpc_method_handler(
        wait, request_deserializer=bytes, response_serializer=bytes
    )


async def test_a_warm_variant_is_read_without_a_task(service: Service) -> None:
    ref = await put_ref(service, encode(quadrant_image(64, 48), "PNG"), width=64, height=48)
    request = artifact_service_pb2.GetVariantRequest(name=ref.name, spec="width=16")
    call = _local(service).unary_stream(
        "/imagetasks.v1.ArtifactService/GetVariant",
        artifact_service_pb2.GetVariantRequest.SerializeToString,
        artifact_service_pb2.GetVariantResponse.FromString,
    )
    assert call is not None

    async def read_all() -> list[Any]:
        got = []
        one = call(request, metadata=(("x-request-id", "warm-1"),))
        while (msg := await one.read()) is not grpc.aio.EOF:
            got.append(msg)
        assert one.done()
        return got

    cold = await read_all()  # renders (a task of the variant cache's own)
    loop = asyncio.get_running_loop()
    made: list[Any] = []
    default = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        made.append(coro)
        if default is not None:
            return default(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    request_id_var.set("the-readers")
    loop.set_task_factory(counting)
    try:
        warm = await read_all()
    finally:
        loop.set_task_factory(default)
    assert [m.WhichOneof("payload") for m in warm] == ["info", "chunk"]
    assert warm == cold
    assert made == []  # no task per read, none to close the call
    assert request_id_var.get() == "the-readers"  # the handler's context stayed its own
    assert _local(service).interceptor.active_streams == 0


async def test_a_cancelled_reader_cancels_the_waiting_handler(service: Service) -> None:
    local = _local(service)
    started, ended = asyncio.Event(), list[str]()
    local.add(_WAIT, _waiting_handler(started, ended))
    made = local.unary_stream(_WAIT, bytes, bytes)
    assert made is not None
    call = made(b"", metadata=())

    async def reader() -> None:
        assert await call.read() == b"first"
        await call.read()

    task = asyncio.create_task(reader())
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.sleep(0.01)
    assert local.interceptor.active_streams == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ended == ["cancelled", "closed"]
    assert call.done() and await call.read() is grpc.aio.EOF
    assert local.interceptor.active_streams == 0


async def test_cancel_from_another_task_ends_a_read_in_progress(service: Service) -> None:
    local = _local(service)
    started, ended = asyncio.Event(), list[str]()
    local.add(_WAIT, _waiting_handler(started, ended))
    made = local.unary_stream(_WAIT, bytes, bytes)
    assert made is not None
    call = made(b"", metadata=())
    outcome: list[str] = []

    async def reader() -> None:
        assert await call.read() == b"first"
        try:
            await call.read()
        except asyncio.CancelledError:
            outcome.append("read cancelled")  # as grpc's read of a cancelled call
            raise

    task = asyncio.create_task(reader())
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.sleep(0.01)
    assert call.cancel() is True
    assert call.cancel() is False  # once
    with pytest.raises(asyncio.CancelledError):
        await task
    assert outcome == ["read cancelled"]
    assert ended == ["cancelled", "closed"]
    assert local.interceptor.active_streams == 0


async def test_a_call_cancelled_between_reads_closes_its_handler(service: Service) -> None:
    local = _local(service)
    started, ended = asyncio.Event(), list[str]()
    local.add(_WAIT, _waiting_handler(started, ended))
    made = local.unary_stream(_WAIT, bytes, bytes)
    assert made is not None
    call = made(b"", metadata=())
    assert await call.read() == b"first"
    assert local.interceptor.active_streams == 1
    assert call.cancel() is True
    async with asyncio.timeout(10):  # closed in the background, as before
        while local.interceptor.active_streams:
            await asyncio.sleep(0.01)
    assert ended == ["closed"]
    assert await call.read() is grpc.aio.EOF


async def test_a_read_closed_while_it_waits_ends_the_handler(service: Service) -> None:
    """A reader destroyed while pending (its coroutine closed, not cancelled) still ends the
    handler at once: its cleanup runs and its stream slot is given back."""
    local = _local(service)
    started, ended = asyncio.Event(), list[str]()
    local.add(_WAIT, _waiting_handler(started, ended))
    made = local.unary_stream(_WAIT, bytes, bytes)
    assert made is not None
    call = made(b"", metadata=())
    assert await call.read() == b"first"
    reading = call.read()
    reading.send(None)  # runs the handler to its wait, as a task's first step would
    assert started.is_set() and local.interceptor.active_streams == 1
    reading.close()
    assert ended == ["cancelled", "closed"]
    assert local.interceptor.active_streams == 0
