"""The shim reads plain ``Content-Disposition`` and ``Content-Type`` headers without aiohttp's
parsers (the costly parts of a form's CPU): for every header it reads that way, the result is
exactly aiohttp's."""

from __future__ import annotations

import random
import warnings

from aiohttp.helpers import parse_content_type
from aiohttp.multipart import content_disposition_filename, parse_content_disposition

from aiserver.gateway.uploads import _plain_disposition, media_type

HEADERS = [
    'form-data; name="image"; filename="input.png"',
    'form-data; name="Sync"',
    'Form-Data;name="a";filename=""',
    'form-data; name="a" ; filename="b c.png" ',
    'form-data; NAME="Image"; FileName="é.png"',
    'form-data; name=""',
    'form-data; filename="x"; name="y"',
    # Shapes left to aiohttp: escapes, duplicates, RFC 2231, leading "/", bare tokens, ...
    'form-data; name="a"; name="b"',
    'form-data; name="/x"',
    'form-data; name="a\\"b"',
    'form-data; name="a;b"',
    "form-data; name=a",
    "form-data; name*=UTF-8''%C3%A9",
    "form-data",
    "form-data;",
    'attachment; name="a"',
    'form-dataX; name="a"',
    'form-data; name="a"; filename="/etc/passwd"',
    'form-data; name="a"; filename="..\\\\x"',
    ' form-data; name="a"',
]


def _aiohttp(header: str) -> tuple[str | None, str | None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, params = parse_content_disposition(header)
        return content_disposition_filename(params, "name"), content_disposition_filename(
            params, "filename"
        )


def test_plain_headers_read_as_aiohttp_reads_them() -> None:
    taken = [h for h in HEADERS if _plain_disposition(h) is not None]
    assert taken[:7] == HEADERS[:7]  # the shapes clients send
    for header in taken:
        assert _plain_disposition(header) == _aiohttp(header), header


def test_random_headers_read_as_aiohttp_reads_them() -> None:
    rng = random.Random(15)
    alphabet = 'form-datFORM; =""\\/*\t.é_abc'
    taken = 0
    for _ in range(20000):
        header = "form-data" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        plain = _plain_disposition(header)
        if plain is not None:
            taken += 1
            assert plain == _aiohttp(header), header
    assert taken > 100  # the fuzz reached the fast path


class _Headers:
    def __init__(self, content_type: str) -> None:
        self.headers = {"Content-Type": content_type}
        self.content_type = _aiohttp_media_type(content_type)


def _aiohttp_media_type(raw: str) -> str:
    return parse_content_type(raw)[0]


MEDIA_TYPES = [
    "multipart/form-data; boundary=a8f9e7d6c5",
    "Multipart/Form-Data;boundary=x",
    " multipart/form-data ; boundary=x",
    "application/json",
    "application/x-ndjson; charset=utf-8",
    "text/plain;charset=utf-8",
    # Left to aiohttp's parser:
    "multipart/form-data (comment); boundary=x",
    "multipart /form-data",
    "multipart",
    "",
    "form-data",
    '"multipart/form-data"',
]


def test_media_types_read_as_aiohttp_reads_them() -> None:
    for raw in MEDIA_TYPES:
        got = media_type(_Headers(raw))  # type: ignore[arg-type]
        assert got == _aiohttp_media_type(raw), raw
    rng = random.Random(15)
    alphabet = "multipart/form-data; boundary=x\t()\"'é,"
    for _ in range(5000):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert media_type(_Headers(raw)) == _aiohttp_media_type(raw), raw  # type: ignore[arg-type]
