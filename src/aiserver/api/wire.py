"""Byte chunks as protobuf messages in wire form, both ways.

A response carrying a 1 MiB chunk costs two copies as a message object (into the message,
then out of it when serialized); written straight in wire form it costs one, and no upb work.
Every handler's response serializer goes through :func:`passing_encoded` (the guard rebuilds
every handler), which hands an :class:`Encoded` to grpc as it is.

ReadArtifact goes further (:func:`bytes_frame`): the blob store reads each chunk from the
file straight into the message, between the field header and the offset field, so the read
is the only copy.

An upload's chunk messages are read the same way (:func:`chunk_parsing`): a message that is
only a ``chunk`` is sliced out of the bytes grpc received, its ``data`` a view of them, where
upb would copy the data into the message and ``chunk.data`` copy it out again (two copies of
every MiB uploaded). Any other message goes to protobuf.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor

__all__ = [
    "ChunkRequest",
    "Encoded",
    "RawFileChunk",
    "bytes_frame",
    "bytes_message",
    "chunk_parsing",
    "parse_chunk",
    "passing_encoded",
]

_LEN = 2  # wire type of bytes fields
_VARINT = 0


@dataclass(frozen=True, slots=True)
class Encoded:
    """A response message, serialized."""

    data: bytes


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@functools.lru_cache(maxsize=1024)
def _bytes_head(field: int, length: int) -> bytes:
    """A bytes field's key and length. Kept (an LRU in C): a hit costs about 0.1 us against
    about 1.5 us for the two varints in Python; a warm variant or a transform's whole chunks
    ask for the same lengths again."""
    return _varint(field << 3 | _LEN) + _varint(length)


def bytes_message(
    field: int, data: bytes | memoryview, *, int_field: int = 0, value: int = 0
) -> Encoded:
    """A message with ``data`` in bytes field ``field`` and, if ``int_field``, ``value`` (an
    int64 >= 0) in that field; the encoding protobuf itself writes (zero values omitted)."""
    size = len(data)
    if not int_field or value <= 0:  # a chunk alone: one join, the head kept
        return Encoded(_bytes_head(field, size) + data if size else b"")
    parts: list[bytes | memoryview] = []
    if size:
        parts += [_bytes_head(field, size), data]
    parts += [_varint(int_field << 3 | _VARINT), _varint(value)]
    return Encoded(b"".join(parts))


_FRAMES_KEPT = 1024
"""Frames kept per :func:`bytes_frame` (about 330 bytes each with the cache's own entry:
about 330 KiB in all). Reads start at offset 0 (or a client's ``read_offset``) and step by
the chunk size, so the whole chunks of every large artifact ask for the same (offset, length)
pairs: 1024 cover the first GiB of 1 MiB chunks. A read's last, partial chunk has a length
of its own, and an artifact smaller than one chunk is read in one (0, size) chunk: for
image-sized artifacts nearly every key is new and the cache mostly turns over."""


def bytes_frame(field: int, int_field: int) -> Callable[[int, int], tuple[bytes, bytes]]:
    """A frame (:data:`aiserver.blobs.protocol.Frame`) making each chunk read at ``offset``
    the message :func:`bytes_message` writes for ``(field, data, int_field, offset)``: the
    same bytes, in protobuf's own field order.

    Frames are kept (an LRU in C): a hit costs about 0.3 us against 1-2.5 us to build the two
    varints in Python, and a miss costs the build and the cache's own work (0.3-1 us more
    than no cache). Whole chunks of large artifacts hit (:data:`_FRAMES_KEPT`); an
    artifact smaller than one chunk has a (0, size) key of its own, so it misses unless the
    same artifact is read again soon."""
    data_key = _varint(field << 3 | _LEN)
    int_key = _varint(int_field << 3 | _VARINT)

    @functools.lru_cache(maxsize=_FRAMES_KEPT)
    def frame(offset: int, length: int) -> tuple[bytes, bytes]:
        head = data_key + _varint(length) if length else b""
        return head, int_key + _varint(offset) if offset > 0 else b""

    return frame


def passing_encoded(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """``serialize``, except that an :class:`Encoded` message is sent as it is."""
    if serialize is None:
        return None

    def serializer(msg: Any) -> bytes:
        return msg.data if type(msg) is Encoded else serialize(msg)

    return serializer


# --- upload chunks in ------------------------------------------------------------------

_CHUNK_TYPE = "imagetasks.v1.FileChunk"
# FileChunk: field = 1, data = 2, file_name = 3, each a length-delimited field
_FIELD, _DATA, _FILE_NAME = 1 << 3 | _LEN, 2 << 3 | _LEN, 3 << 3 | _LEN


@dataclass(frozen=True, slots=True)
class RawFileChunk:
    """A ``FileChunk`` read from the wire; ``data`` is a view of the received bytes."""

    field: str
    data: memoryview
    file_name: str


@dataclass(frozen=True, slots=True)
class ChunkRequest:
    """An upload request message whose payload is a chunk: what the upload reader uses of the
    protobuf message (``WhichOneof``, ``chunk``, ``ByteSize``)."""

    chunk: RawFileChunk
    size: int

    def WhichOneof(self, group: str) -> str | None:  # protobuf's name
        return "chunk" if group == "payload" else None

    def ByteSize(self) -> int:  # protobuf's name
        return self.size


def _varint_at(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; (-1, pos) when it does not end."""
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    return -1, pos


def parse_chunk(data: bytes, chunk_key: int) -> ChunkRequest | None:
    """``data`` as a message holding only the chunk field whose key (tag byte) is
    ``chunk_key``, each FileChunk field at most once and strings valid UTF-8; ``None`` for
    anything else (protobuf then parses it, and reports what is wrong with it)."""
    size = len(data)
    if size < 2 or data[0] != chunk_key:
        return None
    length, pos = _varint_at(data, 1)
    if pos + length != size:
        return None
    view = memoryview(data)
    texts = {_FIELD: "", _FILE_NAME: ""}
    payload = view[0:0]
    seen = 0
    while pos < size:
        key = data[pos]
        bit = 1 << (key >> 3)
        if key not in (_FIELD, _DATA, _FILE_NAME) or seen & bit:
            return None  # unknown or repeated fields: protobuf's rules apply
        seen |= bit
        length, pos = _varint_at(data, pos + 1)
        end = pos + length
        if length < 0 or end > size:
            return None
        if key == _DATA:
            payload = view[pos:end]
        else:
            try:
                texts[key] = str(view[pos:end], "utf-8")
            except UnicodeDecodeError:
                return None
        pos = end
    return ChunkRequest(RawFileChunk(texts[_FIELD], payload, texts[_FILE_NAME]), size)


def chunk_parsing(
    parse: Callable[[bytes], Any] | None, from_string: Callable[[bytes], Any] | None
) -> Callable[[bytes], Any] | None:
    """``parse`` (``from_string``, a request type's ``FromString``, as the guard wraps it),
    reading the messages that carry only a ``payload.chunk`` (a ``FileChunk``) without
    protobuf; ``parse`` itself for request types with no such field."""
    key = _chunk_key(from_string)
    if parse is None or key is None:
        return parse
    others = parse

    def parse_upload(data: bytes) -> Any:
        return parse_chunk(data, key) or others(data)

    return parse_upload


@functools.cache
def _chunk_key(from_string: Callable[[bytes], Any] | None) -> int | None:
    """The key byte of the request type's ``payload.chunk`` FileChunk field, if it has one."""
    message_type = getattr(getattr(from_string, "__self__", None), "DESCRIPTOR", None)
    if not isinstance(message_type, descriptor.Descriptor):
        return None
    field = message_type.fields_by_name.get("chunk")
    if (
        field is None
        or field.message_type is None
        or field.message_type.full_name != _CHUNK_TYPE
        or field.containing_oneof is None
        or field.containing_oneof.name != "payload"
        or field.number > 15  # a one-byte key
    ):
        return None
    return int(field.number << 3 | _LEN)
