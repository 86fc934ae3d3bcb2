"""A small HTTP/1.1 server on asyncio streams, with websocket upgrades on the same port.

ComfyUI serves HTTP and ``/ws`` on one port (aiohttp). ``websockets.serve`` cannot read request
bodies, so HTTP is parsed here and an upgrade request is handed to the sans-I/O
``websockets.server.ServerProtocol``, which does the handshake and framing.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.frames import Frame, Opcode
from websockets.http11 import Request as WsRequest
from websockets.server import ServerProtocol

__all__ = [
    "HttpRequest",
    "HttpResponse",
    "HttpServer",
    "Multipart",
    "WsPeer",
    "parse_multipart",
]

_MAX_HEAD = 64 * 1024


@dataclass(slots=True)
class HttpRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    """Lower-case names."""
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(slots=True)
class HttpResponse:
    status: int = 200
    body: bytes = b""
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, value: Any, status: int = 200) -> HttpResponse:
        return cls(status, json.dumps(value).encode(), "application/json; charset=utf-8")

    @classmethod
    def text(cls, text: str, status: int) -> HttpResponse:
        return cls(status, text.encode(), "text/plain; charset=utf-8")


class WsPeer:
    """One accepted websocket: send JSON/binary frames, drop the connection abruptly."""

    def __init__(self, sid: str, protocol: ServerProtocol, writer: asyncio.StreamWriter) -> None:
        self.sid = sid
        self.protocol = protocol
        self.writer = writer
        self.feature_flags: dict[str, Any] = {}
        self.received_first = False

    def send_json(self, event: str, data: Any) -> None:
        self._flush(
            lambda: self.protocol.send_text(json.dumps({"type": event, "data": data}).encode())
        )

    def send_binary(self, payload: bytes) -> None:
        self._flush(lambda: self.protocol.send_binary(payload))

    def _flush(self, action: Callable[[], None]) -> None:
        if self.writer.is_closing():
            return
        try:
            action()
        except Exception:
            return
        for chunk in self.protocol.data_to_send():
            if chunk:
                self.writer.write(chunk)

    def abort(self) -> None:
        """Drop the TCP connection without a close frame (a crash or network cut)."""
        self.writer.transport.abort()


HttpHandler = Callable[[HttpRequest], Awaitable[HttpResponse]]


class HttpServer:
    """Serves ``handler`` for HTTP and ``on_ws`` for upgrades to ``ws_paths``."""

    def __init__(
        self,
        handler: HttpHandler,
        on_ws: Callable[[HttpRequest, WsPeer], Awaitable[None]],
        on_ws_frame: Callable[[WsPeer, str], Awaitable[None]],
        on_ws_close: Callable[[WsPeer], None],
        ws_paths: tuple[str, ...] = ("/ws", "/api/ws"),
        ws_gate: Callable[[HttpRequest], int | None] = lambda request: None,
    ) -> None:
        self._handler = handler
        self._on_ws = on_ws
        self._on_ws_frame = on_ws_frame
        self._on_ws_close = on_ws_close
        self._ws_paths = ws_paths
        self._ws_gate = ws_gate
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = await asyncio.start_server(self._connection, host, port, limit=_MAX_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self, *, abort: bool = False) -> None:
        """Stop listening; ``abort`` cuts every open connection (a killed process)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            if abort:
                writer.transport.abort()
            else:
                writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            # Only close() cancels these; ending normally keeps asyncio's stream callback from
            # calling task.exception() on a cancelled task (3.11 logs that as an error).
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            request = _parse_head(head)
            if request is None:
                writer.write(_serialize(HttpResponse.text("bad request", 400), keep_alive=False))
                return
            upgrade = request.headers.get("upgrade", "").lower() == "websocket"
            if upgrade and request.path in self._ws_paths:
                await self._websocket(reader, writer, head, request)
                return
            request.body = await _read_body(reader, request.headers)
            response = await self._handler(request)
            keep_alive = request.headers.get("connection", "").lower() != "close"
            writer.write(_serialize(response, keep_alive=keep_alive))
            await writer.drain()
            if not keep_alive:
                return

    async def _websocket(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        head: bytes,
        request: HttpRequest,
    ) -> None:
        protocol = ServerProtocol(max_size=64 * 1024 * 1024)
        protocol.receive_data(head)
        events = protocol.events_received()
        if not events or not isinstance(events[0], WsRequest):
            return
        refused = self._ws_gate(request)
        if refused is not None:
            response = protocol.reject(refused, "unavailable\n")
        else:
            response = protocol.accept(events[0])
        protocol.send_response(response)
        for chunk in protocol.data_to_send():
            writer.write(chunk)
        await writer.drain()
        if response.status_code != 101:
            return
        peer = WsPeer(request.query.get("clientId", ""), protocol, writer)
        try:
            await self._on_ws(request, peer)
            while True:
                data = await reader.read(65536)
                if not data:
                    protocol.receive_eof()
                    break
                protocol.receive_data(data)
                for event in protocol.events_received():
                    if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                        await self._on_ws_frame(peer, bytes(event.data).decode("utf-8", "replace"))
                for chunk in protocol.data_to_send():
                    if chunk:
                        writer.write(chunk)
                if protocol.close_expected():
                    break
        finally:
            self._on_ws_close(peer)


def _parse_head(head: bytes) -> HttpRequest | None:
    try:
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
    except ValueError:
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    parts = urlsplit(target)
    query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    return HttpRequest(method.upper(), unquote(parts.path), query, headers)


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
    length = int(headers.get("content-length", "0") or 0)
    return await reader.readexactly(length) if length else b""


def _serialize(response: HttpResponse, *, keep_alive: bool) -> bytes:
    reason = http.HTTPStatus(response.status).phrase
    lines = [f"HTTP/1.1 {response.status} {reason}"]
    headers = dict(response.headers)
    if response.content_type:
        headers["Content-Type"] = response.content_type
    headers["Content-Length"] = str(len(response.body))
    headers["Connection"] = "keep-alive" if keep_alive else "close"
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body


@dataclass(slots=True)
class Multipart:
    fields: dict[str, str]
    files: dict[str, tuple[str, bytes]]
    """Field name -> (file name, bytes)."""


def parse_multipart(request: HttpRequest) -> Multipart:
    """``multipart/form-data`` (what aiohttp's ``request.post()`` reads)."""
    content_type = request.headers.get("content-type", "")
    boundary = ""
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    result = Multipart({}, {})
    if not boundary:
        return result
    delimiter = b"--" + boundary.encode()
    for raw in request.body.split(delimiter)[1:]:
        if raw.startswith(b"--"):
            break
        raw_headers, _, data = raw.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        data = data.removesuffix(b"\r\n")
        disposition = ""
        for line in raw_headers.decode("utf-8", "replace").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-disposition":
                disposition = value
        params: dict[str, str] = {}
        for item in disposition.split(";")[1:]:
            key, _, value = item.strip().partition("=")
            params[key.lower()] = value.strip().strip('"')
        name = params.get("name", "")
        if "filename" in params:
            result.files[name] = (params["filename"], data)
        else:
            result.fields[name] = data.decode("utf-8", "replace")
    return result
