"""ReadArtifact's answers read without a protobuf message: each chunk a view of the bytes grpc
received, where protobuf would copy the data into a message and ``.data`` copy it out again
(two copies of every MiB read).

Only the two fields of ``ReadArtifactResponse``, each at most once, in any order, are read
here; any other message (a field this client does not know, a repeated field) goes to
protobuf, so what a caller gets never differs from protobuf's reading of the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from imagetasks.v1 import artifact_service_pb2

__all__ = ["READ_ARTIFACT", "ArtifactChunk", "read_chunk"]

READ_ARTIFACT = "/imagetasks.v1.ArtifactService/ReadArtifact"

_DATA = 1 << 3 | 2  # data = 1, length-delimited
_OFFSET = 2 << 3 | 0  # offset = 2, varint


@dataclass(frozen=True, slots=True)
class ArtifactChunk:
    """A ``ReadArtifactResponse``: ``data`` is a read-only view of the received message."""

    data: memoryview
    offset: int


def _varint(message: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; (-1, pos) when it does not end
    within 9 bytes (63 bits: past that an int64 wraps around, which protobuf does)."""
    value = shift = 0
    end = min(len(message), pos + 9)
    while pos < end:
        byte = message[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    return -1, pos


def read_chunk(message: bytes) -> ArtifactChunk:
    """``message`` (a ``ReadArtifactResponse`` in wire form) as an :class:`ArtifactChunk`."""
    size = len(message)
    view = memoryview(message)
    data = view[0:0]
    offset = 0
    seen = 0
    pos = 0
    while pos < size:
        key = message[pos]
        if key not in (_DATA, _OFFSET) or seen & (1 << key):
            return _parsed(message)
        seen |= 1 << key
        value, pos = _varint(message, pos + 1)
        if value < 0:
            return _parsed(message)
        if key == _OFFSET:
            offset = value
            continue
        end = pos + value
        if end > size:
            return _parsed(message)  # protobuf raises its DecodeError
        data = view[pos:end]
        pos = end
    return ArtifactChunk(data, offset)


def _parsed(message: bytes) -> ArtifactChunk:
    parsed = artifact_service_pb2.ReadArtifactResponse.FromString(message)
    return ArtifactChunk(memoryview(parsed.data), parsed.offset)
