"""CropImage and ConvertImage over HTTP, as AI Server's clients send them, through the real
service: curl's multipart, the bytes back with their Content-Type, and the 4xx answers."""

from __future__ import annotations

import asyncio
import io
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from aiserver.gateway import Gateway
from tests.gateway.conftest import curl
from tests.support.images import QUADRANTS, close, encode, mean_colour, quadrant_image


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "image.jpg"
    path.write_bytes(encode(quadrant_image(1024, 1024), "JPEG", quality=95))
    return path


async def test_seed_crop_with_curl(gateway: Gateway, photo: Path, tmp_path: Path) -> None:
    # The seed: CropImage { X = 120, Y = 120, Width = 720, Height = 720 } + UploadFile("image").
    res = await curl(
        f"{gateway.url}/api/CropImage",
        *("-F", "X=120", "-F", "Y=120", "-F", "Width=720", "-F", "Height=720"),
        *("-F", f"image=@{photo};filename=image.jpg"),
        tmp_path=tmp_path,
    )
    assert res.status == 200, res.body
    assert res.content_type == "image/jpeg"
    out = Image.open(io.BytesIO(res.body))
    assert out.format == "JPEG" and out.size == (720, 720)
    assert "content-length: " + str(len(res.body)) in res.headers.lower()


async def test_seed_convert_with_curl(gateway: Gateway, photo: Path, tmp_path: Path) -> None:
    res = await curl(
        f"{gateway.url}/api/ConvertImage",
        *("-F", "OutputFormat=webp", "-F", f"image=@{photo}"),
        tmp_path=tmp_path,
    )
    assert res.status == 200, res.body
    assert res.content_type == "image/webp"
    out = Image.open(io.BytesIO(res.body))
    assert out.format == "WEBP" and out.size == (1024, 1024)


@pytest.mark.parametrize(
    ("given", "pil", "mime"),
    [
        ("jpg", "JPEG", "image/jpeg"),
        ("JPEG", "JPEG", "image/jpeg"),
        ("Png", "PNG", "image/png"),
        ("IMAGE_FORMAT_GIF", "GIF", "image/gif"),
        ("4", "BMP", "image/bmp"),
        ("tif", "TIFF", "image/tiff"),
    ],
)
async def test_output_format_spellings(
    http: httpx.AsyncClient, given: str, pil: str, mime: str
) -> None:
    res = await http.post(
        "/api/convertimage",
        data={"outputFormat": given},
        files={"image": ("a.png", encode(quadrant_image(), "PNG"), "image/png")},
    )
    assert res.status_code == 200, res.text
    assert res.headers["content-type"] == mime
    assert Image.open(io.BytesIO(res.content)).format == pil


@pytest.mark.parametrize("name", ["x", "X"])
async def test_field_names_case_insensitive_and_crop_is_right(
    http: httpx.AsyncClient, name: str
) -> None:
    res = await http.post(
        "/api/CropImage",
        data={name: "32", "y": "24", "WIDTH": "32", "height": "24", "output_format": "png"},
        files={"image": ("a.png", encode(quadrant_image(64, 48), "PNG"), "image/png")},
    )
    assert res.status_code == 200, res.text
    out = Image.open(io.BytesIO(res.content))
    assert out.size == (32, 24)
    assert close(mean_colour(out, (4, 4, 28, 20)), QUADRANTS[3], 0)


async def test_file_before_fields_is_spooled_and_still_works(
    http: httpx.AsyncClient, tmp_path: Path
) -> None:
    image = encode(quadrant_image(64, 48), "PNG")
    boundary = "b0und"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + (
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="OutputFormat"\r\n\r\n'
            f"gif\r\n--{boundary}--\r\n"
        ).encode()
    )
    res = await http.post(
        "/api/ConvertImage",
        content=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert res.status_code == 200, res.text
    assert res.headers["content-type"] == "image/gif"
    # The spooled temp file is gone.
    left = await asyncio.to_thread(lambda: list(tmp_path.glob("aiserver-gateway-*")))
    assert left == []


async def test_field_after_streamed_file_is_refused(http: httpx.AsyncClient) -> None:
    image = encode(quadrant_image(64, 48), "PNG")
    boundary = "b0und"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="OutputFormat"\r\n\r\npng\r\n'
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        ).encode()
        + image
        + (
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="Quality"\r\n\r\n'
            f"50\r\n--{boundary}--\r\n"
        ).encode()
    )
    res = await http.post(
        "/api/ConvertImage",
        content=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert res.status_code == 400
    status = res.json()["responseStatus"]
    assert status["errorCode"] == "FIELD_AFTER_FILE"
    assert status["errors"][0]["fieldName"] == "Quality"


def _status(res: httpx.Response) -> dict[str, Any]:
    body = res.json()
    assert set(body) == {"responseStatus"}, body
    return dict(body["responseStatus"])


async def test_no_image(http: httpx.AsyncClient) -> None:
    # Valid parameters (they are checked first, on arrival), but no file.
    form = {"X": (None, "1"), "Width": (None, "4"), "Height": (None, "4")}
    res = await http.post("/api/CropImage", files=form)
    assert res.status_code == 400
    status = _status(res)
    assert status["errorCode"] == "MISSING_INPUT"
    assert [e["fieldName"] for e in status["errors"]] == ["image"]
    assert status["meta"]["grpcCode"] == "INVALID_ARGUMENT"


async def test_wrong_type(http: httpx.AsyncClient) -> None:
    res = await http.post(
        "/api/CropImage",
        data={"X": "abc", "Y": "1.5", "Width": "8", "Height": "8"},
        files={"image": ("a.png", encode(quadrant_image(), "PNG"), "image/png")},
    )
    assert res.status_code == 400
    status = _status(res)
    assert status["errorCode"] == "INVALID_PARAMETERS"
    assert {e["fieldName"]: e["errorCode"] for e in status["errors"]} == {
        "X": "INVALID_VALUE",
        "Y": "INVALID_VALUE",
    }


async def test_unknown_format_lists_the_known_ones(http: httpx.AsyncClient) -> None:
    res = await http.post(
        "/api/ConvertImage",
        data={"OutputFormat": "pdf"},
        files={"image": ("a.png", encode(quadrant_image(), "PNG"), "image/png")},
    )
    assert res.status_code == 400
    message = _status(res)["errors"][0]["message"]
    assert "webp" in message and "jpeg" in message


async def test_server_validation_names_fields_as_ai_server_does(http: httpx.AsyncClient) -> None:
    res = await http.post(
        "/api/CropImage",
        data={"X": "40", "Y": "0", "Width": "40", "Height": "10"},
        files={"image": ("a.png", encode(quadrant_image(64, 48), "PNG"), "image/png")},
    )
    assert res.status_code == 400
    status = _status(res)
    assert status["errorCode"] == "CROP_OUT_OF_BOUNDS"
    assert "Width" in [e["fieldName"] for e in status["errors"]]


async def test_unknown_task(http: httpx.AsyncClient) -> None:
    res = await http.post("/api/PaintMeAPicture", files={"image": ("a.png", b"x", "image/png")})
    assert res.status_code == 404
    status = _status(res)
    assert status["errorCode"] == "UNKNOWN_TASK"
    assert "CropImage" in status["message"]


async def test_wrong_content_type(http: httpx.AsyncClient) -> None:
    res = await http.post("/api/CropImage", json={"x": 1, "y": 1, "width": 2, "height": 2})
    assert res.status_code == 415
    assert _status(res)["errorCode"] == "UNSUPPORTED_MEDIA_TYPE"


async def test_get_on_a_task_is_405(http: httpx.AsyncClient) -> None:
    res = await http.get("/api/CropImage")
    assert res.status_code == 405
    assert res.headers["allow"] == "POST"
    assert _status(res)["errorCode"] == "METHOD_NOT_ALLOWED"


async def test_malformed_multipart(http: httpx.AsyncClient) -> None:
    res = await http.post(
        "/api/CropImage",
        content=b"--nope\r\nthis is not a part",
        headers={"Content-Type": "multipart/form-data; boundary=other"},
    )
    assert res.status_code == 400
    assert _status(res)["errorCode"] == "MALFORMED_MULTIPART"


async def test_not_an_image(http: httpx.AsyncClient) -> None:
    res = await http.post(
        "/api/CropImage",
        data={"X": "0", "Y": "0", "Width": "1", "Height": "1"},
        files={"image": ("a.pdf", b"%PDF-1.4 not pixels" * 20, "application/pdf")},
    )
    assert res.status_code == 400
    assert _status(res)["errorCode"] == "IMAGE_UNREADABLE"


@pytest.mark.parametrize("gateway_overrides", [{"max_upload_bytes": 50_000}])
async def test_oversize_upload_is_413_at_the_gateway(gateway: Gateway, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * 400_000)
    res = await curl(
        f"{gateway.url}/api/ConvertImage",
        *("-F", "OutputFormat=png", "-F", f"image=@{big}"),
        tmp_path=tmp_path,
    )
    assert res.status == 413
    status = json.loads(res.body)["responseStatus"]
    assert status["errorCode"] == "UPLOAD_TOO_LARGE"


@pytest.mark.parametrize("settings_overrides", [{"max_upload_bytes": 100_000}])
@pytest.mark.parametrize("gateway_overrides", [{"max_upload_bytes": 10_000_000}])
async def test_oversize_upload_refused_by_the_server_is_413(
    http: httpx.AsyncClient,
) -> None:
    res = await http.post(
        "/api/ConvertImage",
        data={"OutputFormat": "png"},
        files={"image": ("big.bin", b"\0" * 3_000_000, "application/octet-stream")},
    )
    assert res.status_code == 413
    status = _status(res)
    assert status["errorCode"] == "UPLOAD_TOO_LARGE"
    assert status["meta"]["grpcCode"] == "RESOURCE_EXHAUSTED"


async def test_v1_route_streams_ndjson_from_the_annotation(http: httpx.AsyncClient) -> None:
    source = encode(quadrant_image(64, 48), "PNG")
    res = await http.post(
        "/v1/images:crop",
        data={"x": "0", "y": "0", "width": "10", "height": "8", "outputFormat": "IMAGE_FORMAT_PNG"},
        files={"image": ("a.png", source, "image/png")},
    )
    assert res.status_code == 200, res.text
    assert res.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in res.text.splitlines()]
    assert lines[0]["info"]["mimeType"] == "image/png"
    assert lines[0]["info"]["width"] == 10
    assert all("chunk" in line for line in lines[1:])


async def test_v1_route_is_strict_about_unknown_fields(http: httpx.AsyncClient) -> None:
    res = await http.post(
        "/v1/images:convert",
        data={"outputFormat": "png", "colour": "blue"},
        files={"image": ("a.png", encode(quadrant_image(), "PNG"), "image/png")},
    )
    assert res.status_code == 400
    assert _status(res)["errors"][0] == {
        "fieldName": "colour",
        "errorCode": "UNKNOWN_FIELD",
        "message": "colour: no such field",
    }


async def test_v1_upload_as_ndjson_request_stream(http: httpx.AsyncClient) -> None:
    import base64

    source = encode(quadrant_image(64, 48), "PNG")
    lines = [
        {"params": {"outputFormat": "IMAGE_FORMAT_BMP"}},
        {"chunk": {"field": "image", "data": base64.b64encode(source[:100]).decode()}},
        {"chunk": {"field": "image", "data": base64.b64encode(source[100:]).decode()}},
    ]
    res = await http.post(
        "/v1/images:convert",
        content="\n".join(json.dumps(x) for x in lines).encode(),
        headers={"Content-Type": "application/x-ndjson", "Accept": "text/event-stream"},
    )
    assert res.status_code == 200, res.text
    assert res.headers["content-type"].startswith("text/event-stream")
    assert res.text.startswith("event: info\ndata: {")
    assert "\n\nevent: chunk\ndata: " in res.text


async def test_request_id_and_authorization_go_through(http: httpx.AsyncClient) -> None:
    res = await http.post(
        "/api/ConvertImage",
        data={"OutputFormat": "png"},
        files={"image": ("a.png", encode(quadrant_image(), "PNG"), "image/png")},
        headers={"X-Request-Id": "req-123", "Authorization": "Bearer k1"},
    )
    assert res.status_code == 200
    assert res.headers["x-request-id"] == "req-123"
    res = await http.get("/nowhere")
    assert res.status_code == 404 and len(res.headers["x-request-id"]) == 16


@pytest.fixture
def noise_png(tmp_path: Path) -> tuple[Path, Image.Image]:
    noise = Image.frombytes("RGB", (1400, 1400), os.urandom(1400 * 1400 * 3))
    path = tmp_path / "noise.png"
    path.write_bytes(encode(noise, "PNG"))
    return path, noise


async def test_curl_crop_of_a_file_over_4_mib(
    gateway: Gateway, noise_png: tuple[Path, Image.Image], tmp_path: Path
) -> None:
    path, noise = noise_png
    res = await curl(
        f"{gateway.url}/api/CropImage",
        *("-F", "X=100", "-F", "Y=200", "-F", "Width=300", "-F", "Height=100"),
        *("-F", f"image=@{path}"),
        tmp_path=tmp_path,
    )
    assert res.status == 200, res.body
    assert res.content_type == "image/png"
    out = Image.open(io.BytesIO(res.body))
    assert out.tobytes() == noise.crop((100, 200, 400, 300)).tobytes()


@pytest.mark.parametrize("gateway_overrides", [{"max_upload_bytes": 50_000}])
async def test_declared_oversize_body_is_refused_before_reading(
    gateway: Gateway, noise_png: tuple[Path, Image.Image], tmp_path: Path
) -> None:
    path, _ = noise_png
    res = await curl(
        f"{gateway.url}/api/CropImage",
        *("-F", "X=1", "-F", f"image=@{path}"),
        tmp_path=tmp_path,
    )
    assert res.status == 413
    assert json.loads(res.body)["responseStatus"]["errorCode"] == "UPLOAD_TOO_LARGE"


def _servicestack_body(boundary: str, image: bytes) -> bytes:
    """The bytes ServiceStack's PostFilesWithRequest writes: no space after ';', text/plain."""
    out = b""
    for key, value in (("X", "8"), ("Y", "8"), ("Width", "16"), ("Height", "8")):
        out += (
            f'--{boundary}\r\nContent-Disposition: form-data;name="{key}"\r\n'
            f"Content-Type: text/plain;charset=utf-8\r\n\r\n{value}\r\n"
        ).encode()
    out += (
        f'--{boundary}\r\nContent-Disposition: form-data;name="image";filename="image.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return out + image + f"\r\n--{boundary}--\r\n".encode()


def _dotnet_body(boundary: str, image: bytes) -> bytes:
    """The bytes .NET's MultipartFormDataContent writes: unquoted names, filename*."""
    out = b""
    for key, value in (("X", "8"), ("Y", "8"), ("Width", "16"), ("Height", "8")):
        out += (
            f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Disposition: form-data; name={key}\r\n\r\n{value}\r\n"
        ).encode()
    out += (
        f"--{boundary}\r\nContent-Disposition: form-data; name=image; filename=image.jpg; "
        "filename*=utf-8''image.jpg\r\n\r\n"
    ).encode()
    return out + image + f"\r\n--{boundary}--\r\n".encode()


@pytest.mark.parametrize("make", [_servicestack_body, _dotnet_body])
async def test_csharp_client_wire_formats(http: httpx.AsyncClient, make: Any) -> None:
    boundary = "8dc6a4f1d2b94c1"
    image = encode(quadrant_image(64, 48), "JPEG")
    res = await http.post(
        "/api/CropImage",
        content=make(boundary, image),
        headers={"Content-Type": f'multipart/form-data; boundary="{boundary}"'},
    )
    assert res.status_code == 200, res.text
    assert res.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(res.content)).size == (16, 8)
