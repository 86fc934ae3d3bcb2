"""The read deadlines of a request body (``connections.BodyDeadline``), on aiohttp's own
payload reader."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import StreamReader
from aiohttp.base_protocol import BaseProtocol

from aiserver.gateway.connections import BodyDeadline
from aiserver.gateway.errors import GatewayError


@pytest.fixture
async def connection() -> AsyncIterator[BaseProtocol]:
    """aiohttp's protocol base over one end of a connected socket pair."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    protocol = BaseProtocol(loop)
    protocol.connection_made(transport)
    try:
        yield protocol
    finally:
        transport.close()
        theirs.close()


def _payload(connection: BaseProtocol, data: bytes, *, whole: bool) -> StreamReader:
    body = StreamReader(connection, 2**16, loop=asyncio.get_running_loop())
    body.feed_data(data)
    if whole:
        body.feed_eof()
    return body


async def test_a_body_that_has_arrived_whole_is_read_past_its_deadlines(
    connection: BaseProtocol,
) -> None:
    """Nothing is left to wait for from the client: no 408, however long the handler took
    (e.g. while the gRPC call it feeds was slow to take the params)."""
    body = _payload(connection, b"form bytes", whole=True)
    deadline = BodyDeadline(0.01, 0.01, body)
    await asyncio.sleep(0.05)  # both bounds have passed
    assert await deadline.read(body.read(4)) == b"form"
    assert await deadline.read(body.read()) == b" bytes"


@pytest.mark.parametrize("given", [True, False])
async def test_a_body_still_arriving_ends_with_408(connection: BaseProtocol, given: bool) -> None:
    body = _payload(connection, b"form", whole=False)
    deadline = BodyDeadline(0.05, 30.0, body if given else None)
    assert await deadline.read(body.read(4)) == b"form"
    with pytest.raises(GatewayError) as err:
        await deadline.read(body.read(4))
    assert (err.value.status, err.value.error_code) == (408, "UPLOAD_STALLED")
