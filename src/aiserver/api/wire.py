"""Byte chunks sent as protobuf messages already in wire form.

A response carrying a 1 MiB chunk costs two copies as a message object (into the message,
then out of it when serialized); written straight in wire form it costs one, and no upb work.
Every handler's response serializer goes through :func:`passing_encoded` (the guard rebuilds
every handler), which hands an :class:`Encoded` to grpc as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Encoded", "bytes_message", "passing_encoded"]

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


def bytes_message(
    field: int, data: bytes | memoryview, *, int_field: int = 0, value: int = 0
) -> Encoded:
    """A message with ``data`` in bytes field ``field`` and, if ``int_field``, ``value`` (an
    int64 >= 0) in that field; the encoding protobuf itself writes (zero values omitted)."""
    parts: list[bytes | memoryview] = []
    if len(data):
        parts += [_varint(field << 3 | _LEN), _varint(len(data)), data]
    if int_field and value > 0:
        parts += [_varint(int_field << 3 | _VARINT), _varint(value)]
    return Encoded(b"".join(parts))


def passing_encoded(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """``serialize``, except that an :class:`Encoded` message is sent as it is."""
    if serialize is None:
        return None

    def serializer(msg: Any) -> bytes:
        return msg.data if type(msg) is Encoded else serialize(msg)

    return serializer
