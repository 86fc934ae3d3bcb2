"""A form that has arrived whole is split by hand when its shape is plain
(``uploads._plain_parts``); every other shape goes to aiohttp's reader over the same bytes.
Differential tests: ``send_multipart`` on a body with its Content-Length (the whole-form path:
the split, or aiohttp's reader over the bytes already read) against the same body without one
(aiohttp's reader streaming it), compared on the fields, the files' bytes and names, and the
error code. Then the whole-form path through a real gateway, keep-alive included."""

from __future__ import annotations

import asyncio
import random
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import MultipartReader, StreamReader
from aiohttp.base_protocol import BaseProtocol
from multidict import CIMultiDict, CIMultiDictProxy

from aiserver.gateway.errors import GatewayError
from aiserver.gateway.uploads import FormFields, UploadLimits, _plain_parts, send_multipart
from tests.gateway.fake_backend import FakeBackend

BOUNDARY = "b0undary-1234"
SMALL = UploadLimits(max_upload_bytes=12_000, max_field_bytes=200, max_form_bytes=600, max_fields=6)
LARGE = UploadLimits()


class _Buffered(BaseProtocol):
    """The protocol under a body already in memory (the reference reads it all at once)."""

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass


@dataclass
class _Request:
    """What ``send_multipart`` reads of an aiohttp request. ``protocol`` is aiohttp's own,
    without a parser, as a handler's connection is once its body is in: pausing it fails."""

    headers: CIMultiDictProxy[str]
    content_length: int | None
    content: StreamReader
    protocol: BaseProtocol

    async def multipart(self) -> MultipartReader:
        return MultipartReader(self.headers, self.content)  # as web.Request.multipart does


@dataclass
class _Call:
    """The gRPC call the form is written into: records what it gets."""

    files: dict[str, bytes] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    ended: bool = False

    def done(self) -> bool:
        return False

    async def write(self, msg: tuple[str, bytes, str]) -> None:
        name, data, file_name = msg
        self.files[name] = self.files.get(name, b"") + data
        if file_name:
            self.names.setdefault(name, file_name)

    async def done_writing(self) -> None:
        self.ended = True

    def cancel(self) -> None:
        pass


async def _outcome(
    body: bytes, *, whole: bool, limits: UploadLimits = SMALL, content_type: str = ""
) -> tuple[Any, ...]:
    """What ``send_multipart`` makes of ``body``: ("ok", fields, files, file names) or
    ("error", status, code); ``whole``: with its Content-Length."""
    loop = asyncio.get_running_loop()
    content = StreamReader(_Buffered(loop), 2**22, loop=loop)
    content.feed_data(body)
    content.feed_eof()
    ctype = content_type or f"multipart/form-data; boundary={BOUNDARY}"
    headers = {"Content-Type": ctype}
    if whole:
        headers["Content-Length"] = str(len(body))
    request = _Request(
        CIMultiDictProxy(CIMultiDict(headers)),
        len(body) if whole else None,
        content,
        BaseProtocol(loop),
    )
    opened: list[FormFields] = []
    call = _Call()

    async def open_call(fields: FormFields) -> _Call:
        opened.append(list(fields))
        return call

    try:
        with warnings.catch_warnings():  # aiohttp warns of odd Content-Disposition headers
            warnings.simplefilter("ignore")
            await send_multipart(
                request,  # type: ignore[arg-type]
                open_call=open_call,
                chunk_message=lambda f, d, n: (f, bytes(d), n),  # type: ignore[arg-type,return-value]
                limits=limits,
                initial=[("q", "1")],
            )
    except GatewayError as exc:
        return ("error", exc.status, exc.error_code)
    assert call.ended
    return ("ok", opened, call.files, call.names)


async def _same(
    body: bytes, limits: UploadLimits = SMALL, content_type: str = ""
) -> tuple[Any, ...]:
    got = await _outcome(body, whole=True, limits=limits, content_type=content_type)
    assert got == await _outcome(body, whole=False, limits=limits, content_type=content_type), body[
        :300
    ]
    return got


def _plain(body: bytes, boundary: str = BOUNDARY) -> bool:
    return _plain_parts(body, boundary.encode()) is not None


def _form(*parts: tuple[str, bytes], boundary: str = BOUNDARY, tail: bytes = b"--\r\n") -> bytes:
    """``parts``: (head lines, data)."""
    out = b""
    for head, data in parts:
        out += f"--{boundary}\r\n{head}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}".encode() + tail


def _head(name: str, file_name: str | None = None, extra: str = "") -> str:
    head = f'Content-Disposition: form-data; name="{name}"'
    if file_name is not None:
        head += f'; filename="{file_name}"'
    return head + (f"\r\n{extra}" if extra else "")


IMAGE = bytes(range(256)) * 3 + b"\r\n--b0undary-12\r\n\r\n--"
DELIM = f"--{BOUNDARY}".encode()
SENT = [  # what clients send: split by hand
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
        (_head("Sync"), b"true"), (_head("image", "input.png", "Content-Type: image/png"), IMAGE)
    ),
    _form(('content-disposition:form-data; name="image"; filename=""', b"")),
    _form((_head("Prompt"), "é ✓".encode()), tail=b"--"),
    _form((_head("a"), b""), tail=b"--\r\nepilogue"),
    _form((_head("a"), b"1"), tail=b"-- \t\r\n"),
    _form((_head("i", "x", "Content-Type: image/png"), b"1")),
    _form((_head("image", "a\tb.png"), b"1")),
]
OTHER = [  # left to aiohttp's reader
    b"preamble\r\n" + _form((_head("a"), b"1")),
    _form((_head("_charset_"), b"latin-1")),
    _form((_head("a", None, "Content-Type: text/plain; charset=latin-1"), b"1")),
    _form((_head("a", None, "Content-Type: application/json"), b"1")),
    _form((_head("a", None, "Content-Transfer-Encoding: base64"), b"MQ==")),
    _form(('Content-Disposition: form-data; name="a\\"b"', b"1")),
    _form((_head("é"), b"1")),
    _form(('Content-Disposition: form-data; filename="x"', b"1")),
    _form((_head("a", None, " Folded: x"), b"1")),
    _form((_head("a", None, "X-Other: 1"), b"1")),
    _form((_head("a"), b"1"), tail=b""),
    _form((_head("a"), b"1"), tail=b"x--"),
    _form((_head("a"), b"1"))[:-8],
    DELIM + b"  \r\n" + _form((_head("a"), b"1"))[len(DELIM) + 2 :],
    # The shapes the first split took and aiohttp reads otherwise (a differential fuzz):
    # text after the closing delimiter on its line,
    _form((_head("a"), b"1"), tail=b"--x"),
    _form((_head("a"), b"1"), tail=b"--garbage\r\n"),
    _form((_head("image", "a.png"), b"1"), tail=b"--\x00"),
    # control bytes in a head (a bare LF or CR inside a quoted name, DEL, NUL),
    _form((_head("a\nb"), b"1")),
    _form((_head("a\rb"), b"1")),
    _form((_head("image", "x\x7f.png"), b"1")),
    _form((_head("image", "x\x00.png"), b"1")),
    _form((_head("image", "x\x0b.png", "Content-Type: image/png"), b"1")),
    _form((_head("a", None, "Content-Type: text/plain\x01"), b"1")),
    # a head line longer than aiohttp takes,
    _form((_head("n" * 9000), b"1")),
    _form((_head("image", "f" * 8200), b"1")),
    # a file part of a multipart type (aiohttp reads it as a nested form),
    _form((_head("image", "a.png", "Content-Type: multipart/mixed; boundary=zz"), b"1")),
    _form((_head("image", "a.png", "Content-Type: Multipart/related"), b"1")),
    _form(
        (_head("image", "a.png", "Content-Type: multipart/form-data; boundary=" + BOUNDARY), b"")
    ),
    # and a part whose data starts with a delimiter (an empty part).
    _form((_head("a"), DELIM + b"\r\n" + _head("b").encode() + b"\r\n\r\n2")),
    _form((_head("image", "a.png"), DELIM + b"--")),
]


@pytest.mark.parametrize("body", SENT)
async def test_plain_forms_are_split_as_aiohttp_reads_them(body: bytes) -> None:
    assert _plain(body)
    assert (await _same(body))[0] == "ok"


@pytest.mark.parametrize("body", OTHER)
async def test_other_shapes_are_left_to_aiohttp(body: bytes) -> None:
    assert not _plain(body)
    await _same(body)


def _random_form(rng: random.Random) -> bytes:
    """A form of 1-4 parts, mostly of plain shapes, each element odd now and then."""
    b = BOUNDARY.encode()

    def pick(plain: list[Any], odd: list[Any], p: float = 0.08) -> Any:
        return rng.choice(odd if rng.random() < p else plain)

    names = ["Sync", "image", "mask", "Prompt", "a b", "", "IMAGE", "x'y", "a=b"]
    odd_names = ["_charset_", 'x"y', "/p", "é", "a\x01b", "a\nb", "a\rb", "a\tb", "n" * 8200]
    file_names = ["a.png", "", "b c.png"]
    odd_file_names = ["é", "x\x7f", "x\r.png", "x\x00", "f" * 8200, "a;b"]
    extras = ["", "", "Content-Type: image/png", "Content-Type: text/plain"]
    extras += ["Content-Type: text/plain; charset=utf-8", "Content-Type: application/octet-stream"]
    odd_extras = ["Content-Type: text/plain; charset=latin-1", "X-Other: 1", "NoColon"]
    odd_extras += ["Content-Type: multipart/mixed; boundary=zz", "Content-Type: Multipart/related"]
    odd_extras += ["Content-Type: image/png\x01", "Content-Type: image/png; x=\x7f"]
    pieces = [b"\r\n", b"--", b[:5], b"\r\n--", b"x", b"\x00\xff", "é".encode(), b"abc" * 30]
    pieces += [b"\r\n--" + b[:-1], b"\r\n\r\n", b"\r", b"\n", b"z" * 1500]
    odd_pieces = [b"--" + b, b"\r\n--" + b + b"x", b"--" + b + b"--", b"\r\n--" + b + b" \r\n"]
    odd_pieces += [b"\r\n--" + b + b"--", b"\r\n--" + b + b"\r\n"]
    out = b""
    for _ in range(rng.randint(1, 4)):
        name = pick(names, odd_names)
        file_name = pick(file_names, odd_file_names) if rng.random() < 0.5 else None
        head = _head(name, file_name, pick(extras, odd_extras))
        if rng.random() < 0.05:
            head = head.replace('"', "", 2)  # unquoted: aiohttp's parser reads it
        data = b"".join(pick(pieces, odd_pieces, 0.03) for _ in range(rng.randint(0, 6)))
        if rng.random() < 0.05:
            data = b"--" + b + rng.choice([b"\r\n", b"--", b""]) + data
        out += f"--{BOUNDARY}\r\n{head}\r\n\r\n".encode() + data + b"\r\n"
    tails = [b"--\r\n", b"--", b"--\r\nend", b"-- \r\n"]
    odd_tails = [b"--x", b"--\x00", b"--garbage\r\n", b"", b"---", b"\r\n", b"x--"]
    return out + DELIM + pick(tails, odd_tails, 0.2)


async def test_random_forms_read_alike_either_way() -> None:
    rng = random.Random(20261207)
    split = refused = 0
    for _ in range(3000):
        body = _random_form(rng)
        if rng.random() < 0.15:  # one byte changed, inserted or removed
            at = rng.randrange(len(body))
            byte = bytes([rng.choice(b'\r\n-" ;:\\\x00\x7fa')])
            body = body[:at] + rng.choice([byte, byte + body[at : at + 1], b""]) + body[at + 1 :]
        if len(body) > SMALL.max_upload_bytes + SMALL.max_form_bytes:
            continue  # refused by its declared length alone (413), read by neither
        split += _plain(body)
        refused += (await _same(body))[0] == "error"
    assert split > 400 and refused > 400, (split, refused)


def _dotnet_form(image: bytes) -> tuple[bytes, str]:
    """As .NET's MultipartFormDataContent writes one: a quoted GUID boundary, unquoted names,
    ``filename*``, the Content-Type first."""
    b = str(uuid.UUID(int=7))
    body = (
        (
            f"--{b}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Disposition: form-data; name=Sync\r\n\r\ntrue\r\n"
            f"--{b}\r\nContent-Type: image/png\r\nContent-Disposition: form-data; name=image; "
            "filename=a.png; filename*=utf-8''a.png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{b}--\r\n".encode()
    )
    return body, f'multipart/form-data; boundary="{b}"'


IMAGES = [random.Random(size).randbytes(size) for size in (1000, 100_000, 200_000, 260_000)]


@pytest.mark.parametrize("image", IMAGES, ids=lambda i: f"{len(i)}B")
async def test_other_shapes_of_any_size_read_alike_either_way(image: bytes) -> None:
    """Above 128 KiB, aiohttp's reader over the bytes read whole paused the request's
    connection (a 500 in a real gateway)."""
    non_ascii = _form(
        (_head("Sync"), b"true"),
        (_head("image", "photo-été.png", "Content-Type: image/png"), image),
    )
    dotnet, dotnet_type = _dotnet_form(image)
    for body, ctype, file_name in [
        (non_ascii, "", "photo-été.png"),
        (dotnet, dotnet_type, "a.png"),
        (b"preamble\r\n" + non_ascii, "", "photo-été.png"),
    ]:
        assert not _plain_parts(
            body, ctype.rpartition("=")[2].strip('"').encode() or BOUNDARY.encode()
        )
        got = await _same(body, LARGE, ctype)
        assert got[0] == "ok"
        assert got[2] == {"image": image} and got[3] == {"image": file_name}


async def test_large_forms_of_other_shapes_through_a_gateway(
    fake: FakeBackend, fake_http: httpx.AsyncClient
) -> None:
    """A 200 KB form with a non-ASCII file name (httpx, curl) or .NET's shape: 200, and the
    keep-alive connection answers its next request."""
    image = IMAGES[2]
    dotnet, dotnet_type = _dotnet_form(image)
    for _ in range(2):
        res = await fake_http.post(
            "/api/ImageUpscale",
            data={"Sync": "true"},
            files={"image": ("photo-été.png", image, "image/png")},
        )
        assert res.status_code == 200, res.text
        res = await fake_http.post(
            "/api/ImageUpscale", content=dotnet, headers={"Content-Type": dotnet_type}
        )
        assert res.status_code == 200, res.text
        res = await fake_http.get("/api/jobs/nosuch")  # same connection
        assert res.status_code == 404, res.text
    got = [(u.files["image"], u.file_names["image"]) for u in fake.state.uploads]
    assert got == [(image, "photo-été.png"), (image, "a.png")] * 2
