"""Slow, stalled and lying HTTP clients, over raw sockets: unfinished heads are closed, stalled
bodies answer 408 and close, a ``Content-Length`` that lies is answered, a huge one is refused
and the socket closed at once; nothing is left in the spool. An answer of any kind whose client
stops reading is closed and its call ended; a slow client that keeps reading is not."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import socket
from typing import Any

import httpx
import pytest

from aiserver.gateway import Gateway
from aiserver.server import Service
from tests.support.artifacts import put_ref
from tests.support.images import encode, quadrant_image

HEAD_S = 0.6
IDLE_S = 0.5
BOUNDARY = "xyzzy"


@pytest.fixture
def png_bytes() -> bytes:
    return encode(quadrant_image(), "PNG")


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {
        "upload_idle_timeout_s": IDLE_S,
        "upload_timeout_s": 3.0,
        "http_header_timeout_s": HEAD_S,
        # More messages than a stream relay queues (16), so that a stalled one waits on them.
        "chunk_bytes": 64 << 10,
    }


@pytest.fixture
def gateway_overrides() -> dict[str, Any]:
    return {"body_idle_timeout_s": IDLE_S, "body_timeout_s": 3.0, "header_timeout_s": HEAD_S}


def _multipart(png: bytes) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="OutputFormat"\r\n\r\npng\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def _head(
    path: str, length: int, ctype: str = f"multipart/form-data; boundary={BOUNDARY}"
) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


async def _exchange(gw: Gateway, data: bytes, *, within: float) -> tuple[bytes, float]:
    """Send ``data``, then read until the server closes; (all read, seconds it took)."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    started = loop.time()
    try:
        writer.write(data)
        await writer.drain()
        received = await asyncio.wait_for(reader.read(-1), within)
    finally:
        writer.close()
    return received, loop.time() - started


def _status_and_body(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"POST /api/ConvertImage HTTP/1.1\r\n",
        b"POST /api/ConvertImage HTTP/1.1\r\nHost: x\r\nContent-",
    ],
    ids=["nothing", "request line", "half a header"],
)
async def test_an_unfinished_head_is_closed(gateway: Gateway, data: bytes) -> None:
    received, took = await _exchange(gateway, data, within=10)
    assert received == b""
    assert HEAD_S * 0.8 <= took < HEAD_S + 3


@pytest.mark.parametrize("sent", [0, 100, 4000])
@pytest.mark.parametrize("path", ["/api/ConvertImage", "/v1/images:convert"])
async def test_a_stalled_body_answers_408_and_closes(
    gateway: Gateway, service: Any, png_bytes: bytes, path: str, sent: int
) -> None:
    body = _multipart(png_bytes)
    received, took = await _exchange(
        gateway, _head(path, len(body) + 10_000) + body[:sent], within=10
    )
    status, doc = _status_and_body(received)
    assert status == 408
    assert doc["responseStatus"]["errorCode"] == "UPLOAD_STALLED"
    assert took < IDLE_S + 3
    await asyncio.sleep(0.3)
    assert not list(service.spool.tmp_dir.iterdir())


@pytest.mark.parametrize(
    ("path", "ctype", "partial"),
    [
        ("/v1/jobs/x:cancel", "application/json", b'{"na'),
        ("/v1/images:convert", "application/x-ndjson", b'{"params": {}}\n{"chu'),
        ("/api/GetArtifactGenerationStatus", "application/x-www-form-urlencoded", b"JobId="),
        ("/api/GetArtifactGenerationStatus", "application/json", b"{"),
    ],
)
async def test_a_stalled_json_or_form_body_answers_408(
    gateway: Gateway, path: str, ctype: str, partial: bytes
) -> None:
    received, took = await _exchange(gateway, _head(path, 5000, ctype) + partial, within=10)
    status, doc = _status_and_body(received)
    assert status == 408, received[:300]
    assert doc["responseStatus"]["errorCode"] == "UPLOAD_STALLED"
    assert took < IDLE_S + 3


async def test_a_content_length_longer_than_the_body_answers_408(
    gateway: Gateway, png_bytes: bytes
) -> None:
    body = _multipart(png_bytes)
    received, _ = await _exchange(
        gateway, _head("/api/ConvertImage", len(body) + 1) + body, within=10
    )
    assert _status_and_body(received)[0] == 408


async def test_a_content_length_shorter_than_the_body_is_answered(
    gateway: Gateway, png_bytes: bytes
) -> None:
    body = _multipart(png_bytes)
    received, _ = await _exchange(
        gateway, _head("/api/ConvertImage", len(body) - 40) + body, within=10
    )
    # The bytes past the declared length are a second request that cannot parse: 400 in the
    # JSON shape, quoting nothing, and the connection closes (``_exchange`` returns only then).
    status, doc = _status_and_body(received)
    assert status == 400
    assert doc["responseStatus"]["errorCode"] == "MALFORMED_REQUEST"
    assert b"IHDR" not in received


@pytest.mark.parametrize(
    "data",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS hello\r\n\r\n",
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n",
        b"POST /api/ConvertImage HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"POST /api/ConvertImage HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["bad header", "tls hello", "long line", "long header", "negative length", "bad chunk"],
)
async def test_requests_the_parser_refuses_answer_the_json_shape(
    gateway: Gateway, data: bytes
) -> None:
    received, _ = await _exchange(gateway, data, within=10)
    status, doc = _status_and_body(received)
    assert 400 <= status < 500, received[:300]
    assert set(doc["responseStatus"]) >= {"errorCode", "message", "errors"}


async def test_a_huge_content_length_is_refused_and_closed_at_once(gateway: Gateway) -> None:
    for path in ("/api/ConvertImage", "/v1/images:convert"):
        received, took = await _exchange(gateway, _head(path, 10**12) + b"--xyzzy\r\n", within=10)
        status, doc = _status_and_body(received)
        assert status == 413 and doc["responseStatus"]["errorCode"] == "UPLOAD_TOO_LARGE"
        assert took < 2.5


@pytest.mark.parametrize(
    ("path", "ctype", "body"),
    [
        ("/api/ConvertImage", f"multipart/form-data; boundary={BOUNDARY}", None),
        ("/v1/images:convert", "application/x-ndjson", b'{"params": {}}\n'),
        ("/v1/jobs/x:cancel", "application/json", b'{"name": "' + b"y" * 300 + b'"}'),
    ],
)
async def test_a_body_that_is_not_the_gzip_it_claims_is_400(
    gateway: Gateway, png_bytes: bytes, path: str, ctype: str, body: bytes | None
) -> None:
    payload = body if body is not None else _multipart(png_bytes)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
        for encoded in (b"\x1f\x8b\x08\x00\x00\x00not-deflate" * 9, gzip.compress(payload)[:-12]):
            res = await http.post(
                path, content=encoded, headers={"Content-Type": ctype, "Content-Encoding": "gzip"}
            )
            assert res.status_code == 400, (path, res.text)
            assert set(res.json()["responseStatus"]) >= {"errorCode", "message", "errors"}


@pytest.mark.parametrize("shim", ["gateway", "in-process"])
async def test_a_download_its_client_stopped_reading_is_closed_and_its_call_ended(
    service: Service, gateway: Gateway, shim: str
) -> None:
    # A large artifact and a client with a small receive buffer that reads the head and then
    # nothing: the server ends the call (its streaming slot, its open blob) within the idle
    # timeout, and closes the connection.
    assert service.gateway is not None and service.gateway.backend is not None
    guard = service.gateway.backend.local.interceptor  # the service's own: both shims count
    data = os.urandom(16 << 20)
    ref = await put_ref(service, data)
    port = gateway.port if shim == "gateway" else service.http_port
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, f"GET /{ref.name} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)
        assert head.startswith(b"HTTP/1.1 200")
        async with asyncio.timeout(10):
            while guard.active_streams == 0:
                await asyncio.sleep(0.01)
        stalled = loop.time()
        async with asyncio.timeout(10):  # without the timeout: forever
            while guard.active_streams:
                await asyncio.sleep(0.01)
        assert loop.time() - stalled < IDLE_S + 4.0
        received = len(head)
        with contextlib.suppress(ConnectionResetError):
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 10):
                received += len(chunk)
        assert received < len(data)  # closed before the end
    finally:
        sock.close()
    res = await _exchange(
        gateway, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", within=10
    )
    assert res[0].startswith(b"HTTP/1.1 200")


# --- answers whose client stops reading: one watch for every route class ------------------


async def _stalled_client(port: int, request: bytes) -> tuple[socket.socket, bytes]:
    """A client with a small receive buffer that sends ``request``, reads the first bytes of
    the answer and then nothing."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, request)
        head = await asyncio.wait_for(loop.sock_recv(sock, 4096), 30)
    except BaseException:
        sock.close()
        raise
    return sock, head


async def _read_to_close(sock: socket.socket) -> int:
    """Bytes read, past the idle bound, until the server closes (or resets) the connection:
    fewer than the answer's when it was closed for taking nothing."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(IDLE_S + 2.0)
    received = 0
    with contextlib.suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 10):
            received += len(chunk)
    return received


async def _assert_streams_end(guard: Any) -> None:
    """The answer's gRPC call (a streaming slot) ends within the idle bound."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(10):
        while guard.active_streams == 0:
            await asyncio.sleep(0.01)
    stalled = loop.time()
    async with asyncio.timeout(10):  # without the watch: forever
        while guard.active_streams:
            await asyncio.sleep(0.01)
    assert loop.time() - stalled < IDLE_S + 4.0


def _port(service: Service, gateway: Gateway, shim: str) -> int:
    return gateway.port if shim == "gateway" else service.http_port


def _guard(service: Service) -> Any:
    assert service.gateway is not None and service.gateway.backend is not None
    return service.gateway.backend.local.interceptor  # the service's own: both shims count


@pytest.mark.parametrize("accept", ["application/x-ndjson", "text/event-stream"])
@pytest.mark.parametrize("shim", ["gateway", "in-process"])
async def test_a_json_stream_its_client_stopped_reading_is_closed_and_its_call_ended(
    service: Service, gateway: Gateway, shim: str, accept: str
) -> None:
    # ``stream_response``: the NDJSON and SSE relay of every server stream (job events too).
    data = os.urandom(24 << 20)  # more than the relay's queue and the gRPC window hold
    ref = await put_ref(service, data)
    request = f"GET /v1/{ref.name}:read HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n"
    sock, head = await _stalled_client(_port(service, gateway, shim), request.encode())
    try:
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        await _assert_streams_end(_guard(service))
        assert len(head) + await _read_to_close(sock) < len(data)  # base64: 4/3 of it
    finally:
        sock.close()


@pytest.mark.parametrize("shim", ["gateway", "in-process"])
async def test_a_transformed_image_its_client_stopped_reading_is_closed_and_its_call_ended(
    service: Service, gateway: Gateway, shim: str
) -> None:
    # The AI Server shape (``/api/ConvertImage``): the result image's bytes, written raw.
    from PIL import Image

    noise = Image.frombytes("RGB", (1600, 1600), os.urandom(1600 * 1600 * 3))
    jpeg = encode(noise, "JPEG")  # small to send; ~7.7 MB as BMP
    body = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="OutputFormat"\r\n\r\nbmp\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + jpeg
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    port = _port(service, gateway, shim)
    sock, head = await _stalled_client(port, _head("/api/ConvertImage", len(body)) + body)
    try:
        assert head.startswith(b"HTTP/1.1 200"), head[:300]
        assert len(head) + await _read_to_close(sock) < 1600 * 1600 * 3
    finally:
        sock.close()


@pytest.mark.parametrize("shim", ["gateway", "in-process"])
async def test_a_whole_json_answer_its_client_stopped_reading_is_closed(
    service: Service, gateway: Gateway, shim: str
) -> None:
    # JSON answers aiohttp writes after the handler (here the OpenAPI document, as a large
    # listing would be): with nothing watching, ``drain`` waits as long as the socket is
    # open. Pipelined copies make more than what the kernel's buffers take.
    port = _port(service, gateway, shim)
    whole = await _exchange_port(port, b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
    body = len(whole.partition(b"\r\n\r\n")[2])
    copies = (4 << 20) // body
    request = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * copies
    sock, first = await _stalled_client(port, request)
    try:  # without the watch the server waits forever, then sends it all
        assert len(first) + await _read_to_close(sock) < body * copies
    finally:
        sock.close()


async def _exchange_port(port: int, request: bytes) -> bytes:
    """One answer read whole (``Connection: close``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
        return await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()


async def test_a_slow_client_that_keeps_reading_gets_the_whole_stream(
    service: Service, gateway: Gateway
) -> None:
    # Each read comes within the idle bound, though the whole takes many times it.
    data = os.urandom(1 << 20)
    ref = await put_ref(service, data)
    request = f"GET /v1/{ref.name}:read HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", gateway.port))
        await loop.sock_sendall(sock, (request + "Connection: close\r\n\r\n").encode())
        started, parts = loop.time(), []
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 10):
            parts.append(chunk)
            await asyncio.sleep(IDLE_S * 0.6)
        took = loop.time() - started
    finally:
        sock.close()
    raw = b"".join(parts)
    assert raw.endswith(b"\r\n0\r\n\r\n")  # the chunked body's end: nothing cut
    assert b"event: error" not in raw
    assert took > 3 * IDLE_S


@pytest.mark.parametrize("shim", ["gateway", "in-process"])
async def test_a_slow_steady_reader_with_the_kernels_buffers_is_not_cut(
    service: Service, gateway: Gateway, shim: str
) -> None:
    # Default (auto-sized, MBs) socket buffers: a client reading ~1 MB/s drains the server's
    # kernel send queue so slowly that the transport's own buffer stays full for longer than
    # the idle bound, though the client acknowledges bytes all along. Not a stalled client.
    data = os.urandom(8 << 20)
    ref = await put_ref(service, data)
    request = (
        f"GET /v1/{ref.name}:read HTTP/1.1\r\nHost: x\r\nAccept: application/x-ndjson\r\n"
        "Connection: close\r\n\r\n"
    )
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", _port(service, gateway, shim)))
        await loop.sock_sendall(sock, request.encode())
        parts = []
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 10):
            parts.append(chunk)
            await asyncio.sleep(IDLE_S / 10)
    finally:
        sock.close()
    raw = b"".join(parts)
    assert raw.endswith(b"\r\n0\r\n\r\n"), raw[-200:]  # the chunked body's end: nothing cut
    assert b'"error"' not in raw[-2000:]
