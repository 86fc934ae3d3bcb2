"""A form that has arrived whole is split by hand when its shape is plain
(``uploads._plain_parts``): for every body split that way, the parts, names and bytes are
exactly what aiohttp's reader gives; every other shape is left to aiohttp's reader."""

from __future__ import annotations

import asyncio
import random
import socket
import warnings
from collections.abc import AsyncIterator

import pytest
from aiohttp import BodyPartReader, MultipartReader, StreamReader
from aiohttp.base_protocol import BaseProtocol
from multidict import CIMultiDict, CIMultiDictProxy

from aiserver.gateway.uploads import _plain_parts

BOUNDARY = "b0undary-1234"
Parts = list[tuple[str | None, str | None, bytes]]


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


async def _aiohttp(connection: BaseProtocol, body: bytes, boundary: str = BOUNDARY) -> Parts:
    stream = StreamReader(connection, 2**16, loop=asyncio.get_running_loop())
    stream.feed_data(body)
    stream.feed_eof()
    headers = CIMultiDictProxy(
        CIMultiDict({"Content-Type": f"multipart/form-data; boundary={boundary}"})
    )
    reader = MultipartReader(headers, stream)
    got: Parts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while (part := await reader.next()) is not None:
            assert isinstance(part, BodyPartReader)
            got.append((part.name, part.filename, bytes(await part.read())))
    return got


def _plain(body: bytes, boundary: str = BOUNDARY) -> Parts | None:
    parts = _plain_parts(body, boundary.encode())
    if parts is None:
        return None
    return [(p.name, p.file_name, bytes(p.data)) for p in parts]


def _form(*parts: tuple[str, bytes], boundary: str = BOUNDARY, tail: bytes = b"--\r\n") -> bytes:
    """``parts``: (head lines, data)."""
    out = b""
    for head, data in parts:
        out += f"--{boundary}\r\n{head}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}".encode() + tail


IMAGE = bytes(range(256)) * 3 + b"\r\n--b0undary-12\r\n\r\n--"
SENT = [  # what clients send: read by hand
    _form(  # aiohttp's client
        (
            "Content-Type: text/plain; charset=utf-8\r\n"
            'Content-Disposition: form-data; name="Sync"',
            b"true",
        ),
        (
            'Content-Type: image/png\r\nContent-Disposition: form-data; name="image"; filename="a"',
            IMAGE,
        ),
    ),
    _form(('Content-Disposition: form-data; name="a"\r\nContent-Type: TEXT/PLAIN', b"1")),
    _form(
        ('Content-Disposition: form-data; name="Sync"', b"true"),
        (
            'Content-Disposition: form-data; name="image"; filename="input.png"\r\n'
            "Content-Type: image/png",
            IMAGE,
        ),
    ),
    _form(('content-disposition:form-data; name="image"; filename=""', b"")),
    _form(('Content-Disposition: form-data; name="Prompt"', "é ✓".encode()), tail=b"--"),
    _form(('Content-Disposition: form-data; name="a"', b""), tail=b"--\r\nepilogue"),
    _form(
        ('Content-Type: image/png\r\nContent-Disposition: form-data; name="i"; filename="x"', b"1")
    ),
]
OTHER = [  # left to aiohttp's reader
    b"preamble\r\n" + _form(('Content-Disposition: form-data; name="a"', b"1")),
    _form(('Content-Disposition: form-data; name="_charset_"', b"latin-1")),
    _form(
        (
            'Content-Disposition: form-data; name="a"\r\nContent-Type: text/plain; charset=latin-1',
            b"1",
        )
    ),
    _form(('Content-Disposition: form-data; name="a"\r\nContent-Type: application/json', b"1")),
    _form(
        ('Content-Disposition: form-data; name="a"\r\nContent-Transfer-Encoding: base64', b"MQ==")
    ),
    _form(('Content-Disposition: form-data; name="a\\"b"', b"1")),
    _form(('Content-Disposition: form-data; name="é"', b"1")),
    _form(('Content-Disposition: form-data; filename="x"', b"1")),
    _form(('Content-Disposition: form-data; name="a"\r\n Folded: x', b"1")),
    _form(('Content-Disposition: form-data; name="a"\r\nX-Other: 1', b"1")),
    _form(('Content-Disposition: form-data; name="a"', b"1"), tail=b""),
    _form(('Content-Disposition: form-data; name="a"', b"1"), tail=b"x--"),
    _form(('Content-Disposition: form-data; name="a"', b"1"))[:-8],
    b"--"
    + BOUNDARY.encode()
    + b"  \r\n"
    + _form(('Content-Disposition: form-data; name="a"', b"1"))[len(BOUNDARY) + 4 :],
]


@pytest.mark.parametrize("body", SENT)
async def test_plain_forms_split_as_aiohttp_reads_them(
    connection: BaseProtocol, body: bytes
) -> None:
    got = _plain(body)
    assert got is not None
    assert got == await _aiohttp(connection, body)


@pytest.mark.parametrize("body", OTHER)
def test_other_shapes_are_left_to_aiohttp(body: bytes) -> None:
    assert _plain(body) is None


async def test_random_forms_split_as_aiohttp_reads_them(connection: BaseProtocol) -> None:
    rng = random.Random(15)
    names = ["Sync", "image", "mask", "Prompt", "a b", "_charset_", 'x"y', "/p", ""]
    heads = [
        'Content-Disposition: form-data; name="{n}"',
        'Content-Disposition: form-data; name="{n}"; filename="{f}"',
        'Content-Disposition: form-data; name="{n}"; filename="{f}"\r\nContent-Type: image/png',
        'Content-Disposition: form-data; name="{n}"\r\nContent-Type: text/plain',
        'Content-Type: text/plain; charset=utf-8\r\nContent-Disposition: form-data; name="{n}"',
        'Content-Disposition: form-data; name="{n}"\r\nContent-Type: text/plain; charset=latin-1',
        'content-disposition: form-data; filename="{f}"; name="{n}"',
    ]
    pieces = [b"\r\n", b"--", BOUNDARY.encode()[:5], b"\r\n--", b"x", b"\x00\xff", "é".encode()]
    taken = 0
    for _ in range(2000):
        parts = []
        for _ in range(rng.randint(1, 4)):
            head = rng.choice(heads).format(n=rng.choice(names), f=rng.choice(["a.png", "", "é"]))
            data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
            parts.append((head, data))
        body = _form(*parts, tail=rng.choice([b"--\r\n", b"--", b"--\r\nend"]))
        got = _plain(body)
        if got is None:
            continue
        taken += 1
        assert got == await _aiohttp(connection, body), body
    assert taken > 150
