"""Slow, stalled and lying HTTP clients, over raw sockets: unfinished heads are closed, stalled
bodies answer 408 and close, a ``Content-Length`` that lies is answered, a huge one is refused
and the socket closed at once; nothing is left in the spool."""

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
