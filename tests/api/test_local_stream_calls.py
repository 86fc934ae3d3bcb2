"""The in-process shim's server-streaming calls (``aiserver.api.local_calls``): the handler's
steps run in the reading task, in the call's own context. A warm variant is read without a
task; a handler that waits is cancelled with its reader, or by ``cancel()`` from another
task, and its stream slot is given back; its context variables never reach the reader."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
from imagetasks.v1 import artifact_service_pb2

from aiserver.api import local_calls
from aiserver.api.local_calls import LocalCalls
from aiserver.gateway import streams
from aiserver.gateway.errors import GatewayError
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

    return _handler(wait)


def _cancelled_here() -> tuple[str, int]:
    """In a reader that caught CancelledError: the cancellations its own task still has (0:
    the call was cancelled, not the reading task)."""
    task = asyncio.current_task()
    assert task is not None
    return ("cancelled", task.cancelling())


def _handler(fn: Any) -> Any:
    return grpc.unary_stream_rpc_method_handler(
        fn, request_deserializer=bytes, response_serializer=bytes
    )


def _opener(local: LocalCalls, method: str, handler: Any) -> Any:
    """``handler`` served locally as ``method``: a function opening a call of it."""
    local.add(method, handler)
    made = local.unary_stream(method, bytes, bytes)
    assert made is not None
    return lambda: made(b"", metadata=())


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
    call = _opener(local, _WAIT, _waiting_handler(started, ended))()

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
    call = _opener(local, _WAIT, _waiting_handler(started, ended))()
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
    call = _opener(local, _WAIT, _waiting_handler(started, ended))()
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
    call = _opener(local, _WAIT, _waiting_handler(started, ended))()
    assert await call.read() == b"first"
    reading = call.read()
    reading.send(None)  # runs the handler to its wait, as a task's first step would
    assert started.is_set() and local.interceptor.active_streams == 1
    reading.close()
    assert ended == ["cancelled", "closed"]
    assert local.interceptor.active_streams == 0


async def _slots_freed(local: LocalCalls) -> None:
    async with asyncio.timeout(10):  # given back in the background
        while local.interceptor.active_streams:
            await asyncio.sleep(0.01)


async def test_a_read_closed_while_it_waits_finishes_a_cleanup_that_awaits(
    service: Service,
) -> None:
    """The handler's cleanup waits: it is finished by a task of its own (closing only what
    it awaited would leave its generator running, its stream slot held, for good)."""
    local = _local(service)
    started, ended = asyncio.Event(), list[str]()

    async def slow_cleanup(request: bytes, context: Any) -> AsyncIterator[bytes]:
        try:
            yield b"first"
            started.set()
            await asyncio.Event().wait()
        finally:
            ended.append("cleaning")
            await asyncio.sleep(0.01)
            ended.append("cleaned")

    call = _opener(local, "/test.Local/SlowCleanup", _handler(slow_cleanup))()
    assert await call.read() == b"first"
    reading = call.read()
    reading.send(None)
    assert started.is_set() and local.interceptor.active_streams == 1
    reading.close()
    assert call.done()
    await _slots_freed(local)
    assert ended == ["cleaning", "cleaned"]
    assert await call.read() is grpc.aio.EOF
    assert call.cancel() is False


async def test_a_read_closed_while_it_waits_closes_a_handler_that_goes_on(
    service: Service,
) -> None:
    local = _local(service)
    started, ended = asyncio.Event(), list[str]()

    async def goes_on(request: bytes, context: Any) -> AsyncIterator[bytes]:
        try:
            yield b"first"
            started.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
            yield b"after"
            await asyncio.Event().wait()
        finally:
            ended.append("closed")

    call = _opener(local, "/test.Local/GoesOn", _handler(goes_on))()
    assert await call.read() == b"first"
    reading = call.read()
    reading.send(None)
    reading.close()
    await _slots_freed(local)
    assert ended == ["closed"]
    assert await call.read() is grpc.aio.EOF


async def test_cancel_during_a_read_ends_it_even_if_the_handler_goes_on(
    service: Service,
) -> None:
    """The handler swallows the cancellation and yields again: the read raises
    CancelledError all the same (cancel() said True), and the handler is closed."""
    local = _local(service)
    started, ended = asyncio.Event(), list[str]()

    async def swallows(request: bytes, context: Any) -> AsyncIterator[bytes]:
        try:
            yield b"first"
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                ended.append("swallowed")
            yield b"after-cancel"
            await asyncio.Event().wait()
        finally:
            ended.append("closed")

    call = _opener(local, "/test.Local/Swallows", _handler(swallows))()
    outcome: list[Any] = []

    async def reader() -> None:
        assert await call.read() == b"first"
        try:
            outcome.append(await call.read())
        except asyncio.CancelledError:
            outcome.append(_cancelled_here())

    task = asyncio.create_task(reader())
    await asyncio.wait_for(started.wait(), 10)
    assert call.cancel() is True
    await task
    assert outcome == [("cancelled", 0)]  # the call's cancel, not the task's
    await _slots_freed(local)
    assert ended == ["swallowed", "closed"]
    assert await call.read() is grpc.aio.EOF


async def test_the_pump_tells_a_cancelled_call_from_its_own_stop(service: Service) -> None:
    """The gateway cancels long-lived calls when it stops: the pump, whose task runs the
    handler, says so in band (GATEWAY_STOPPING), as over the network; a pump that is
    itself stopped still just ends."""
    local = _local(service)
    started, ended = asyncio.Event(), list[str]()
    open_call = _opener(local, _WAIT, _waiting_handler(started, ended))
    call = open_call()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    pump = asyncio.create_task(streams._pump(call, queue))
    assert await asyncio.wait_for(queue.get(), 10) == b"first"
    await asyncio.wait_for(started.wait(), 10)
    assert call.cancel() is True
    await pump  # ends, not cancelled
    stopping = queue.get_nowait()
    assert isinstance(stopping, GatewayError) and stopping.error_code == "GATEWAY_STOPPING"
    await _slots_freed(local)

    started.clear()
    call = open_call()
    queue = asyncio.Queue()
    pump = asyncio.create_task(streams._pump(call, queue))
    assert await asyncio.wait_for(queue.get(), 10) == b"first"
    await asyncio.wait_for(started.wait(), 10)
    pump.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pump
    assert queue.empty()
    await _slots_freed(local)


async def test_the_guard_counts_a_local_stream(service: Service) -> None:
    """The guard's counts (streams in progress, bytes sent, calls by code) move as they did
    through prometheus_client's ``inc`` (the guard adds to the children's values directly)."""
    local = _local(service)
    registry = service.metrics.registry

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    started, ended = asyncio.Event(), list[str]()
    call = _opener(local, _WAIT, _waiting_handler(started, ended))()
    sent = sample("aiserver_sent_bytes_total", method="Local/Wait")
    assert await call.read() == b"first"
    assert sample("aiserver_active_streams") == 1
    assert sample("aiserver_sent_bytes_total", method="Local/Wait") == sent + len(b"first")
    reader = asyncio.ensure_future(call.read())
    await started.wait()
    reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reader
    assert ended == ["cancelled", "closed"]
    assert sample("aiserver_active_streams") == 0
    assert sample("aiserver_rpcs_total", method="Local/Wait", code="CANCELLED") == 1


def _variant_call(service: Service, name: str) -> Any:
    made = _local(service).unary_stream(
        "/imagetasks.v1.ArtifactService/GetVariant",
        artifact_service_pb2.GetVariantRequest.SerializeToString,
        artifact_service_pb2.GetVariantResponse.FromString,
    )
    assert made is not None
    request = artifact_service_pb2.GetVariantRequest(name=name, spec="width=16")
    return made(request, metadata=())


async def test_read_rest_returns_what_the_reads_would(service: Service) -> None:
    """``read_rest``: the messages left up to EOF, after a first read or from the start, the
    call done and its stream slot given back."""
    ref = await put_ref(service, encode(quadrant_image(64, 48), "PNG"), width=64, height=48)
    one = _variant_call(service, ref.name)
    read = []
    while (msg := await one.read()) is not grpc.aio.EOF:
        read.append(msg)
    assert [m.WhichOneof("payload") for m in read] == ["info", "chunk"]

    after_first = _variant_call(service, ref.name)
    assert await after_first.read() == read[0]
    assert await after_first.read_rest() == read[1:]
    assert after_first.done() and await after_first.read() is grpc.aio.EOF
    assert await after_first.read_rest() == []
    whole = _variant_call(service, ref.name)
    assert await whole.read_rest() == read
    assert whole.done()
    assert _local(service).interceptor.active_streams == 0


async def test_read_rest_raises_as_a_read(service: Service) -> None:
    """An abort and an unhandled error end ``read_rest`` with the status a read gets."""
    local = _local(service)

    async def aborts(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"first"
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not now")

    async def fails(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"first"
        raise KeyError("inner")

    for method, handler, code in (
        ("/test.Local/Aborts", aborts, grpc.StatusCode.FAILED_PRECONDITION),
        ("/test.Local/Fails", fails, grpc.StatusCode.UNKNOWN),
    ):
        call = _opener(local, method, _handler(handler))()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read_rest()
        assert err.value.code() == code
        assert call.done()
    assert local.interceptor.active_streams == 0


async def test_read_rest_of_an_empty_stream_is_empty(service: Service) -> None:
    """As a read returns EOF at once, ``read_rest`` from the start returns no message."""
    local = _local(service)

    async def empty(request: bytes, context: Any) -> AsyncIterator[bytes]:
        return
        yield b""

    opener = _opener(local, "/test.Local/Empty", _handler(empty))
    assert await opener().read() is grpc.aio.EOF
    assert await opener().read_rest() == []
    assert local.interceptor.active_streams == 0


async def test_read_rest_counts_the_bytes_sent_before_a_failure(service: Service) -> None:
    """What a failing handler yielded before it failed is counted as sent, as by reads."""
    local = _local(service)
    registry = service.metrics.registry
    labels = {"method": "Local/FailsLate"}

    def sent() -> float:
        return registry.get_sample_value("aiserver_sent_bytes_total", labels) or 0.0

    async def fails(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"first"
        yield b"second"
        raise KeyError("inner")

    opener = _opener(local, "/test.Local/FailsLate", _handler(fails))
    counts = []
    for how in ("read", "read_rest"):
        call, before = opener(), sent()
        with pytest.raises(grpc.aio.AioRpcError):
            if how == "read":
                while await call.read() is not grpc.aio.EOF:
                    pass
            else:
                await call.read_rest()
        counts.append(sent() - before)
    assert counts[0] > 0 and counts[1] == counts[0]


async def test_read_rest_stops_at_cancel_when_the_handler_goes_on(service: Service) -> None:
    """A handler that swallows the cancellation is not run on to its end: ``read_rest``
    stops at its next message, as a read does."""
    local = _local(service)
    steps: list[int] = []
    started = asyncio.Event()

    async def stubborn(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"first"
        started.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        for i in range(20):
            await asyncio.sleep(0.01)
            steps.append(i)
            yield b"x"

    call = _opener(local, "/test.Local/Stubborn", _handler(stubborn))()
    assert await call.read() == b"first"
    task = asyncio.create_task(call.read_rest())
    await asyncio.wait_for(started.wait(), 10)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(steps) <= 1
    await _slots_freed(local)


async def test_a_cancelled_read_rest_cancels_the_waiting_handler(service: Service) -> None:
    local = _local(service)
    started, ended = asyncio.Event(), list[str]()
    call = _opener(local, _WAIT, _waiting_handler(started, ended))()
    task = asyncio.create_task(call.read_rest())
    await asyncio.wait_for(started.wait(), 10)
    assert local.interceptor.active_streams == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ended == ["cancelled", "closed"]
    assert call.done() and await call.read() is grpc.aio.EOF
    assert local.interceptor.active_streams == 0


async def test_cancel_from_another_task_ends_read_rest(service: Service) -> None:
    """As a read: the handler is cancelled where it waits and ``read_rest`` raises
    CancelledError, the reading task itself not being cancelled."""
    local = _local(service)
    started, ended = asyncio.Event(), list[str]()
    call = _opener(local, _WAIT, _waiting_handler(started, ended))()
    outcome: list[Any] = []

    async def reader() -> None:
        try:
            outcome.append(await call.read_rest())
        except asyncio.CancelledError:
            outcome.append(_cancelled_here())

    task = asyncio.create_task(reader())
    await asyncio.wait_for(started.wait(), 10)
    assert call.cancel() is True
    await task
    assert outcome == [("cancelled", 0)]
    assert ended == ["cancelled", "closed"]
    await _slots_freed(local)


async def test_a_read_rest_closed_while_it_waits_ends_the_handler(service: Service) -> None:
    local = _local(service)
    started, ended = asyncio.Event(), list[str]()
    call = _opener(local, _WAIT, _waiting_handler(started, ended))()
    reading = call.read_rest()
    reading.send(None)  # the first message taken, the handler at its wait
    assert started.is_set() and local.interceptor.active_streams == 1
    reading.close()
    assert ended == ["cancelled", "closed"]
    assert call.done() and await call.read() is grpc.aio.EOF
    assert local.interceptor.active_streams == 0


async def test_the_shim_reads_a_warm_variant_in_two_steps(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over HTTP a warm variant is its info and then the rest in one step of the handler
    (three, one per read, before ``read_rest``): the same answer."""
    ref = await put_ref(service, encode(quadrant_image(64, 48), "PNG"), width=64, height=48)
    path = ref.name.removeprefix("artifacts/")
    steps: list[int] = []

    class Counted(local_calls._InContext):
        __slots__ = ()

        def __init__(self, *args: Any) -> None:
            steps.append(1)
            super().__init__(*args)

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http_port}") as http:
        cold = await http.get(f"/variants/width=16/{path}")
        assert cold.status_code == 200, cold.text
        monkeypatch.setattr(local_calls, "_InContext", Counted)
        warm = await http.get(f"/variants/width=16/{path}")
        assert warm.status_code == 200 and warm.content == cold.content
        assert warm.headers["etag"] == cold.headers["etag"]
        assert len(steps) == 2
        steps.clear()
        head = await http.head(f"/variants/width=16/{path}")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(cold.content))
        same = await http.get(
            f"/variants/width=16/{path}", headers={"If-None-Match": cold.headers["etag"]}
        )
        assert same.status_code == 304
        assert len(steps) == 2  # the info alone, each
    await _slots_freed(_local(service))
