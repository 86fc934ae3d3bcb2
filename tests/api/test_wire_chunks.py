"""Upload chunk messages read from the wire without protobuf (``aiserver.api.wire``): the
same fields as protobuf reads, and protobuf's own parse for anything else."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from imagetasks.v1 import common_pb2, generation_service_pb2, tasks_pb2, transform_service_pb2

from aiserver.api.malformed import Malformed, tolerant
from aiserver.api.wire import ChunkRequest, chunk_parsing

Convert = transform_service_pb2.ConvertImageRequest


def _parser(cls: Any) -> Callable[[bytes], Any]:
    parse = chunk_parsing(tolerant(cls.FromString), cls.FromString)
    assert parse is not None
    return parse


@pytest.mark.parametrize(
    "chunk",
    [
        common_pb2.FileChunk(field="image", data=b"\x00" * 300, file_name="a.png"),
        common_pb2.FileChunk(field="mask", data=bytes(range(256)) * 5000),
        common_pb2.FileChunk(data=b"x"),
        common_pb2.FileChunk(field="image"),
        common_pb2.FileChunk(),
        common_pb2.FileChunk(field="image", data=b"y", file_name="été ☃.png"),
    ],
    ids=["all", "big, no name", "data only", "no data", "empty", "unicode name"],
)
@pytest.mark.parametrize("cls", [Convert, generation_service_pb2.ImageUpscaleRequest])
def test_a_chunk_message_reads_as_protobuf_reads_it(cls: Any, chunk: object) -> None:
    wire = cls(chunk=chunk).SerializeToString()
    got = _parser(cls)(wire)
    want = cls.FromString(wire)
    assert isinstance(got, ChunkRequest)
    assert got.WhichOneof("payload") == want.WhichOneof("payload") == "chunk"
    assert got.ByteSize() == want.ByteSize() == len(wire)
    assert (got.chunk.field, bytes(got.chunk.data), got.chunk.file_name) == (
        want.chunk.field,
        want.chunk.data,
        want.chunk.file_name,
    )


def _key(number: int, wire_type: int = 2) -> bytes:
    return bytes([number << 3 | wire_type])


@pytest.mark.parametrize(
    "wire",
    [
        Convert(params=tasks_pb2.ConvertImageParams(quality=3)).SerializeToString(),
        b"",
        # a repeated field inside the chunk: protobuf keeps the last one
        _key(2) + b"\x06" + _key(1) + b"\x01a" + _key(1) + b"\x01b",
        # an unknown field inside the chunk
        _key(2) + b"\x03" + _key(9) + b"\x01z",
        # the chunk field twice: protobuf merges them
        _key(2) + b"\x03" + _key(2) + b"\x01a" + _key(2) + b"\x03" + _key(3) + b"\x01b",
        # params, then a chunk: the last member of the oneof wins
        Convert(params=tasks_pb2.ConvertImageParams()).SerializeToString()
        + Convert(chunk=common_pb2.FileChunk(data=b"z")).SerializeToString(),
    ],
    ids=["params", "empty", "repeated field", "unknown field", "chunk twice", "params+chunk"],
)
def test_other_messages_are_left_to_protobuf(wire: bytes) -> None:
    got = _parser(Convert)(wire)
    want = Convert.FromString(wire)
    assert not isinstance(got, ChunkRequest)
    assert got == want


@pytest.mark.parametrize(
    "wire",
    [
        _key(2) + b"\x04" + _key(1) + b"\x02\xff\xfe",  # chunk.field not UTF-8
        _key(2) + b"\x05" + _key(2) + b"\x10ab",  # data longer than the message
        _key(2) + b"\x10" + _key(2) + b"\x01a",  # chunk longer than the message
        _key(2) + b"\x02" + _key(2) + b"\x80",  # a length that never ends
    ],
    ids=["bad utf-8", "data overruns", "chunk overruns", "truncated varint"],
)
def test_malformed_chunks_are_malformed_as_protobuf_says(wire: bytes) -> None:
    with pytest.raises(DecodeError):
        Convert.FromString(wire)
    got = _parser(Convert)(wire)
    assert isinstance(got, Malformed)


def test_request_types_without_chunks_keep_their_parser() -> None:
    parse = tolerant(tasks_pb2.ConvertImageParams.FromString)
    assert chunk_parsing(parse, tasks_pb2.ConvertImageParams.FromString) is parse
    assert chunk_parsing(None, None) is None
