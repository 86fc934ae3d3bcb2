"""ReadArtifact in wire form: each message is read from the blob into its frame, and is the
message protobuf itself writes for that chunk (any gRPC client reads it as before)."""

from __future__ import annotations

import os
from typing import Any

import grpc
import pytest
from imagetasks.v1 import artifact_service_pb2 as apb

from aiserver.api.wire import bytes_frame, bytes_message
from aiserver.server import Service
from tests.support.artifacts import put_bytes
from tests.support.grpc_helpers import rich_status

CHUNK = 64 * 1024


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"chunk_bytes": CHUNK}


@pytest.mark.parametrize(
    "offset", [0, 1, 127, 128, 16_383, 16_384, 2**21, 2**35, 2**63 - 1], ids=str
)
@pytest.mark.parametrize("length", [1, 127, 128, 300, 70_000, 2**21 + 5], ids=str)
def test_the_frame_makes_protobufs_own_message(offset: int, length: int) -> None:
    data = os.urandom(length)
    head, tail = bytes_frame(1, 2)(offset, length)
    want = apb.ReadArtifactResponse(data=data, offset=offset).SerializeToString()
    assert head + data + tail == want


@pytest.mark.parametrize("length", [1, 127, 128, 3092, 16_384, 2**21 + 5], ids=str)
def test_bytes_messages_are_protobufs_own(length: int) -> None:
    """A chunk alone (a variant's, a transform's) and a chunk with its offset, from bytes or
    a view, again and again (the field's head is kept per length)."""
    data = os.urandom(length)
    for _ in range(2):
        for given in (data, memoryview(data)):
            chunk = bytes_message(2, given).data
            assert chunk == apb.GetVariantResponse(chunk=data).SerializeToString()
            assert apb.GetVariantResponse.FromString(chunk).chunk == data
            for offset in (0, 1, 300, 2**40):
                read = bytes_message(1, given, int_field=2, value=offset).data
                assert (
                    read == apb.ReadArtifactResponse(data=data, offset=offset).SerializeToString()
                )
    assert bytes_message(2, b"").data == b""  # (an empty chunk: no field, as before)
    assert bytes_message(1, b"", int_field=2, value=5).data == (
        apb.ReadArtifactResponse(offset=5).SerializeToString()
    )


def test_frames_are_kept_and_stay_protobufs_own() -> None:
    frame = bytes_frame(1, 2)
    data = b"x" * 300
    for offset in range(0, 3000 * 300, 300):  # past what is kept: some are made again
        head, tail = frame(offset, len(data))
        message = apb.ReadArtifactResponse(data=data, offset=offset)
        assert head + data + tail == message.SerializeToString()
    assert frame(5 << 20, 1 << 20) is frame(5 << 20, 1 << 20)  # made once, not per chunk


async def test_each_message_is_the_one_protobuf_writes(
    service: Service, channel: grpc.aio.Channel
) -> None:
    # Raw messages (no deserializer): the bytes the network carries.
    read = channel.unary_stream(
        "/imagetasks.v1.ArtifactService/ReadArtifact",
        request_serializer=apb.ReadArtifactRequest.SerializeToString,
    )
    for size in (10, 5 * CHUNK + 17):  # read inline / from the page cache on the event loop
        data = os.urandom(size)
        name = await put_bytes(service, data)
        for offset, limit in ((0, 0), (1, 0), (3, 5), (CHUNK - 1, 2 * CHUNK), (size - 1, 9)):
            if offset >= size:
                continue
            request = apb.ReadArtifactRequest(name=name, read_offset=offset, read_limit=limit)
            got = [m async for m in read(request)]
            end = size if limit == 0 else min(size, offset + limit)
            want = [
                apb.ReadArtifactResponse(data=data[at : min(end, at + CHUNK)], offset=at)
                for at in range(offset, end, CHUNK)
            ]
            assert got == [m.SerializeToString() for m in want]
        assert [m async for m in read(apb.ReadArtifactRequest(name=name, read_offset=size))] == []


async def test_errors_are_unchanged(service: Service, channel: grpc.aio.Channel) -> None:
    read = channel.unary_stream(
        "/imagetasks.v1.ArtifactService/ReadArtifact",
        request_serializer=apb.ReadArtifactRequest.SerializeToString,
        response_deserializer=apb.ReadArtifactResponse.FromString,
    )
    name = await put_bytes(service, b"0123456789")
    missing = name[:-5] + "0" + name[-4:] if name[-5] != "0" else name[:-5] + "1" + name[-4:]
    for request, code, reason in (
        (apb.ReadArtifactRequest(name=missing), grpc.StatusCode.NOT_FOUND, "ARTIFACT_NOT_FOUND"),
        (
            apb.ReadArtifactRequest(name=name, read_offset=11),
            grpc.StatusCode.INVALID_ARGUMENT,  # as ErrorKind has it (the store's comment)
            "READ_OFFSET_OUT_OF_RANGE",
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            _ = [m async for m in read(request)]
        assert caught.value.code() == code
        assert rich_status(caught.value)[1]["ErrorInfo"].reason == reason
