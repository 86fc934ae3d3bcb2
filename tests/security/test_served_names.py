"""Names handed back to clients (output file names) never carry ``..``, separators or
percent-escapes, however the uploaded name was spelled; a multipart name that is not UTF-8 is
400, not 500."""

from __future__ import annotations

import re

import grpc
import httpx
import pytest
from imagetasks.v1 import common_pb2, tasks_pb2, transform_service_pb2_grpc
from imagetasks.v1 import transform_service_pb2 as tpb

from aiserver.api.uploads import clean_name
from aiserver.server import Service
from tests.support.images import encode, quadrant_image

PNG = encode(quadrant_image(16, 12), "PNG")
HOSTILE_NAMES = [
    "..",
    "...",
    "../../etc/passwd",
    "..\\..\\windows\\win.ini",
    "..%2f.",
    "..%2F..%2Fx.png",
    "%2e%2e%2f%2e%2e%2fx.png",
    "%252e%252e%252fx.png",
    "a/..%252f..%252fb.png",
    "....png",
    "x..png",
    ".hidden.png",
    "name.png.",
    "%00.png",
    "x\x00y.png",
    "\u202e.gnp",
    "C:\\x\\..\\y.png",
    "%",
    "100%.png",
    "",
]


def assert_safe(name: str) -> None:
    assert name, name
    assert ".." not in name, name
    assert "/" not in name and "\\" not in name, name
    assert "%" not in name, name
    assert name.isprintable(), name
    assert not name.startswith(".") and not name.endswith("."), name


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_clean_names_are_safe(name: str) -> None:
    assert_safe(clean_name(name))


def test_clean_names_keep_ordinary_names() -> None:
    for name in ("photo.png", "my photo (1).jpeg", "été.webp", "a.b.c.png"):
        assert clean_name(name) == name
    assert clean_name("dir/sub/photo.png") == "photo.png"
    assert clean_name("photo%20one.png") == "photo one.png"


async def test_served_names_over_grpc_are_safe(channel: grpc.aio.Channel) -> None:
    stub = transform_service_pb2_grpc.TransformServiceStub(channel)
    for name in HOSTILE_NAMES:
        replies = [
            r
            async for r in stub.ConvertImage(
                iter(
                    [
                        tpb.ConvertImageRequest(
                            params=tasks_pb2.ConvertImageParams(
                                output_format=common_pb2.IMAGE_FORMAT_PNG
                            )
                        ),
                        tpb.ConvertImageRequest(
                            chunk=common_pb2.FileChunk(field="image", data=PNG, file_name=name)
                        ),
                    ]
                ),
                timeout=30,
            )
        ]
        served = replies[0].info.file_name
        assert_safe(served)
        assert served.endswith("-converted.png") or served.endswith(".png"), served


async def test_served_names_over_http_are_safe(service: Service) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http_port}") as http:
        for name in HOSTILE_NAMES:
            if "\x00" in name or not name:
                continue  # not representable in a header; no file name: a text field
            res = await http.post(
                "/api/ConvertImage",
                data={"OutputFormat": "png"},
                files={"image": (name, PNG, "image/png")},
            )
            assert res.status_code == 200, (name, res.text)
            disposition = res.headers["content-disposition"]
            plain = re.search(r'filename="([^"]*)"', disposition)
            assert plain is not None, disposition
            assert_safe(plain.group(1))


@pytest.mark.parametrize("where", ["filename", "name"])
async def test_a_multipart_name_that_is_not_utf8_is_400(service: Service, where: str) -> None:
    name, file_name = (
        (b"image", b"\xff\xfe\xc3(.png") if where == "filename" else (b"im\xff", b"a.png")
    )
    body = (
        b'--B\r\nContent-Disposition: form-data; name="OutputFormat"\r\n\r\npng\r\n'
        b'--B\r\nContent-Disposition: form-data; name="'
        + name
        + b'"; filename="'
        + file_name
        + b'"\r\nContent-Type: image/png\r\n\r\n'
        + PNG
        + b"\r\n--B--\r\n"
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http_port}") as http:
        for path in ("/api/ConvertImage", "/v1/images:convert"):
            res = await http.post(
                path, content=body, headers={"Content-Type": "multipart/form-data; boundary=B"}
            )
            assert res.status_code == 400, res.text
            status = res.json()["responseStatus"]
            assert status["errorCode"] == "INVALID_ENCODING"
            assert status["errors"][0]["fieldName"] == where
