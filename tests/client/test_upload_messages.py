"""Upload chunk messages written by the client in wire form: the bytes protobuf writes for
the same message, for every upload method of the contract."""

from __future__ import annotations

import os
from typing import Any

import pytest
from imagetasks.v1 import (
    common_pb2,
    generation_service_pb2,
    tasks_pb2,
    transform_service_pb2,
    workflow_service_pb2,
)

from aiserver.client._uploads import UPLOADS, chunk_message, serialize
from aiserver.client.inputs import InputSource

MESSAGES = [
    generation_service_pb2.ImageToImageRequest,
    generation_service_pb2.ImageWithMaskRequest,
    generation_service_pb2.ImageUpscaleRequest,
    generation_service_pb2.ImageToTextRequest,
    transform_service_pb2.CropImageRequest,
    transform_service_pb2.ConvertImageRequest,
    workflow_service_pb2.RunWorkflowRequest,
]


def test_every_upload_method_is_known_with_its_types() -> None:
    names = {cls.DESCRIPTOR.name.removesuffix("Request") for cls in MESSAGES}
    assert set(UPLOADS) == names
    path, response = UPLOADS["ConvertImage"]
    assert path == "/imagetasks.v1.TransformService/ConvertImage"
    assert response is transform_service_pb2.ConvertImageResponse


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.DESCRIPTOR.name)
@pytest.mark.parametrize(
    ("field", "data", "file_name"),
    [
        ("image", os.urandom(1 << 20), "photo.png"),
        ("mask", os.urandom(127), ""),
        ("image", b"", "empty.png"),
        ("", b"", ""),
        ("image", memoryview(os.urandom(300))[7:200], "été ☃.png"),
    ],
    ids=["1 MiB, named", "short", "empty file", "nothing", "a view, unicode name"],
)
def test_a_chunk_message_is_protobufs_own_bytes(
    cls: Any, field: str, data: bytes | memoryview, file_name: str
) -> None:
    want = cls(chunk=common_pb2.FileChunk(field=field, data=bytes(data), file_name=file_name))
    assert chunk_message(cls, field, data, file_name) == want.SerializeToString()


def test_the_serializer_sends_wire_form_as_is_and_serializes_messages() -> None:
    wire = chunk_message(transform_service_pb2.CropImageRequest, "image", b"abc")
    assert serialize(wire) is wire
    params = transform_service_pb2.CropImageRequest(params=tasks_pb2.CropImageParams(width=3))
    assert serialize(params) == params.SerializeToString()


def test_bytes_in_memory_are_chunked_as_views() -> None:
    data = bytearray(os.urandom(2_500))
    chunks = list(InputSource("image", data).chunks(1_000))
    assert [bytes(c) for c in chunks] == [data[:1000], data[1000:2000], data[2000:]]
    assert all(isinstance(c, memoryview) and c.obj is data for c in chunks)
    assert [bytes(c) for c in InputSource("image", b"").chunks(1_000)] == [b""]
