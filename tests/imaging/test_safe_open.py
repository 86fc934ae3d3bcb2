from __future__ import annotations

import random
import struct
import threading
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image, ImageCms, ImageFile

from aiserver.errors import ErrorKind, ServiceError
from aiserver.imaging import DEFAULT_LIMITS, ImageLimits, convert, open_image, probe

from .testkit import FORMAT_NAMES, blocks, encode, fmt, noise, raises_service_error, save

EXIF_ORIENTATION = 0x0112


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return exif.tobytes()


# --- probe ------------------------------------------------------------------------------


def test_probe_reports_header_facts(tmp_path: Path) -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    path = save(blocks(mode="RGBA"), tmp_path / "a.png", "png", icc_profile=icc)
    info = probe(path, DEFAULT_LIMITS)
    assert info.format == fmt("png") and info.pil_format == "PNG"
    assert info.mime_type == "image/png"
    assert (info.width, info.height, info.mode) == (64, 48, "RGBA")
    assert (info.frame_count, info.animated, info.orientation) == (1, False, 1)
    assert info.has_alpha and info.has_icc_profile


def test_probe_applies_exif_orientation(tmp_path: Path) -> None:
    path = save(blocks((64, 48)), tmp_path / "o.jpg", "jpg", exif=exif_bytes(6))
    info = probe(path, DEFAULT_LIMITS)
    assert (info.width, info.height, info.orientation) == (48, 64, 6)
    assert not info.has_alpha and not info.has_icc_profile


def test_probe_counts_frames(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "lime", "blue")]
    gif = tmp_path / "a.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    tiff = tmp_path / "pages.tiff"
    frames[0].save(tiff, save_all=True, append_images=frames[1:])
    assert (probe(gif, DEFAULT_LIMITS).frame_count, probe(gif, DEFAULT_LIMITS).animated) == (
        3,
        True,
    )
    # TIFF pages are separate pictures, not an animation.
    assert (probe(tiff, DEFAULT_LIMITS).frame_count, probe(tiff, DEFAULT_LIMITS).animated) == (
        3,
        False,
    )


@pytest.mark.parametrize("name", ["jpg", "png", "gif", "bmp", "tiff", "webp", "avif"])
def test_probe_never_decodes_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    if name not in FORMAT_NAMES:
        pytest.skip(f"{name} not available")
    path = save(blocks(), tmp_path / f"a.{name}", name, exif=exif_bytes(6))

    def no_decode(self: ImageFile.ImageFile) -> None:
        raise AssertionError("probe decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    info = probe(path, DEFAULT_LIMITS)
    assert (info.width, info.height) in ((64, 48), (48, 64))


# --- unreadable input -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "EMPTY_IMAGE"),
        (b"hello, this is plain text\n", "IMAGE_UNREADABLE"),
        (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n", "IMAGE_UNREADABLE"),
        (
            b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
            "IMAGE_UNREADABLE",
        ),
        (random.Random(1).randbytes(4096), "IMAGE_UNREADABLE"),
        (b"\x89PNG\r\n\x1a\n", "IMAGE_UNREADABLE"),
    ],
    ids=["empty", "text", "pdf", "svg", "random", "png-signature-only"],
)
def test_unreadable_input(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "upload"
    path.write_bytes(content)
    with raises_service_error(ErrorKind.INVALID_ARGUMENT, reason, "params.image"):
        probe(path, DEFAULT_LIMITS, field="params.image")
    with raises_service_error(ErrorKind.INVALID_ARGUMENT, reason, "image"):
        convert(path, output_format=fmt("png"))


def test_unsupported_decoder_is_not_tried(tmp_path: Path) -> None:
    # Pillow can read PCX, but it is not an accepted input format.
    path = tmp_path / "a.pcx"
    blocks().save(path, "PCX")
    with raises_service_error(ErrorKind.INVALID_ARGUMENT, "IMAGE_UNREADABLE", "image"):
        probe(path, DEFAULT_LIMITS)


def test_missing_file(tmp_path: Path) -> None:
    with raises_service_error(ErrorKind.NOT_FOUND, "IMAGE_NOT_FOUND", "image"):
        probe(tmp_path / "nope.png", DEFAULT_LIMITS)


@pytest.mark.parametrize("name", ["png", "jpg", "gif", "bmp", "tiff"])
def test_truncated_image(tmp_path: Path, name: str) -> None:
    data = encode(noise(), fmt(name).pil_format)
    path = tmp_path / f"cut.{name}"
    path.write_bytes(data[: len(data) * 6 // 10])
    probe(path, DEFAULT_LIMITS)  # the header is intact
    with raises_service_error(ErrorKind.INVALID_ARGUMENT, "IMAGE_TRUNCATED", "image"):
        convert(path, output_format=fmt("png"))
    with (
        raises_service_error(ErrorKind.INVALID_ARGUMENT, "IMAGE_TRUNCATED", "image"),
        open_image(path, DEFAULT_LIMITS) as im,
    ):
        im.load()


def test_truncated_webp_is_rejected(tmp_path: Path) -> None:
    data = encode(noise(), "WEBP")
    path = tmp_path / "cut.webp"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ServiceError) as info:
        convert(path, output_format=fmt("png"))
    assert info.value.kind is ErrorKind.INVALID_ARGUMENT
    assert info.value.reason in {"IMAGE_TRUNCATED", "IMAGE_CORRUPT"}


def test_corrupt_png_checksum(tmp_path: Path) -> None:
    data = bytearray(encode(noise((64, 64)), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 40] ^= 0xFF  # payload no longer matches the chunk CRC
    path = tmp_path / "bad.png"
    path.write_bytes(bytes(data))
    with raises_service_error(ErrorKind.INVALID_ARGUMENT, "IMAGE_CORRUPT", "image"):
        convert(path, output_format=fmt("jpg"))


# --- decompression bombs ----------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR is patched to claim a huge size (CRC recomputed)."""
    data = bytearray(encode(Image.new("L", (16, 16)), "PNG"))
    assert data[12:16] == b"IHDR"  # width, height at 16..24; CRC over type+data at 29
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("P", (16, 16)), "GIF"))
    struct.pack_into("<HH", data, 6, width, height)
    return bytes(data)


def webp_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGBA", (16, 16)), "WEBP", lossless=True))
    chunk = bytes(data[12:16])
    assert chunk in (b"VP8L", b"VP8X")
    if chunk == b"VP8L":
        bits = (width - 1) | ((height - 1) << 14)
        struct.pack_into("<I", data, 21, bits | (struct.unpack("<I", data[21:25])[0] & ~0xFFFFFFF))
    else:
        data[24:27] = (width - 1).to_bytes(3, "little")
        data[27:30] = (height - 1).to_bytes(3, "little")
    return bytes(data)


@pytest.mark.parametrize(
    ("maker", "size"),
    [
        (png_claiming, (100_000, 100_000)),
        (png_claiming, (8_000, 7_000)),  # 56 MP: above our limit, below Pillow's
        (jpeg_claiming, (60_000, 60_000)),
        (gif_claiming, (65_535, 65_535)),
        (webp_claiming, (16_000, 16_000)),
    ],
    ids=["png-huge", "png-56mp", "jpeg", "gif", "webp"],
)
def test_bomb_header_is_rejected_before_decoding(
    tmp_path: Path, maker: Callable[[int, int], bytes], size: tuple[int, int]
) -> None:
    path = tmp_path / "bomb"
    path.write_bytes(maker(*size))
    actions: list[Callable[[], object]] = [
        lambda: probe(path, DEFAULT_LIMITS),
        lambda: convert(path, output_format=fmt("png")),
    ]
    for action in actions:
        with raises_service_error(
            ErrorKind.RESOURCE_EXHAUSTED, "IMAGE_TOO_MANY_PIXELS", "image"
        ) as info:
            action()
        meta = info.value.metadata
        assert (meta["width"], meta["height"]) == (str(size[0]), str(size[1]))
        assert meta["limit"] == str(DEFAULT_LIMITS.max_pixels)


def test_real_huge_bilevel_png(tmp_path: Path) -> None:
    # 1-bit pixels compress to almost nothing: a 60 MP image is a tiny file.
    path = tmp_path / "big.png"
    Image.new("1", (10_000, 6_000)).save(path)
    assert path.stat().st_size < 100_000
    with raises_service_error(ErrorKind.RESOURCE_EXHAUSTED, "IMAGE_TOO_MANY_PIXELS", "image"):
        convert(path, output_format=fmt("jpg"))


def test_custom_pixel_limit(tmp_path: Path) -> None:
    path = save(blocks((40, 30)), tmp_path / "a.tiff", "tiff")
    limits = ImageLimits(max_pixels=1000)
    with raises_service_error(
        ErrorKind.RESOURCE_EXHAUSTED, "IMAGE_TOO_MANY_PIXELS", "image"
    ) as info:
        probe(path, limits)
    assert info.value.metadata["width"] == "40" and info.value.metadata["limit"] == "1000"
    assert probe(path, ImageLimits(max_pixels=1200)).width == 40


@pytest.mark.parametrize("side", [40, 50], ids=["pillow-warning", "pillow-error"])
def test_pillow_bomb_checks_become_service_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: int
) -> None:
    # TIFF sizes are not peeked, so Pillow's own check (warning above MAX_IMAGE_PIXELS,
    # error above twice that) fires before ours when our limit is the higher one.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = save(blocks((side, side)), tmp_path / "a.tiff", "tiff")
    before = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # as in production: warnings are not errors
        with raises_service_error(ErrorKind.RESOURCE_EXHAUSTED, "IMAGE_TOO_MANY_PIXELS"):
            convert(path, output_format=fmt("png"), limits=ImageLimits(max_pixels=10**9))
    assert warnings.filters == before


def test_too_many_frames(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (10, 10), (i * 40, 0, 0)) for i in range(5)]
    path = tmp_path / "a.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with raises_service_error(
        ErrorKind.RESOURCE_EXHAUSTED, "IMAGE_TOO_MANY_FRAMES", "image"
    ) as info:
        probe(path, ImageLimits(max_frames=4))
    assert info.value.metadata["frames"] == "5"
    with raises_service_error(
        ErrorKind.RESOURCE_EXHAUSTED, "IMAGE_TOO_MANY_PIXELS", "image"
    ) as info:
        convert(path, output_format=fmt("webp"), limits=ImageLimits(max_total_pixels=499))
    assert info.value.metadata["pixels"] == "500"
    assert probe(path, ImageLimits(max_frames=5, max_total_pixels=500)).frame_count == 5


def test_concurrent_use_is_safe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    good = save(blocks((40, 30)), tmp_path / "good.png", "png")  # 1200 px
    bomb = save(blocks((50, 50)), tmp_path / "bomb.tiff", "tiff")  # 2500 px: Pillow warns
    limits = ImageLimits(max_pixels=10**9)
    before = list(warnings.filters)
    barrier = threading.Barrier(8)

    def work(index: int) -> str:
        if index < 8:
            barrier.wait()  # start the first batch together
        path = bomb if index % 2 else good
        try:
            result = convert(path, output_format=fmt("webp"), limits=limits)
        except ServiceError as exc:
            return exc.reason
        return f"{result.width}x{result.height}"

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(64)))
    assert results == ["40x30", "IMAGE_TOO_MANY_PIXELS"] * 32
    assert warnings.filters == before
