"""ReadArtifact's answers read by the client without protobuf: views of the received bytes,
the same values protobuf reads, protobuf itself for anything else."""

from __future__ import annotations

import asyncio
import os
import tracemalloc
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError
from imagetasks.v1 import artifact_service_pb2 as apb

from aiserver.client import AsyncClient, Client, ClientError
from aiserver.client._chunks import read_chunk
from aiserver.server import Service
from tests.support.artifacts import put_bytes

CHUNK = 64 * 1024


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"chunk_bytes": CHUNK}


def _message(data: bytes = b"", offset: int = 0) -> bytes:
    return apb.ReadArtifactResponse(data=data, offset=offset).SerializeToString()


_DATA = _message(b"abc")  # data = 1
_OFFSET = _message(offset=300)  # offset = 2


@pytest.mark.parametrize(
    "wire",
    [
        _message(os.urandom(1000), 7),
        _message(os.urandom(200_000), 2**40),
        _message(b"x"),
        _message(offset=5),
        b"",
        _OFFSET + _DATA,  # fields in the other order: protobuf reads them alike
        _message(b"\x00" * 128, 2**63 - 1),
        # an unknown field, a repeated field, a negative (10-byte) offset: left to protobuf
        _DATA + b"\x1a\x01z",
        _DATA + _message(b"second"),
        _DATA + b"\x10" + b"\xff" * 9 + b"\x01",
    ],
    ids=[
        "small",
        "large",
        "one byte",
        "offset only",
        "empty",
        "offset first",
        "largest offset",
        "unknown field",
        "data twice",
        "negative offset",
    ],
)
def test_a_chunk_reads_as_protobuf_reads_it(wire: bytes) -> None:
    want = apb.ReadArtifactResponse.FromString(wire)
    got = read_chunk(wire)
    assert (bytes(got.data), got.offset) == (want.data, want.offset)
    assert isinstance(got.data, memoryview) and got.data.readonly


def test_a_chunk_is_a_view_of_the_message_not_a_copy() -> None:
    wire = _message(os.urandom(CHUNK), 99)
    got = read_chunk(wire)
    assert got.data.obj is wire
    assert bytes(got.data) == wire[len(wire) - CHUNK - 2 : -2]


@pytest.mark.parametrize("wire", [_DATA[:-1], b"\x0a", b"\x10\xff", b"\x0a\x05ab"])
def test_a_broken_message_fails_as_protobuf_fails(wire: bytes) -> None:
    with pytest.raises(DecodeError):
        apb.ReadArtifactResponse.FromString(wire)
    with pytest.raises(DecodeError):
        read_chunk(wire)


async def test_stream_read_and_save_through_both_clients(
    service: Service, client: AsyncClient, tmp_path: Any
) -> None:
    data = os.urandom(3 * CHUNK + 5)
    name = await put_bytes(service, data)
    chunks = [c async for c in client.stream_artifact(name, offset=3)]
    assert [type(c) for c in chunks] == [memoryview] * 4
    assert b"".join(chunks) == data[3:]
    whole = await client.read_artifact(name)
    assert type(whole) is bytes and whole == data
    assert (
        await client.read_artifact(name, offset=CHUNK - 2, limit=CHUNK)
        == data[CHUNK - 2 : 2 * CHUNK - 2]
    )
    assert await client.save_artifact(name, tmp_path / "a.png") == len(data)
    assert (tmp_path / "a.png").read_bytes() == data
    with pytest.raises(ClientError) as caught:
        await client.read_artifact(name, offset=len(data) + 1)
    assert caught.value.reason == "READ_OFFSET_OUT_OF_RANGE"

    def blocking() -> tuple[bytes, bytes, str]:
        with Client(f"127.0.0.1:{service.grpc_port}", timeout=30) as sync:
            streamed = b"".join(sync.stream_artifact(name, offset=1, limit=2 * CHUNK))
            try:
                sync.read_artifact(name[:-5] + ("0" if name[-5] != "0" else "1") + ".png")
            except ClientError as err:
                return sync.read_artifact(name), streamed, err.reason
            raise AssertionError("no error for a missing artifact")

    whole, streamed, reason = await asyncio.to_thread(blocking)
    assert (whole, streamed, reason) == (data, data[1 : 2 * CHUNK + 1], "ARTIFACT_NOT_FOUND")


async def test_read_artifact_holds_the_bytes_once(service: Service, client: AsyncClient) -> None:
    """Chunks go into one growing bytes object that is handed out: no second copy of the
    whole (a bytearray, then bytes() of it, held twice the artifact at the end)."""
    data = os.urandom(64 * CHUNK)
    name = await put_bytes(service, data)
    assert await client.read_artifact(name) == data  # warm: channel, stubs, first-call costs
    tracemalloc.start()
    try:
        whole = await client.read_artifact(name)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert whole == data
    assert peak < len(data) * 1.5


async def test_any_grpc_client_still_reads_the_messages(
    service: Service, channel: grpc.aio.Channel
) -> None:
    data = os.urandom(2 * CHUNK + 1)
    name = await put_bytes(service, data)
    stub = channel.unary_stream(
        "/imagetasks.v1.ArtifactService/ReadArtifact",
        request_serializer=apb.ReadArtifactRequest.SerializeToString,
        response_deserializer=apb.ReadArtifactResponse.FromString,
    )
    got = [m async for m in stub(apb.ReadArtifactRequest(name=name, read_offset=1))]
    assert [(m.offset, len(m.data)) for m in got] == [(1, CHUNK), (CHUNK + 1, CHUNK)]
    assert b"".join(m.data for m in got) == data[1:]
