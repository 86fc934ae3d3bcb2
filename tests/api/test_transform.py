"""CropImage and ConvertImage through a real server and real channels."""

from __future__ import annotations

import asyncio
import io
import os
from typing import Any

import grpc
import pytest
from imagetasks.v1 import (
    common_pb2,
    tasks_pb2,
    transform_service_pb2_grpc,
)
from imagetasks.v1 import (
    transform_service_pb2 as tpb,
)
from PIL import Image, features

from tests.support.grpc_helpers import rich_status, send_all, upload_messages, violated_fields
from tests.support.images import QUADRANTS, close, encode, mean_colour, png_bomb, quadrant_image

FORMATS = [
    ("jpg", common_pb2.IMAGE_FORMAT_JPEG, "JPEG", "image/jpeg", True),
    ("png", common_pb2.IMAGE_FORMAT_PNG, "PNG", "image/png", False),
    ("gif", common_pb2.IMAGE_FORMAT_GIF, "GIF", "image/gif", False),
    ("bmp", common_pb2.IMAGE_FORMAT_BMP, "BMP", "image/bmp", False),
    ("tiff", common_pb2.IMAGE_FORMAT_TIFF, "TIFF", "image/tiff", False),
    ("webp", common_pb2.IMAGE_FORMAT_WEBP, "WEBP", "image/webp", True),
]
if features.check("avif"):
    FORMATS.append(("avif", common_pb2.IMAGE_FORMAT_AVIF, "AVIF", "image/avif", True))


async def call(stub_method: Any, request_type: Any, params: Any, files: dict[str, bytes]) -> Any:
    info = None
    data = bytearray()
    async for resp in stub_method(upload_messages(request_type, params, files)):
        if resp.WhichOneof("payload") == "info":
            assert info is None, "info must come once, first"
            info = resp.info
        else:
            assert info is not None, "chunks before info"
            data += resp.chunk
    assert info is not None
    assert info.size_bytes == len(data)
    return info, bytes(data)


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> transform_service_pb2_grpc.TransformServiceStub:
    return transform_service_pb2_grpc.TransformServiceStub(channel)


@pytest.mark.parametrize(("name", "enum", "pil", "mime", "lossy"), FORMATS)
async def test_crop_round_trip_per_format(
    stub: Any, name: str, enum: int, pil: str, mime: str, lossy: bool
) -> None:
    source = encode(quadrant_image(64, 48), pil)
    params = tasks_pb2.CropImageParams(x=32, y=24, width=32, height=24)
    info, data = await call(stub.CropImage, tpb.CropImageRequest, params, {"image": source})
    assert info.format == enum and info.mime_type == mime
    assert (info.width, info.height) == (32, 24)
    out = Image.open(io.BytesIO(data))
    assert out.format == pil and out.size == (32, 24)
    # The bottom-right quadrant: exact for lossless formats, near for lossy ones.
    tol = 12 if lossy else 0
    assert close(mean_colour(out, (4, 4, 28, 20)), QUADRANTS[3], tol)


@pytest.mark.parametrize(("name", "enum", "pil", "mime", "lossy"), FORMATS)
async def test_convert_round_trip_per_format(
    stub: Any, name: str, enum: int, pil: str, mime: str, lossy: bool
) -> None:
    source = encode(quadrant_image(64, 48), "PNG")
    params = tasks_pb2.ConvertImageParams(output_format=enum, quality=95)
    info, data = await call(stub.ConvertImage, tpb.ConvertImageRequest, params, {"image": source})
    out = Image.open(io.BytesIO(data))
    assert out.format == pil and out.size == (64, 48) == (info.width, info.height)
    assert info.file_name == f"image-converted.{name}"
    tol = 12 if lossy else 0
    for i, colour in enumerate(QUADRANTS):
        x0, y0 = (i % 2) * 32, (i // 2) * 24
        assert close(mean_colour(out, (x0 + 4, y0 + 4, x0 + 28, y0 + 20)), colour, tol), name


async def test_crop_keeps_input_format_and_accepts_uploads_beyond_4mib(stub: Any) -> None:
    # Noise does not compress: a PNG over the 4 MiB message limit, sent in 1 MiB chunks.
    noise = Image.frombytes("RGB", (1400, 1400), os.urandom(1400 * 1400 * 3))
    source = encode(noise, "PNG")
    assert len(source) > 4 * 1024 * 1024
    params = tasks_pb2.CropImageParams(x=100, y=200, width=300, height=100)
    info, data = await call(stub.CropImage, tpb.CropImageRequest, params, {"image": source})
    assert info.format == common_pb2.IMAGE_FORMAT_PNG
    out = Image.open(io.BytesIO(data))
    assert out.tobytes() == noise.crop((100, 200, 400, 300)).tobytes()


async def test_convert_large_result_streams_in_chunks(stub: Any) -> None:
    noise = Image.frombytes("RGB", (1400, 1400), os.urandom(1400 * 1400 * 3))
    params = tasks_pb2.ConvertImageParams(output_format=common_pb2.IMAGE_FORMAT_BMP)
    messages = [
        r
        async for r in stub.ConvertImage(
            upload_messages(tpb.ConvertImageRequest, params, {"image": encode(noise, "PNG")})
        )
    ]
    assert len(messages) > 2
    assert all(len(m.chunk) <= 1024 * 1024 for m in messages[1:])


# --- bad input: each case gets its status, reason and field, and the server keeps serving ---

GOOD_PNG = encode(quadrant_image(), "PNG")
CROP_OK = tasks_pb2.CropImageParams(x=0, y=0, width=8, height=8)


def _truncated() -> bytes:
    return encode(quadrant_image(256, 256), "PNG")[:300]


def _truncated_jpeg() -> bytes:
    return encode(Image.frombytes("RGB", (256, 256), os.urandom(256 * 256 * 3)), "JPEG")[:2000]


async def _expect(method: Any, messages: Any) -> tuple[grpc.StatusCode, str, list[str]]:
    call_ = method()
    await send_all(call_, messages)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call_:
            pass
    err = caught.value
    status, details = rich_status(err)
    assert status.code == err.code().value[0]
    assert details["ErrorInfo"].domain == "aiserver.imagetasks.v1"
    return err.code(), details["ErrorInfo"].reason, violated_fields(details)


BAD_CASES = [
    # (case, messages, code, reason, field)
    (
        "empty upload",
        lambda: [tpb.CropImageRequest(params=CROP_OK)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "MISSING_INPUT",
        "image",
    ),
    (
        "empty file",
        lambda: upload_messages(tpb.CropImageRequest, CROP_OK, {"image": b""}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "EMPTY_IMAGE",
        "image",
    ),
    (
        "no params",
        lambda: list(upload_messages(tpb.CropImageRequest, CROP_OK, {"image": GOOD_PNG}))[1:],
        grpc.StatusCode.INVALID_ARGUMENT,
        "PARAMS_NOT_FIRST",
        "params",
    ),
    (
        "params after chunks",
        lambda: [
            *list(upload_messages(tpb.CropImageRequest, CROP_OK, {"image": GOOD_PNG}))[1:2],
            tpb.CropImageRequest(params=CROP_OK),
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
        "PARAMS_NOT_FIRST",
        "params",
    ),
    (
        "params twice",
        lambda: [tpb.CropImageRequest(params=CROP_OK), tpb.CropImageRequest(params=CROP_OK)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "PARAMS_REPEATED",
        "params",
    ),
    (
        "unknown input field",
        lambda: upload_messages(tpb.CropImageRequest, CROP_OK, {"mask": GOOD_PNG}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_INPUT",
        "chunk.field",
    ),
    (
        "truncated png",
        lambda: upload_messages(tpb.CropImageRequest, CROP_OK, {"image": _truncated()}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "IMAGE_TRUNCATED",
        "image",
    ),
    (
        "truncated jpeg",
        lambda: upload_messages(tpb.CropImageRequest, CROP_OK, {"image": _truncated_jpeg()}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "IMAGE_TRUNCATED",
        "image",
    ),
    (
        "not an image",
        lambda: upload_messages(
            tpb.CropImageRequest, CROP_OK, {"image": b"%PDF-1.4 definitely not pixels" * 10}
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "IMAGE_UNREADABLE",
        "image",
    ),
    (
        "decompression bomb",
        lambda: upload_messages(tpb.CropImageRequest, CROP_OK, {"image": png_bomb()}),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "IMAGE_TOO_MANY_PIXELS",
        "image",
    ),
    (
        "rectangle outside the image",
        lambda: upload_messages(
            tpb.CropImageRequest,
            tasks_pb2.CropImageParams(x=40, y=0, width=40, height=10),
            {"image": GOOD_PNG},
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "CROP_OUT_OF_BOUNDS",
        "params.width",
    ),
    (
        "unknown format",
        lambda: upload_messages(
            tpb.CropImageRequest,
            tasks_pb2.CropImageParams(x=0, y=0, width=8, height=8, output_format=99),  # type: ignore[arg-type]
            {"image": GOOD_PNG},
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNSUPPORTED_FORMAT",
        "params.output_format",
    ),
]


@pytest.mark.parametrize(
    ("case", "messages", "code", "reason", "field"), BAD_CASES, ids=[c[0] for c in BAD_CASES]
)
async def test_bad_crop_input(
    stub: Any, case: str, messages: Any, code: grpc.StatusCode, reason: str, field: str
) -> None:
    got_code, got_reason, fields = await _expect(stub.CropImage, messages())
    assert (got_code, got_reason) == (code, reason)
    assert field in fields
    # The server keeps serving.
    info, _ = await call(stub.CropImage, tpb.CropImageRequest, CROP_OK, {"image": GOOD_PNG})
    assert info.width == 8


async def test_convert_requires_a_format(stub: Any) -> None:
    code, reason, fields = await _expect(
        stub.ConvertImage,
        upload_messages(
            tpb.ConvertImageRequest, tpb.ConvertImageRequest().params, {"image": GOOD_PNG}
        ),
    )
    assert (code, reason, fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "MISSING_FORMAT",
        ["params.output_format"],
    )


@pytest.mark.parametrize("settings_overrides", [{"max_upload_bytes": 100_000}])
async def test_oversize_upload_is_refused_while_streaming(stub: Any, tmp_path: Any) -> None:
    big = os.urandom(400_000)  # refused once 100 kB have arrived, whatever the content
    code, reason, fields = await _expect(
        stub.CropImage, upload_messages(tpb.CropImageRequest, CROP_OK, {"image": big}, chunk=50_000)
    )
    assert (code, reason, fields) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "UPLOAD_TOO_LARGE",
        ["image"],
    )
    # Nothing is left behind in the spool.
    assert list((tmp_path / "data" / "spool" / "tmp").iterdir()) == []


async def test_bad_quality(stub: Any) -> None:
    params = tasks_pb2.ConvertImageParams(output_format=common_pb2.IMAGE_FORMAT_JPEG, quality=0)
    code, reason, fields = await _expect(
        stub.ConvertImage, upload_messages(tpb.ConvertImageRequest, params, {"image": GOOD_PNG})
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert reason == "INVALID_QUALITY"
    assert fields == ["params.quality"]


@pytest.mark.parametrize("settings_overrides", [{"spool_memory_mb": 0}])  # written to disk
async def test_a_client_abort_mid_upload_leaves_no_spool_file(stub: Any, tmp_path: Any) -> None:
    spool_tmp = tmp_path / "data" / "spool" / "tmp"
    call = stub.CropImage()
    await call.write(tpb.CropImageRequest(params=CROP_OK))
    for _ in range(3):  # past the size written inline: the writer thread is running
        await call.write(
            tpb.CropImageRequest(
                chunk=common_pb2.FileChunk(field="image", data=os.urandom(1 << 20))
            )
        )
    for _ in range(500):
        if list(spool_tmp.iterdir()):
            break
        await asyncio.sleep(0.01)
    assert list(spool_tmp.iterdir()), "the upload should be spooled meanwhile"
    call.cancel()
    for _ in range(500):
        if not list(spool_tmp.iterdir()):
            break
        await asyncio.sleep(0.01)
    assert list(spool_tmp.iterdir()) == []


# --- uploads held in memory (AISERVER_SPOOL_MEMORY_MB): what is held is given back ---------


async def _held(service: Any, n: int, messages: int = 0) -> None:
    """``n`` bytes held; ``messages``: kept as received, each with its message's header."""
    for _ in range(500):
        if n <= service.spool.memory.used <= n + 64 * messages:
            return
        await asyncio.sleep(0.01)
    assert n <= service.spool.memory.used <= n + 64 * messages


async def test_an_input_within_the_memory_budget_never_touches_the_disk(
    service: Any, stub: Any, tmp_path: Any
) -> None:
    spool_tmp = tmp_path / "data" / "spool" / "tmp"
    noise = Image.frombytes("RGB", (1400, 1400), os.urandom(1400 * 1400 * 3))
    source = encode(noise, "BMP")  # 5.6 MB: written to a file before the budget
    call = stub.CropImage()
    await call.write(tpb.CropImageRequest(params=CROP_OK))
    for start in range(0, 3 << 20, 1 << 20):
        await call.write(
            tpb.CropImageRequest(
                chunk=common_pb2.FileChunk(field="image", data=source[start : start + (1 << 20)])
            )
        )
    await _held(service, 3 << 20, messages=3)
    assert list(spool_tmp.iterdir()) == []
    for start in range(3 << 20, len(source), 1 << 20):
        await call.write(
            tpb.CropImageRequest(
                chunk=common_pb2.FileChunk(field="image", data=source[start : start + (1 << 20)])
            )
        )
    await call.done_writing()
    messages = [m async for m in call]
    out = Image.open(io.BytesIO(b"".join(m.chunk for m in messages[1:])))
    assert out.tobytes() == noise.crop((0, 0, 8, 8)).tobytes()
    assert list(spool_tmp.iterdir()) == []
    await _held(service, 0)


async def test_a_cancelled_upload_gives_its_memory_back(service: Any, stub: Any) -> None:
    call = stub.ConvertImage()
    params = tasks_pb2.ConvertImageParams(output_format=common_pb2.IMAGE_FORMAT_PNG)
    await call.write(tpb.ConvertImageRequest(params=params))
    for _ in range(3):
        await call.write(
            tpb.ConvertImageRequest(
                chunk=common_pb2.FileChunk(field="image", data=os.urandom(1 << 20))
            )
        )
    await _held(service, 3 << 20, messages=3)
    call.cancel()  # a client that goes away mid-upload
    await _held(service, 0)


@pytest.mark.parametrize("settings_overrides", [{"max_upload_bytes": 3 << 20}])
async def test_a_failed_upload_gives_its_memory_back(service: Any, stub: Any) -> None:
    noise = os.urandom(2 << 20)  # not an image: refused after the upload, in the pool
    code, reason, _ = await _expect(
        stub.ConvertImage,
        upload_messages(
            tpb.ConvertImageRequest,
            tasks_pb2.ConvertImageParams(output_format=common_pb2.IMAGE_FORMAT_PNG),
            {"image": noise},
            chunk=1 << 20,
        ),
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "IMAGE_UNREADABLE")
    await _held(service, 0)
    code, reason, _ = await _expect(  # past the request's limit while held
        stub.CropImage,
        upload_messages(tpb.CropImageRequest, CROP_OK, {"image": os.urandom(4 << 20)}),
    )
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "UPLOAD_TOO_LARGE")
    await _held(service, 0)
