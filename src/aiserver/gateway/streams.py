"""Server-streaming responses: newline-delimited JSON, or Server-Sent Events.

The first message (or the call's error) is read before anything is sent, so that a call that
fails at once (NOT_FOUND, INVALID_ARGUMENT) still gets its HTTP status and ``responseStatus``
body. After that the status is 200; an error that ends the stream later is sent in band: an
NDJSON line ``{"responseStatus": {...}}``, or an SSE event named ``error`` with that data.

SSE framing (https://html.spec.whatwg.org/multipage/server-sent-events.html): for streams of
``JobEvent`` (WatchJob, the generative calls) each event is ``event: <oneof kind>``
(``accepted``, ``progress``, ``output``, ``text_output``, ``retrying``, ``finished``),
``id: <sequence>`` and ``data: <the JobEvent in JSON>``; a reconnecting client's
``Last-Event-ID`` skips the replayed events it has already seen. Other streams name each event
after the message's set oneof field (``info``, ``chunk``), or ``message``. A comment line is
sent when the stream has been quiet for ``keepalive_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import descriptor, json_format
from google.protobuf.message import Message

from aiserver.gateway.errors import FieldName, GatewayError, from_rpc_error
from aiserver.gateway.routes import JOB_EVENT

__all__ = [
    "NDJSON",
    "SSE",
    "event_field",
    "first_message",
    "message_json",
    "sse_frame",
    "stream_response",
    "wants_sse",
]

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
_END = object()


def message_json(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg)


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def wants_sse(request: web.BaseRequest, *, default: bool = False) -> bool:
    accept = request.headers.get("Accept", "")
    if SSE in accept:
        return True
    if NDJSON in accept or "application/json" in accept:
        return False
    return default


def event_field(desc: descriptor.Descriptor) -> descriptor.FieldDescriptor | None:
    """The ``event`` field when a response message is a JobEvent envelope."""
    f = desc.fields_by_name.get("event")
    if f is not None and f.message_type is not None and f.message_type.full_name == JOB_EVENT:
        return f
    return None


def sse_frame(data: str, *, event: str | None = None, event_id: str | None = None) -> bytes:
    lines = []
    if event:
        lines.append(f"event: {event}")
    if event_id:
        lines.append(f"id: {event_id}")
    lines.extend(f"data: {line}" for line in data.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


async def first_message(call: Any, *, field_name: FieldName = lambda f: f) -> Any:
    """The first response (None for an empty stream); a failed call raises GatewayError."""
    try:
        msg = await call.read()
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err, field_name=field_name) from None
    return None if msg is grpc.aio.EOF else msg


def _last_event_id(request: web.BaseRequest) -> int | None:
    raw = request.headers.get("Last-Event-ID", "").strip()
    return int(raw) if raw.isdigit() else None


async def stream_response(
    request: web.Request,
    call: Any,
    *,
    sse: bool,
    keepalive_s: float,
    field_name: FieldName = lambda f: f,
    headers: dict[str, str] | None = None,
) -> web.StreamResponse:
    """Relay a server stream; the caller has not read from ``call`` yet."""
    first = await first_message(call, field_name=field_name)
    last_id = _last_event_id(request) if sse else None
    response = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": f"{SSE}; charset=utf-8" if sse else f"{NDJSON}; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **(headers or {}),
        },
    )
    await response.prepare(request)
    if first is None:
        await response.write_eof()
        return response
    render = _renderer(first.DESCRIPTOR, sse=sse, last_id=last_id)
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=16)
    pump = asyncio.create_task(_pump(call, queue))
    try:
        frame = render(first)
        if frame:
            await response.write(frame)
        while True:
            try:
                async with asyncio.timeout(keepalive_s if sse else None):
                    item = await queue.get()
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if item is _END:
                break
            if isinstance(item, grpc.aio.AioRpcError | GatewayError):
                err = (
                    item
                    if isinstance(item, GatewayError)
                    else from_rpc_error(item, field_name=field_name)
                )
                await response.write(_error_frame(err, sse=sse))
                break
            frame = render(item)
            if frame:
                await response.write(frame)
        await response.write_eof()
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        if not call.done():
            call.cancel()
    return response


def _error_frame(err: GatewayError, *, sse: bool) -> bytes:
    data = dumps(err.body())
    return sse_frame(data, event="error") if sse else (data + "\n").encode()


_STOPPING = GatewayError(503, "GATEWAY_STOPPING", "the gateway is shutting down")


async def _pump(call: Any, queue: asyncio.Queue[Any]) -> None:
    try:
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                break
            await queue.put(msg)
    except grpc.aio.AioRpcError as err:
        await queue.put(err)
        return
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the pump itself is being stopped
        # The call was cancelled under us (the gateway is stopping): say so, in band.
        await queue.put(_STOPPING)
        return
    await queue.put(_END)


def _renderer(desc: Any, *, sse: bool, last_id: int | None) -> Callable[[Message], bytes]:
    envelope = event_field(desc)
    oneofs = list(desc.oneofs)

    def render(msg: Message) -> bytes:
        if envelope is not None:
            event = getattr(msg, envelope.name)
            if not sse:
                return (dumps(message_json(msg)) + "\n").encode()
            if last_id is not None and event.sequence <= last_id:
                return b""
            return sse_frame(
                dumps(message_json(event)),
                event=event.WhichOneof("kind") or "message",
                event_id=str(event.sequence) if event.sequence else None,
            )
        if not sse:
            return (dumps(message_json(msg)) + "\n").encode()
        kind = next((k for o in oneofs if (k := msg.WhichOneof(o.name))), None)
        return sse_frame(dumps(message_json(msg)), event=kind or "message")

    return render
