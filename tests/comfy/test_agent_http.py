"""The agent's HTTP/1.1 exchange against a real server on loopback that answers as scripted:
body framings, kept-alive connections, a connection the agent closed, timeouts, big bodies."""

from __future__ import annotations

import asyncio
import datetime
import gc
import ipaddress
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from aiserver.providers.comfy import agent_http
from aiserver.providers.comfy.agent_http import AgentHttp, ConnectFailed, ExchangeFailed
from aiserver.providers.comfy.client import ComfyClient
from aiserver.providers.failures import Cause, ProviderUnavailable


@dataclass
class Request:
    head: str
    body: bytes

    @property
    def line(self) -> str:
        return self.head.split("\r\n", 1)[0]

    def header(self, name: str) -> str | None:
        for line in self.head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


Answer = Callable[[Request], bytes | None]
"""The bytes to answer a request with; None: close the connection without answering."""


@dataclass
class Scripted:
    """An HTTP server that answers each request with ``answer(request)``; an HTTP/1.0 answer
    is followed by the close that ends its body."""

    answer: Answer
    url: str = ""
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    piece: int = 0
    """If set, answers are written this many bytes at a time, each after a pause."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                request = Request(head, b"")
                request.body = await reader.readexactly(int(request.header("content-length") or 0))
                self.requests.append(request)
                reply = self.answer(request)
                if reply is None:
                    break
                for start in range(0, len(reply), self.piece or len(reply)):
                    if self.piece:
                        await asyncio.sleep(0.002)  # each piece its own segment and read
                    writer.write(reply[start : start + (self.piece or len(reply))])
                    await writer.drain()
                if reply.startswith(b"HTTP/1.0"):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def drop_connections(self) -> None:
        """Close every connection (as a server does after its keep-alive timeout)."""
        for writer in self.writers:
            writer.close()


@asynccontextmanager
async def serving(answer: Answer) -> AsyncIterator[Scripted]:
    scripted = Scripted(answer)
    server = await asyncio.start_server(scripted.serve, "127.0.0.1", 0)
    scripted.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/base"
    try:
        yield scripted
    finally:
        server.close()
        scripted.drop_connections()


def ok(body: bytes = b'{"ok": true}', *extra: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in extra)
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{head}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def http(url: str, *, request_s: float = 5.0) -> AgentHttp:
    return AgentHttp(url, headers={"Authorization": "Bearer k"}, connect_s=2.0, request_s=request_s)


async def test_requests_share_one_kept_alive_connection() -> None:
    async with serving(lambda r: ok()) as server:
        agent = http(server.url)
        try:
            for _ in range(3):
                answer = await agent.request("GET", "/system_stats")
                assert (answer.status, answer.body) == (200, b'{"ok": true}')
            posted = await agent.request(
                "POST", "/prompt", body=b'{"a": 1}', content_type="application/json"
            )
            assert posted.headers["content-type"] == "application/json"
        finally:
            await agent.close()
    assert server.connections == 1
    first, *_, last = server.requests
    assert first.line == "GET /base/system_stats HTTP/1.1"
    assert first.header("authorization") == "Bearer k"
    assert first.header("host") == server.url.removeprefix("http://").removesuffix("/base")
    assert (last.line, last.body) == ("POST /base/prompt HTTP/1.1", b'{"a": 1}')
    assert last.header("content-type") == "application/json"


async def test_queries_are_percent_encoded() -> None:
    async with serving(lambda r: ok()) as server:
        agent = http(server.url)
        try:
            query = {"filename": "a b&c.png", "subfolder": "", "type": "output"}
            await agent.request("GET", "/view", query=query)
        finally:
            await agent.close()
    assert server.requests[0].line == (
        "GET /base/view?filename=a%20b%26c.png&subfolder=&type=output HTTP/1.1"
    )


async def test_chunked_and_close_delimited_bodies_are_read_whole() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    async with serving(lambda r: chunked) as server:
        agent = http(server.url)
        try:
            for _ in range(2):  # the connection stays usable after a chunked answer
                assert (await agent.request("GET", "/history")).body == b"hello, world"
        finally:
            await agent.close()
    assert server.connections == 1

    png = b"\x89PNG" * 1000
    until_close = b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n\r\n" + png
    async with serving(lambda r: until_close) as server:
        agent = http(server.url)
        try:
            for _ in range(2):
                answer = await agent.request("GET", "/view")
                assert (answer.body, answer.headers["content-type"]) == (png, "image/png")
        finally:
            await agent.close()
    assert server.connections == 2  # the body ended with its connection: not reused


async def test_an_answer_in_many_tiny_reads_and_after_an_interim_one() -> None:
    chunked = (
        b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Head:  h \t\r\n\r\n"
        b"5\r\nhello\r\n7\r\n, world\r\n0\r\nX-Head: trailer\r\n\r\n"
    )
    async with serving(lambda r: chunked if "chunked" in r.line else ok()) as server:
        server.piece = 3
        agent = http(server.url)
        try:
            for path in ("/chunked", "/length", "/chunked"):
                answer = await agent.request("GET", path)
                assert answer.status == 200
                if path == "/chunked":
                    assert answer.body == b"hello, world"
                    # The interim answer's headers and the trailers are not the answer's.
                    assert answer.headers["x-head"] == "h" and "x-interim" not in answer.headers
                else:
                    assert answer.body == b'{"ok": true}'
        finally:
            await agent.close()
    assert server.connections == 1


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        # The chunk's data is not followed by CRLF: its size lied.
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
            "malformed",
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n", "malformed"),
        # Two framings (a response-splitting vector): which one the agent meant is unknown.
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n",
            "not an HTTP answer",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello, ",
            "not an HTTP answer",
        ),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 0\r\n\r\n", "not an HTTP answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: five\r\n\r\nhello", "not an HTTP answer"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000, "head is too long"),
    ],
    ids=[
        "chunk-overrun",
        "chunk-size",
        "length-and-chunked",
        "two-lengths",
        "no-colon",
        "bad-length",
        "long-head",
    ],
)
async def test_malformed_answers_fail_the_exchange_and_drop_the_connection(
    reply: bytes, error: str
) -> None:
    async with serving(lambda r: ok() if "fine" in r.line else reply) as server:
        agent = http(server.url)
        try:
            with pytest.raises(ExchangeFailed, match=error):
                await agent.request("POST", "/prompt", body=b"{}")
            assert (await agent.request("GET", "/fine")).status == 200
        finally:
            await agent.close()
    assert server.connections == 2  # the broken stream was not reused


async def test_a_get_on_a_connection_the_agent_closed_is_sent_again() -> None:
    async with serving(lambda r: ok()) as server:
        agent = http(server.url)
        try:
            await agent.request("GET", "/queue")
            server.drop_connections()
            await asyncio.sleep(0.05)  # the close reached us: the idle connection is not reused
            await agent.request("GET", "/queue")
            assert server.connections == 2
            # Closed without a word while the request was on its way: a GET goes again ...
            answers = iter([None, ok()])
            server.answer = lambda r: next(answers)
            assert (await agent.request("GET", "/history/p")).status == 200
            assert server.connections == 3
            # ... a POST never (the agent may have queued it).
            answers = iter([None])
            with pytest.raises(ExchangeFailed):
                await agent.request("POST", "/prompt", body=b"{}")
            assert [r.line.split()[0] for r in server.requests[-3:]] == ["GET", "GET", "POST"]
        finally:
            await agent.close()


async def test_a_slow_answer_times_out_and_its_connection_is_dropped() -> None:
    def answer(request: Request) -> bytes:
        # The slow one announces 10 bytes and sends none.
        return ok() if "fast" in request.line else b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"

    async with serving(answer) as server:
        agent = http(server.url, request_s=0.2)
        try:
            with pytest.raises(TimeoutError):
                await agent.request("GET", "/slow")
            assert (await agent.request("GET", "/fast")).status == 200
        finally:
            await agent.close()
    assert server.connections == 2  # the timed-out exchange's connection was not reused


async def test_a_big_body_arrives_whole() -> None:
    body = bytes(range(256)) * 20_000  # 5 MB: written in pieces, each once the socket took one
    async with serving(lambda r: ok(str(len(r.body)).encode())) as server:
        agent = http(server.url)
        try:
            answer = await agent.request("POST", "/upload/image", body=body)
        finally:
            await agent.close()
    assert answer.body == str(len(body)).encode()
    assert server.requests[0].body == body


async def test_a_big_answer_arrives_whole() -> None:
    body = bytes(range(256)) * 8_000  # 2 MB: many reads, the first one with the head
    async with serving(lambda r: ok(body)) as server:
        agent = http(server.url)
        try:
            for _ in range(2):
                assert (await agent.request("GET", "/view")).body == body
        finally:
            await agent.close()
    assert server.connections == 1


async def test_a_refused_connection_a_bad_url_and_a_non_http_answer() -> None:
    agent = http("http://127.0.0.1:9")
    with pytest.raises(ConnectFailed, match="ConnectionRefusedError"):
        await agent.request("GET", "/system_stats")
    await agent.close()
    agent = http("http://127.0.0.1:99999")  # the agent is unreachable, not the service broken
    with pytest.raises(ConnectFailed, match="99999"):
        await agent.request("GET", "/system_stats")
    await agent.close()
    async with serving(lambda r: b"SSH-2.0-OpenSSH\r\n\r\n") as server:
        agent = http(server.url)
        try:
            with pytest.raises(ExchangeFailed, match="not an HTTP answer"):
                await agent.request("GET", "/system_stats")
        finally:
            await agent.close()


async def test_the_client_maps_exchange_failures_to_connection_causes() -> None:
    async with serving(lambda r: None) as server:  # closes without answering
        client = ComfyClient("agent-a", server.url)
        try:
            with pytest.raises(ProviderUnavailable) as caught:
                await client.system_stats()
        finally:
            await client.aclose()
    assert caught.value.cause is Cause.CONNECTION and caught.value.agent_lost
    assert "GET /system_stats failed: the agent closed the connection" in caught.value.message
    refused = ComfyClient("agent-a", "http://127.0.0.1:9")
    try:
        with pytest.raises(ProviderUnavailable) as caught:
            await refused.object_info()
    finally:
        await refused.aclose()
    assert caught.value.cause is Cause.CONNECTION
    assert "GET /object_info connection failed: ConnectionRefusedError" in caught.value.message


def certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 that it signed: (ca.pem, cert.pem, key.pem)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(common: str) -> Any:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test ca"))
        .issuer_name(name("test ca"))
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("agent"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


async def test_https_verifies_the_agents_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = certificates(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    scripted = Scripted(lambda r: ok())
    server = await asyncio.start_server(scripted.serve, "127.0.0.1", 0, ssl=context)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        untrusted = http(url)
        with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.request("GET", "/system_stats")
        await untrusted.close()
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the default context's trust store
        trusted = http(url)
        try:
            assert (await trusted.request("GET", "/system_stats")).status == 200
        finally:
            await trusted.close()
    finally:
        server.close()
        scripted.drop_connections()
    assert scripted.requests[0].header("host") == url.removeprefix("https://")


async def test_a_host_the_resolver_cannot_encode_is_a_failed_connect() -> None:
    # A label over 63 characters passes URL parsing; IDNA refuses it with a ValueError, which
    # must be a failed connect (a probe loop only survives the client's own failures).
    agent = http(f"http://{'a' * 64}.example:8188")
    try:
        with pytest.raises(ConnectFailed, match=r"idna|label"):
            await agent.request("GET", "/system_stats")
    finally:
        await agent.close()


async def test_a_close_delimited_body_cut_by_a_reset_fails() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # a reset, not the close that ends such a body

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    agent = http(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        with pytest.raises(ExchangeFailed):
            await agent.request("GET", "/view")
    finally:
        await agent.close()
        server.close()


async def test_a_timeout_while_the_body_is_written_leaves_no_unretrieved_error() -> None:
    # The agent takes the connection and reads nothing: the 8 MB body never fits, the
    # deadline fails the exchange while it waits to write; nothing may be left unretrieved.
    held: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    agent = http(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", request_s=0.3)
    try:
        with pytest.raises(TimeoutError):
            await agent.request("POST", "/upload/image", body=b"\0" * 8_000_000)
        await asyncio.sleep(0.05)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
        await agent.close()
        for writer in held:
            writer.close()
        server.close()
    assert unhandled == []


async def test_idle_connections_past_their_age_are_closed_under_the_newest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(agent_http, "IDLE_REUSE_S", 0.5)
    async with serving(lambda r: ok()) as server:
        agent = http(server.url)
        try:
            await asyncio.gather(*(agent.request("GET", "/a") for _ in range(2)))
            assert len(agent._open) == 2
            await asyncio.sleep(0.3)
            await agent.request("GET", "/b")  # the newest idle one, reused
            await asyncio.sleep(0.3)  # the other has been idle 0.6 s now
            await agent.request("GET", "/c")
            assert len(agent._open) == 1
        finally:
            await agent.close()
