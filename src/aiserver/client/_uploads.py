"""Upload messages in wire form: a chunk message is written as protobuf writes it, in one
join of its few header bytes and the data, where protobuf copies the data into a
``FileChunk``, again into the request message, and once more when it serializes it (three
copies of every MiB uploaded). The params message stays a protobuf message; the upload
methods' serializer sends ``bytes`` as they are.
"""

from __future__ import annotations

import functools
from typing import Any

from google.protobuf import message_factory
from imagetasks.v1 import generation_service_pb2, transform_service_pb2, workflow_service_pb2

__all__ = ["UPLOADS", "chunk_message", "serialize"]

_LEN = 2  # wire type of strings, bytes and messages
_FIELD, _DATA, _FILE_NAME = 1 << 3 | _LEN, 2 << 3 | _LEN, 3 << 3 | _LEN  # FileChunk's


def _uploads() -> dict[str, tuple[str, Any]]:
    """Each upload (client-streaming) method of the contract: its name -> (path, response
    type)."""
    found: dict[str, tuple[str, Any]] = {}
    for module in (generation_service_pb2, transform_service_pb2, workflow_service_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if method.client_streaming:
                    response = message_factory.GetMessageClass(method.output_type)
                    found[method.name] = (f"/{service.full_name}/{method.name}", response)
    return found


UPLOADS = _uploads()


def serialize(message: Any) -> bytes:
    """An upload method's request serializer: a message in wire form goes as it is."""
    return message if type(message) is bytes else message.SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@functools.cache
def _chunk_key(message_type: Any) -> bytes:
    """The key of ``message_type``'s ``chunk`` field (a FileChunk in the ``payload`` oneof)."""
    return _varint(message_type.DESCRIPTOR.fields_by_name["chunk"].number << 3 | _LEN)


def chunk_message(
    message_type: Any, field: str, data: bytes | memoryview, file_name: str = ""
) -> bytes:
    """``message_type(chunk=FileChunk(field=field, data=data, file_name=file_name))``,
    serialized: the same bytes protobuf writes (fields in order, empty ones left out)."""
    parts: list[bytes | memoryview] = []
    for key, value in ((_FIELD, field.encode()), (_DATA, data), (_FILE_NAME, file_name.encode())):
        if len(value):
            parts += [bytes((key,)), _varint(len(value)), value]
    size = sum(len(p) for p in parts)
    return b"".join([_chunk_key(message_type), _varint(size), *parts])
