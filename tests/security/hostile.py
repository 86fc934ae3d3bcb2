"""Hostile inputs, made here and now, and the batches that throw them at a running service
through gRPC and HTTP. Every answer must be a clean client error (a 4xx status with a
reason) or a correct result; never INTERNAL, UNKNOWN or a 5xx, and never a dead server.

Used by ``test_hostile_inputs.py`` (one in-process service per batch) and by
``test_hostile_memory.py`` (a server process whose memory is measured around the batches).
"""

from __future__ import annotations

import gzip
import io
import math
import random
import struct
import zipfile
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imagetasks.v1 import artifact_service_pb2 as apb
from imagetasks.v1 import (
    artifact_service_pb2_grpc,
    common_pb2,
    job_service_pb2_grpc,
    tasks_pb2,
    transform_service_pb2,
    transform_service_pb2_grpc,
)
from imagetasks.v1 import job_service_pb2 as jpb
from PIL import Image, PngImagePlugin

from tests.support.generation import generate
from tests.support.grpc_helpers import rich_status, send_all, upload_messages
from tests.support.images import encode, png_bomb, quadrant_image

CLIENT_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)

# --- files ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    label: str
    data: bytes
    expect: str
    """``error``: a client error; ``ok``: a correct result; ``either``: one of the two
    (decoders may legitimately repair some damage)."""
    payload: bytes = b""
    """Bytes smuggled in a polyglot that must not survive into any output."""


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_deflate_bomb(side: int = 8000) -> bytes:
    """A genuine bomb: a few kB that inflate to ``side`` x ``side`` 1-bit pixels."""
    row = b"\x00" + b"\x00" * math.ceil(side / 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")
    )


def png_text_bomb() -> bytes:
    """A small valid PNG with a zTXt chunk inflating to 64 MB."""
    base = encode(quadrant_image(16, 16), "PNG")
    comp = zlib.compressobj(9)
    blob = b"".join(comp.compress(b"\x00" * (1 << 20)) for _ in range(64)) + comp.flush()
    ztxt = _chunk(b"zTXt", b"Comment\x00\x00" + blob)
    return base[:33] + ztxt + base[33:]


def gif_bomb(w: int = 65535, h: int = 65535) -> bytes:
    screen = struct.pack("<HHBBB", w, h, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + image + b"\x3b"


def gif_many_frames(frames: int = 3000) -> bytes:
    frame = (
        b"\x21\xf9\x04\x00\x00\x00\x00\x00"  # graphic control, no delay
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, 64, 64, 0)
        + b"\x02\x02\x44\x01\x00"
    )
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    screen = struct.pack("<HHBBB", 64, 64, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    return b"GIF89a" + screen + loop + frame * frames + b"\x3b"


def webp_bomb(side: int = 16384) -> bytes:
    small = encode(Image.new("RGB", (1, 1)), "WEBP", lossless=True)
    vp8l = small[12:]
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00"
    vp8x += (side - 1).to_bytes(3, "little") + (side - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + vp8l
    return b"RIFF" + struct.pack("<I", len(body)) + body


def jpeg_bomb(w: int = 65500, h: int = 65500) -> bytes:
    data = bytearray(encode(quadrant_image(16, 16), "JPEG"))
    at = data.index(b"\xff\xc0")
    data[at + 5 : at + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def tiff_bomb(w: int = 100_000, h: int = 100_000) -> bytes:
    entries = [
        (256, 4, 1, struct.pack("<I", w)),
        (257, 4, 1, struct.pack("<I", h)),
        (258, 3, 1, struct.pack("<HH", 8, 0)),
        (259, 3, 1, struct.pack("<HH", 1, 0)),
        (262, 3, 1, struct.pack("<HH", 1, 0)),
        (273, 4, 1, b""),  # strip offset, filled below
        (277, 3, 1, struct.pack("<HH", 1, 0)),
        (278, 4, 1, struct.pack("<I", h)),
        (279, 4, 1, struct.pack("<I", 16)),
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    data_at = 8 + ifd_size
    out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        out += struct.pack("<HHI", tag, typ, count) + (value or struct.pack("<I", data_at))
    return out + struct.pack("<I", 0) + b"\x00" * 16


def bmp_bomb(w: int = 100_000, h: int = 100_000) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 12, 0, 0, 54) + info + b"\x00" * 12


def bombs() -> list[Hostile]:
    return [
        Hostile("png header bomb", png_bomb(), "error"),
        Hostile("png deflate bomb", png_deflate_bomb(), "error"),
        Hostile("png zTXt bomb", png_text_bomb(), "either"),
        Hostile("gif bomb", gif_bomb(), "error"),
        Hostile("gif 3000 frames", gif_many_frames(), "error"),
        Hostile("webp canvas bomb", webp_bomb(), "error"),
        Hostile("jpeg bomb", jpeg_bomb(), "error"),
        Hostile("tiff bomb", tiff_bomb(), "error"),
        Hostile("bmp bomb", bmp_bomb(), "error"),
    ]


def broken() -> list[Hostile]:
    im = quadrant_image(48, 40)
    png, jpeg = encode(im, "PNG"), encode(im, "JPEG")
    gif, webp = encode(im, "GIF"), encode(im, "WEBP")
    tiff, bmp = encode(im, "TIFF"), encode(im, "BMP")
    flipped = bytearray(png)
    for i in range(60, len(flipped) - 20, 7):
        flipped[i] ^= 0x5A
    rng = random.Random(7)
    noisy_jpeg = bytearray(jpeg)
    for i in range(len(noisy_jpeg) // 2, len(noisy_jpeg) - 4, 3):
        noisy_jpeg[i] = rng.randrange(256)
    cases = [
        Hostile("png header only", png[:33], "error"),
        Hostile("png half", png[: len(png) // 2], "error"),
        Hostile("png without IEND", png[:-12], "either"),
        Hostile("png corrupt IDAT", bytes(flipped), "error"),
        Hostile("jpeg half", jpeg[: len(jpeg) // 2], "either"),
        Hostile("jpeg noisy", bytes(noisy_jpeg), "either"),
        Hostile("jpeg no SOF", jpeg[:2] + b"\xff\xd9", "error"),
        Hostile("gif half", gif[: len(gif) // 2], "either"),
        Hostile("webp half", webp[: len(webp) // 2], "error"),
        Hostile("tiff half", tiff[: len(tiff) // 2], "either"),
        Hostile("bmp half", bmp[: len(bmp) // 2], "either"),
        Hostile("bmp zero size", bmp_bomb(0, 0), "error"),
        Hostile("png zero size", png_bomb(0, 0), "error"),
        Hostile("gif zero size", gif_bomb(0, 0), "error"),
    ]
    return cases


def non_images() -> list[Hostile]:
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("index.html", "<script>alert(1)</script>")
    png = encode(quadrant_image(8, 8), "PNG")
    return [
        Hostile("one byte", b"\x00", "error"),
        Hostile("text", b"hello, world\n", "error"),
        Hostile("html", b"<!doctype html><html><script>alert(1)</script></html>", "error"),
        Hostile(
            "svg", b'<svg xmlns="http://www.w3.org/2000/svg"><script>x()</script></svg>', "error"
        ),
        Hostile("pdf", b"%PDF-1.7\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "error"),
        Hostile("zip", zbuf.getvalue(), "error"),
        Hostile("elf", b"\x7fELF\x02\x01\x01" + b"\x00" * 57, "error"),
        Hostile("gzip of png", gzip.compress(png), "error"),
        Hostile("png magic only", b"\x89PNG\r\n\x1a\n", "error"),
        Hostile("gif magic only", b"GIF89a", "error"),
        Hostile("riff not webp", b"RIFF\x10\x00\x00\x00WAVEfmt ", "error"),
        Hostile("random", random.Random(3).randbytes(64 * 1024), "error"),
        Hostile("html then png", b"<html><body>hi</body></html>" + png, "error"),
    ]


_PAYLOAD = b"<html><script>alert('polyglot')</script></html>"


def polyglots() -> list[Hostile]:
    png = encode(quadrant_image(24, 16), "PNG")
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("evil.html", _PAYLOAD)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", _PAYLOAD.decode())
    with_text = encode(quadrant_image(24, 16), "PNG", pnginfo=info)
    jpeg = encode(quadrant_image(24, 16), "JPEG", comment=_PAYLOAD)
    gif = encode(quadrant_image(24, 16), "GIF", comment=_PAYLOAD)
    return [
        Hostile("png + zip", png + zbuf.getvalue(), "ok", b"PK\x03\x04"),
        Hostile("png with html text chunk", with_text, "ok", b"<script>"),
        Hostile("jpeg with html comment + zip", jpeg + zbuf.getvalue(), "ok", b"<script>"),
        Hostile("gif with html comment", gif, "ok", b"<script>"),
        Hostile("png + html trailer", png + _PAYLOAD, "ok", b"<script>"),
    ]


FILE_BATCHES: dict[str, Callable[[], list[Hostile]]] = {
    "bombs": bombs,
    "broken": broken,
    "non-images": non_images,
    "polyglots": polyglots,
}

# --- calls ------------------------------------------------------------------------------------


def key_headers(metadata: Sequence[tuple[str, str]]) -> dict[str, str]:
    return {k.title(): v for k, v in metadata if k == "authorization"}


async def grpc_outcome(awaitable: Awaitable[Any], label: str) -> tuple[str, Any]:
    """``("ok", result)`` or ``(reason, None)`` for a clean client error; else fails."""
    try:
        return "ok", await awaitable
    except grpc.aio.AioRpcError as err:
        assert err.code() in CLIENT_CODES, f"{label}: {err.code()} {err.details()}"
        _, details = rich_status(err)
        reason = details["ErrorInfo"].reason
        assert reason, label
        return reason, None


def http_outcome(res: httpx.Response, label: str) -> str:
    assert res.status_code < 500, f"{label}: {res.status_code} {res.text[:300]}"
    if res.status_code < 300:
        return "ok"
    assert 400 <= res.status_code < 500, f"{label}: {res.status_code}"
    body = res.json()
    code = body["responseStatus"]["errorCode"]
    assert code, label
    return str(code)


def _check(case: Hostile, outcome: str, label: str) -> None:
    if case.expect == "error":
        assert outcome != "ok", f"{label}: accepted"
    elif case.expect == "ok":
        assert outcome == "ok", f"{label}: refused with {outcome}"


async def convert(
    ch: grpc.aio.Channel, data: bytes, metadata: Any, fmt: int = common_pb2.IMAGE_FORMAT_PNG,
    file_name: str = "image.bin",
) -> bytes:  # fmt: skip
    call = transform_service_pb2_grpc.TransformServiceStub(ch).ConvertImage(
        metadata=metadata, timeout=60
    )
    messages = [
        transform_service_pb2.ConvertImageRequest(
            params=tasks_pb2.ConvertImageParams(output_format=fmt)
        ),
        *(
            transform_service_pb2.ConvertImageRequest(
                chunk=common_pb2.FileChunk(
                    field="image", data=data[i : i + 256 * 1024], file_name=file_name
                )
            )
            for i in range(0, max(len(data), 1), 256 * 1024)
        ),
    ]
    await send_all(call, messages)
    replies = [r async for r in call]
    assert replies[0].WhichOneof("payload") == "info"
    return b"".join(r.chunk for r in replies[1:])


async def crop(ch: grpc.aio.Channel, data: bytes, metadata: Any, **params: int) -> list[Any]:
    call = transform_service_pb2_grpc.TransformServiceStub(ch).CropImage(
        metadata=metadata, timeout=60
    )
    p = tasks_pb2.CropImageParams(**{"x": 0, "y": 0, "width": 4, "height": 4, **params})
    await send_all(
        call, upload_messages(transform_service_pb2.CropImageRequest, p, {"image": data})
    )
    return [r async for r in call]


def img2img(prompt: str = "a lighthouse", **kw: Any) -> tasks_pb2.ImageToImageParams:
    base: dict[str, Any] = {
        "steps": 1,
        "options": common_pb2.JobOptions(delivery=common_pb2.OUTPUT_DELIVERY_REFERENCES),
    }
    return tasks_pb2.ImageToImageParams(positive_prompt=prompt, **{**base, **kw})


async def file_batch(
    cases: Sequence[Hostile],
    ch: grpc.aio.Channel,
    http: httpx.AsyncClient,
    metadata: Any,
    *,
    generative: bool = True,
) -> None:
    """Each file through ConvertImage and CropImage (gRPC), ImageToImage (gRPC, when agents
    serve it), and ConvertImage and ImageToImage over HTTP."""
    headers = key_headers(metadata)
    for case in cases:
        outcome, out = await grpc_outcome(convert(ch, case.data, metadata), case.label)
        _check(case, outcome, f"{case.label} (gRPC convert)")
        if outcome == "ok":
            with Image.open(io.BytesIO(out)) as im:
                im.load()
            if case.payload:
                assert case.payload not in out, f"{case.label}: payload survived"
        outcome, _ = await grpc_outcome(crop(ch, case.data, metadata), case.label)
        _check(case, outcome, f"{case.label} (gRPC crop)")
        res = await http.post(
            "/api/ConvertImage",
            files={"image": ("x.bin", case.data)},
            data={"OutputFormat": "png"},
            headers=headers,
        )
        outcome = http_outcome(res, f"{case.label} (HTTP convert)")
        _check(case, outcome, f"{case.label} (HTTP convert)")
        if outcome == "ok" and case.payload:
            assert case.payload not in res.content
        if generative:
            outcome, _ = await grpc_outcome(
                generate(ch, "ImageToImage", img2img(), {"image": case.data}, metadata=metadata),
                case.label,
            )
            if case.expect == "error":
                assert outcome != "ok", f"{case.label} (gRPC img2img): accepted"
            res = await http.post(
                "/api/ImageToImage",
                files={"image": ("x.bin", case.data)},
                data={"PositivePrompt": "x", "Sync": "true", "Steps": "1"},
                headers=headers,
            )
            outcome = http_outcome(res, f"{case.label} (HTTP img2img)")
            if case.expect == "error":
                assert outcome != "ok", f"{case.label} (HTTP img2img): accepted"


HOSTILE_NAMES = [
    "../../etc/passwd.png",
    "..\\..\\windows\\win.ini",
    "/absolute/path/x.png",
    "a\x00b.png",
    "x\r\nSet-Cookie: evil=1\r\n.png",
    "\u202egnp.exe",
    "CON",
    ".png",
    "",
    "A" * 20_000 + ".png",
    "%2e%2e%2f%2e%2e%2fx.png",
    "名前\u200d\u2028.png",
]


async def names_batch(ch: grpc.aio.Channel, http: httpx.AsyncClient, metadata: Any) -> None:
    """File names, job names, artifact names, variant specs, ref ids, tags, request ids."""
    png = encode(quadrant_image(16, 16), "PNG")
    headers = key_headers(metadata)
    stub = transform_service_pb2_grpc.TransformServiceStub(ch)
    for name in HOSTILE_NAMES:
        call = stub.ConvertImage(metadata=metadata, timeout=60)
        await send_all(
            call,
            [
                transform_service_pb2.ConvertImageRequest(
                    params=tasks_pb2.ConvertImageParams(output_format=common_pb2.IMAGE_FORMAT_WEBP)
                ),
                transform_service_pb2.ConvertImageRequest(
                    chunk=common_pb2.FileChunk(field="image", data=png, file_name=name)
                ),
            ],
        )
        info = (await _collect(call))[0].info
        suggested = info.file_name
        assert "/" not in suggested and "\\" not in suggested and suggested.isprintable()
        assert len(suggested) <= 200 and suggested.endswith(".webp"), suggested
        # HTTP: the name comes back in Content-Disposition; no header can be injected.
        boundary = "hostileboundary"
        quoted = name.replace('"', "%22")
        body = (
            (
                f"--{boundary}\r\nContent-Disposition: form-data; "
                'name="OutputFormat"\r\n\r\npng\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                f'filename="{quoted}"\r\nContent-Type: image/png\r\n\r\n'
            ).encode("utf-8", "surrogatepass")
            + png
            + f"\r\n--{boundary}--\r\n".encode()
        )
        res = await http.post(
            "/api/ConvertImage",
            content=body,
            headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        outcome = http_outcome(res, f"file name {name[:40]!r} (HTTP)")
        assert "set-cookie" not in res.headers
        if outcome == "ok":
            disposition = res.headers["content-disposition"]
            assert "\r" not in disposition and "\n" not in disposition
    # Unknown or hostile upload fields.
    for field in ("../image", "image\x00", "mask", "IMAGE", "x" * 10_000):
        call = stub.ConvertImage(metadata=metadata, timeout=60)
        await send_all(
            call,
            [
                transform_service_pb2.ConvertImageRequest(
                    params=tasks_pb2.ConvertImageParams(output_format=common_pb2.IMAGE_FORMAT_PNG)
                ),
                transform_service_pb2.ConvertImageRequest(
                    chunk=common_pb2.FileChunk(field=field, data=png)
                ),
            ],
        )
        reason, _ = await grpc_outcome(_collect(call), f"field {field[:20]!r}")
        assert reason == "UNKNOWN_INPUT"
    # Job names.
    jobs = job_service_pb2_grpc.JobServiceStub(ch)
    for name in (
        "jobs/../../etc/passwd",
        "jobs/x\n",
        "jobs/x/../y",
        "jobs/" + "a" * 100_000,
        "../jobs.db",
        "jobs/%2e%2e",
        "jobs/\u202ex",
        "",
    ):
        for call in (
            jobs.GetJob(jpb.GetJobRequest(name=name), metadata=metadata, timeout=30),
            jobs.CancelJob(jpb.CancelJobRequest(name=name), metadata=metadata, timeout=30),
            _collect(jobs.WatchJob(jpb.WatchJobRequest(name=name), metadata=metadata, timeout=30)),
        ):
            reason, _ = await grpc_outcome(call, f"job name {name[:30]!r}")
            assert reason in ("INVALID_NAME", "JOB_NOT_FOUND")
    for path in (
        "/v1/jobs/..%2F..%2Fetc%2Fpasswd",
        "/v1/jobs/%0d%0aX:y",
        "/v1/jobs/x:cancel",
        "/api/jobs/..%2F..%2Fx/events",
        "/api/GetArtifactGenerationStatus?jobId=..%2F..%2Fjobs.db",
        "/api/GetArtifactGenerationStatus?refId=" + "r" * 5000,
        "/api/GetTextGenerationStatus?jobId=%00",
        "/variants/" + "w" * 5000 + "/2031/01/01/x.png",
        "/variants/width=1,width=2/2031/01/01/x.png",
        "/v1/artifacts/" + "a" * 5000 + ":variant",
    ):
        res = await http.request(
            "POST" if path.endswith(":cancel") else "GET", path, headers=headers
        )
        outcome = http_outcome(res, path[:60])
        assert outcome != "ok", path
    # Artifact names and variant specs.
    arts = artifact_service_pb2_grpc.ArtifactServiceStub(ch)
    for name in ("artifacts/../jobs.db", "artifacts/2031/01/01/" + "f" * 64 + ".png\x00", "\u0000"):
        reason, _ = await grpc_outcome(
            arts.GetArtifact(apb.GetArtifactRequest(name=name), metadata=metadata, timeout=30),
            f"artifact {name!r}",
        )
        assert reason in ("INVALID_ARTIFACT_NAME", "ARTIFACT_NOT_FOUND")
    for spec in ("width=1/../../x", "width=\u0661", "width=1,format=exe", "w" * 10_000, "width=0"):
        reason, _ = await grpc_outcome(
            _collect(
                arts.GetVariant(
                    apb.GetVariantRequest(
                        name="artifacts/2031/01/01/" + "f" * 64 + ".png", spec=spec
                    ),
                    metadata=metadata,
                    timeout=30,
                )
            ),
            f"spec {spec[:20]!r}",
        )
    # Labels: ref ids and tags with control characters or too long; a hostile request id.
    for options in (
        common_pb2.JobOptions(ref_id="r\n1"),
        common_pb2.JobOptions(ref_id="r" * 129),
        common_pb2.JobOptions(tag="\x1b[31mred"),
        common_pb2.JobOptions(reply_to="file:///etc/passwd"),
        common_pb2.JobOptions(reply_to="http://x\r\nHost: evil/"),
    ):
        reason, _ = await grpc_outcome(
            generate(
                ch, "ImageToImage", img2img(options=options), {"image": png}, metadata=metadata
            ),
            f"options {options}",
        )
        assert reason in ("INVALID_PARAMETERS", "INVALID_REPLY_TO"), reason
    # Private targets are refused at submission, so the caller learns (issue 16).
    for url in ("http://169.254.169.254/latest/meta-data/", "http://user:pw@[::1]:80/x"):
        reason, _ = await grpc_outcome(
            generate(
                ch,
                "ImageToImage",
                img2img(options=common_pb2.JobOptions(reply_to=url)),
                {"image": png},
                metadata=metadata,
            ),
            url,
        )
        assert reason == "INVALID_REPLY_TO", (url, reason)
    call = jobs.ListJobs(
        jpb.ListJobsRequest(), metadata=(*metadata, ("x-request-id", "r" * 4000)), timeout=30
    )
    await call
    rid = dict(await call.trailing_metadata())["x-request-id"]
    assert 0 < len(rid) <= 64


async def _collect(call: Any) -> list[Any]:
    return [r async for r in call]


async def numbers_batch(ch: grpc.aio.Channel, http: httpx.AsyncClient, metadata: Any) -> None:
    """Out-of-range and non-finite numbers, negative sizes, int32/int64 extremes."""
    png = encode(quadrant_image(16, 16), "PNG")
    headers = key_headers(metadata)
    nan, inf = float("nan"), float("inf")
    i32, i64 = 2**31 - 1, 2**63 - 1
    bad_params = [
        img2img(denoise=nan),
        img2img(denoise=inf),
        img2img(denoise=-inf),
        img2img(denoise=0.0),
        img2img(denoise=-0.5),
        img2img(cfg_scale=nan),
        img2img(cfg_scale=inf),
        img2img(cfg_scale=-1.0),
        img2img(cfg_scale=3.4e38),
        img2img(steps=0),
        img2img(steps=-1),
        img2img(steps=i32),
        img2img(steps=-(2**31)),
        img2img(batch_size=0),
        img2img(batch_size=-1),
        img2img(batch_size=i32),
        img2img(seed=-1),
        img2img(seed=-(2**63)),
    ]
    for params in bad_params:
        reason, _ = await grpc_outcome(
            generate(ch, "ImageToImage", params, {"image": png}, metadata=metadata),
            str(params).replace("\n", " "),
        )
        assert reason == "INVALID_PARAMETERS", params
    ok = await generate(ch, "ImageToImage", img2img(seed=i64), {"image": png}, metadata=metadata)
    assert ok.final.outputs[0].seed == i64
    for params in (
        {"x": -1},
        {"y": -(2**31)},
        {"width": 0},
        {"width": -4},
        {"height": -(2**31)},
        {"x": i32, "width": i32},
        {"x": 15, "width": 2},
        {"width": i32, "height": i32},
        {"quality": 0},
        {"quality": 101},
        {"quality": -(2**31)},
    ):
        reason, _ = await grpc_outcome(crop(ch, png, metadata, **params), str(params))
        assert reason != "ok", params
    for fmt in (99, -1, i32):
        reason, _ = await grpc_outcome(convert(ch, png, metadata, fmt=fmt), f"format {fmt}")
        assert reason != "ok"
    arts = artifact_service_pb2_grpc.ArtifactServiceStub(ch)
    name = ok.final.outputs[0].name
    for request in (
        apb.ReadArtifactRequest(name=name, read_offset=-1),
        apb.ReadArtifactRequest(name=name, read_limit=-(2**63)),
        apb.ReadArtifactRequest(name=name, read_offset=i64),
    ):
        reason, _ = await grpc_outcome(
            _collect(arts.ReadArtifact(request, metadata=metadata, timeout=30)), str(request)
        )
        assert reason != "ok"
    full = await _collect(
        arts.ReadArtifact(apb.ReadArtifactRequest(name=name, read_limit=i64), metadata=metadata)
    )
    assert sum(len(r.data) for r in full) == ok.final.outputs[0].size_bytes
    for request in (
        apb.GetVariantRequest(name=name, width=-1),
        apb.GetVariantRequest(name=name, width=i32),
        apb.GetVariantRequest(name=name, width=8, height=-(2**31)),
        apb.GetVariantRequest(name=name, width=8, quality=0),
        apb.GetVariantRequest(name=name, width=8, quality=i32),
        apb.GetVariantRequest(name=name, width=8, fit=77),
        apb.GetVariantRequest(name=name, width=8, format=-3),
    ):
        reason, _ = await grpc_outcome(
            _collect(arts.GetVariant(request, metadata=metadata, timeout=30)),
            str(request).replace("\n", " "),
        )
        assert reason != "ok", request
    jobs = job_service_pb2_grpc.JobServiceStub(ch)
    for request in (
        jpb.ListJobsRequest(page_size=-1),
        jpb.ListJobsRequest(page_size=i32),
        jpb.ListJobsRequest(states=[99]),
        jpb.ListJobsRequest(task=-5),
        jpb.ListJobsRequest(page_token="\x00" * 100),
    ):
        reason, _ = await grpc_outcome(
            jobs.ListJobs(request, metadata=metadata, timeout=30), "list"
        )
        assert reason != "ok", request
    # Over HTTP: text that is not a number, or not one the field can hold.
    for form in (
        {"Denoise": "NaN"},
        {"Denoise": "inf"},
        {"Denoise": "-Infinity"},
        {"Denoise": "1e309"},
        {"CfgScale": "nan"},
        {"Steps": "99999999999999"},
        {"Steps": "-2147483649"},
        {"BatchSize": "1.5"},
        {"BatchSize": "0x10"},
        {"Seed": "9223372036854775808"},
        {"Seed": "-1"},
    ):
        res = await http.post(
            "/api/ImageToImage",
            files={"image": ("a.png", png)},
            data={"PositivePrompt": "x", **form},
            headers=headers,
        )
        assert http_outcome(res, str(form)) != "ok", form
    for form in (
        {"X": "-1"},
        {"Width": "99999999999999"},
        {"Width": "-5"},
        {"Quality": "1000"},
        {"Width": "NaN"},
    ):
        res = await http.post(
            "/api/CropImage",
            files={"image": ("a.png", png)},
            data={"X": "0", "Y": "0", "Width": "4", "Height": "4", **form},
            headers=headers,
        )
        assert http_outcome(res, f"crop {form}") != "ok", form
    for query in ("page_size=-1", "page_size=99999999999", "states=EVIL", "page_size=nan"):
        res = await http.get(f"/v1/jobs?{query}", headers=headers)
        assert http_outcome(res, query) != "ok", query


async def long_fields_batch(ch: grpc.aio.Channel, http: httpx.AsyncClient, metadata: Any) -> None:
    """Fields far past their limits, within the message size."""
    png = encode(quadrant_image(16, 16), "PNG")
    headers = key_headers(metadata)
    mb = 1024 * 1024
    for params in (
        img2img("p" * mb),
        img2img(negative_prompt="n" * mb),
        img2img(model="m" * 100_000),
        img2img(sampler="s" * 100_000),
        img2img(scheduler="\x01" * 10),
        img2img(options=common_pb2.JobOptions(ref_id="r" * 100_000)),
        img2img(options=common_pb2.JobOptions(tag="t" * 100_000)),
        img2img(options=common_pb2.JobOptions(reply_to="https://x.example/" + "a" * mb)),
    ):
        reason, _ = await grpc_outcome(
            generate(ch, "ImageToImage", params, {"image": png}, metadata=metadata), "long"
        )
        assert reason in ("INVALID_PARAMETERS", "INVALID_REPLY_TO"), reason
    # A message past the server's message limit is refused by gRPC itself: RESOURCE_EXHAUSTED
    # (a client still writing its stream may report its own failed write instead).
    jobs = job_service_pb2_grpc.JobServiceStub(ch)
    try:
        await jobs.ListJobs(jpb.ListJobsRequest(page_token="t" * (5 * mb)), metadata=metadata)
        raise AssertionError("a 5 MiB message was accepted")
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    with_huge = tasks_pb2.ImageToTextParams(prompt="q" * (5 * mb))
    try:
        await generate(ch, "ImageToText", with_huge, {"image": png}, metadata=metadata)
        raise AssertionError("a 5 MiB message was accepted")
    except grpc.aio.AioRpcError as err:
        assert err.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL)
    for form in ({"PositivePrompt": "p" * mb}, {"RefId": "r" * 100_000}, {"Model": "m" * 70_000}):
        res = await http.post(
            "/api/ImageToImage",
            files={"image": ("a.png", png)},
            data={"PositivePrompt": "x", **form},
            headers=headers,
        )
        assert http_outcome(res, str(list(form))) != "ok"
    res = await http.get("/v1/jobs/" + "j" * 20_000, headers=headers)
    assert 400 <= res.status_code < 500
    res = await http.get("/v1/jobs", headers={**headers, "X-Request-Id": "r" * 5000})
    assert res.status_code == 200 and len(res.headers["x-request-id"]) <= 64


async def assert_healthy(ch: grpc.aio.Channel, metadata: Any) -> None:
    """The service still answers health checks and real work."""
    reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    out = await convert(ch, encode(quadrant_image(16, 16), "PNG"), metadata)
    with Image.open(io.BytesIO(out)) as im:
        assert im.size == (16, 16)


async def every_batch(ch: grpc.aio.Channel, http: httpx.AsyncClient, metadata: Any) -> None:
    for make in FILE_BATCHES.values():
        await file_batch(make(), ch, http, metadata)
        await assert_healthy(ch, metadata)
    for batch in (names_batch, numbers_batch, long_fields_batch):
        await batch(ch, http, metadata)
        await assert_healthy(ch, metadata)
