"""The encoding rules: orientation, profiles, alpha, animation, quality, pixel modes."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageCms, ImageOps

from aiserver.errors import ErrorKind
from aiserver.imaging import DEFAULT_QUALITY, ImageLimits, convert, crop, resize

from .testkit import (
    BLOCK_COLOURS,
    FORMAT_NAMES,
    assert_colour,
    blocks,
    decode,
    fmt,
    frames_of,
    mean,
    noise,
    quadrant_means,
    raises_service_error,
    save,
)

ORIENTATION = 0x0112
WHITE = (255, 255, 255)
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def exif_bytes(orientation: int, **tags: object) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    for key, value in tags.items():
        exif[int(key.removeprefix("tag_"))] = value
    return exif.tobytes()


# --- orientation ------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_is_applied_exactly(tmp_path: Path, orientation: int) -> None:
    raw = noise((30, 20), seed=orientation)
    path = save(raw, tmp_path / "o.png", "png", exif=exif_bytes(orientation))
    with Image.open(path) as src:
        reference = ImageOps.exif_transpose(src).convert("RGB")

    whole = decode(convert(path, output_format=fmt("png")).data)
    assert whole.convert("RGB").tobytes() == reference.tobytes()
    assert ORIENTATION not in whole.getexif()

    w, h = reference.size
    box = (3, 5, w - 4, h - 2)
    part = crop(path, x=3, y=5, width=box[2] - 3, height=box[3] - 5)
    assert decode(part.data).convert("RGB").tobytes() == reference.crop(box).tobytes()


def test_jpeg_orientation_6(tmp_path: Path) -> None:
    raw = blocks((64, 48))
    path = save(raw, tmp_path / "o.jpg", "jpg", exif=exif_bytes(6))
    result = convert(path, output_format=fmt("jpg"))
    out = decode(result.data)
    assert out.size == (result.width, result.height) == (48, 64)
    assert "exif" not in out.info
    # Orientation 6 is a clockwise quarter turn: top-left comes from the bottom-left block.
    expected = quadrant_means(raw.transpose(Image.Transpose.ROTATE_270))
    for actual, colour in zip(quadrant_means(out), expected, strict=True):
        assert_colour(actual, colour)
    assert_colour(quadrant_means(out)[0], BLOCK_COLOURS[2])


def test_crop_is_validated_against_the_oriented_size(tmp_path: Path) -> None:
    path = save(blocks((64, 48)), tmp_path / "o.jpg", "jpg", exif=exif_bytes(6))
    with raises_service_error(
        ErrorKind.INVALID_ARGUMENT, "CROP_OUT_OF_BOUNDS", "params.width"
    ) as info:
        crop(path, x=0, y=0, width=60, height=10)
    assert "48x64" in info.value.message
    result = crop(path, x=0, y=50, width=48, height=14)  # only fits the oriented image
    assert (result.width, result.height) == (48, 14)


# --- crop validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rect", "reason", "fields"),
    [
        ((0, 0, 0, 10), "INVALID_CROP", {"params.width"}),
        ((0, 0, 10, -1), "INVALID_CROP", {"params.height"}),
        ((0, 0, 0, 0), "INVALID_CROP", {"params.width", "params.height"}),
        ((-1, 0, 10, 10), "CROP_OUT_OF_BOUNDS", {"params.x"}),
        ((0, -5, 10, 10), "CROP_OUT_OF_BOUNDS", {"params.y"}),
        ((64, 0, 1, 1), "CROP_OUT_OF_BOUNDS", {"params.x"}),
        ((60, 0, 5, 10), "CROP_OUT_OF_BOUNDS", {"params.width"}),
        ((0, 40, 10, 9), "CROP_OUT_OF_BOUNDS", {"params.height"}),
        ((100, 100, 10, 10), "CROP_OUT_OF_BOUNDS", {"params.x", "params.y"}),
    ],
)
def test_crop_rectangle_errors(
    tmp_path: Path, rect: tuple[int, int, int, int], reason: str, fields: set[str]
) -> None:
    path = save(blocks(), tmp_path / "a.png", "png")
    x, y, w, h = rect
    with raises_service_error(ErrorKind.INVALID_ARGUMENT, reason, *fields) as info:
        crop(path, x=x, y=y, width=w, height=h)
    if reason == "CROP_OUT_OF_BOUNDS":
        assert "64x48" in info.value.message


# --- colour profiles --------------------------------------------------------------------


@pytest.mark.parametrize("dst", FORMAT_NAMES)
def test_icc_profile_kept_where_supported(tmp_path: Path, dst: str) -> None:
    path = save(blocks(), tmp_path / "a.png", "png", icc_profile=SRGB)
    out = decode(convert(path, output_format=fmt(dst)).data)
    if fmt(dst).supports_icc:
        assert out.info.get("icc_profile") == SRGB
    else:
        assert not out.info.get("icc_profile")


def test_cmyk_becomes_rgb(tmp_path: Path) -> None:
    img = Image.new("CMYK", (20, 10), (0, 0, 0, 0))
    img.paste((0, 255, 255, 0), (10, 0, 20, 10))
    path = save(img, tmp_path / "c.jpg", "jpg")
    out = decode(convert(path, output_format=fmt("png")).data)
    assert out.mode == "RGB"
    assert_colour(mean(out, (1, 1, 8, 9)), WHITE)
    assert_colour(mean(out, (12, 1, 19, 9)), (255, 0, 0))


# --- alpha ------------------------------------------------------------------------------


def half_transparent() -> Image.Image:
    img = Image.new("RGBA", (40, 20), (255, 0, 0, 0))
    img.paste((0, 0, 255, 255), (20, 0, 40, 20))
    img.paste((0, 0, 0, 128), (0, 10, 20, 20))  # half-transparent black
    return img


@pytest.mark.parametrize("dst", ["jpg", "bmp"])
def test_alpha_is_composited_onto_white(tmp_path: Path, dst: str) -> None:
    path = save(half_transparent(), tmp_path / "a.png", "png")
    out = decode(convert(path, output_format=fmt(dst)).data)
    assert out.mode == "RGB"
    assert_colour(mean(out, (2, 2, 18, 8)), WHITE)
    assert_colour(mean(out, (22, 2, 38, 18)), (0, 0, 255))
    assert_colour(mean(out, (2, 12, 18, 18)), (127, 127, 127))


@pytest.mark.parametrize("dst", ["png", "tiff", "webp", "avif"])
def test_alpha_is_kept(tmp_path: Path, dst: str) -> None:
    if dst not in FORMAT_NAMES:
        pytest.skip(f"{dst} not available")
    path = save(half_transparent(), tmp_path / "a.png", "png")
    out = decode(convert(path, output_format=fmt(dst)).data).convert("RGBA")
    assert out.getpixel((5, 5))[3] == 0  # type: ignore[index]
    assert out.getpixel((30, 5))[3] == 255  # type: ignore[index]
    assert abs(out.getpixel((5, 15))[3] - 128) <= 2  # type: ignore[index]


def test_gif_alpha_is_on_off(tmp_path: Path) -> None:
    path = save(half_transparent(), tmp_path / "a.png", "png")
    out = decode(convert(path, output_format=fmt("gif")).data).convert("RGBA")
    assert out.getpixel((5, 5))[3] == 0  # type: ignore[index]
    assert out.getpixel((30, 5)) == (0, 0, 255, 255)
    assert out.getpixel((5, 15)) == (0, 0, 0, 255)  # alpha 128 rounds to opaque


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (20, 10), 0)
    img.putpalette([0, 200, 0, 200, 0, 0])
    img.paste(1, (10, 0, 20, 10))
    path = save(img, tmp_path / "p.png", "png", transparency=0)
    jpg = decode(convert(path, output_format=fmt("jpg")).data)
    assert_colour(mean(jpg, (1, 1, 8, 9)), WHITE)
    assert_colour(mean(jpg, (12, 1, 19, 9)), (200, 0, 0))
    png = decode(convert(path, output_format=fmt("png")).data)
    assert png.mode == "RGBA" and png.getpixel((15, 5)) == (200, 0, 0, 255)
    assert png.getpixel((5, 5))[3] == 0  # type: ignore[index]


# --- pixel modes ------------------------------------------------------------------------


def test_16_bit_grey_is_scaled(tmp_path: Path) -> None:
    img = Image.frombytes("I;16", (3, 1), struct.pack("<3H", 0, 32896, 65535))
    path = tmp_path / "g16.png"
    img.save(path)
    out = decode(convert(path, output_format=fmt("png")).data)
    assert out.mode == "L"
    assert [out.getpixel((i, 0)) for i in range(3)] == [0, 128, 255]


def test_bilevel_and_grey_inputs(tmp_path: Path) -> None:
    bilevel = Image.new("1", (16, 8), 0)
    bilevel.paste(1, (8, 0, 16, 8))
    path = save(bilevel, tmp_path / "b.png", "png")
    out = decode(convert(path, output_format=fmt("png")).data)
    assert out.mode == "L" and (out.getpixel((0, 0)), out.getpixel((15, 0))) == (0, 255)
    grey_alpha = Image.new("LA", (16, 8), (100, 0))
    path = save(grey_alpha, tmp_path / "la.png", "png")
    assert decode(convert(path, output_format=fmt("jpg")).data).mode == "L"
    assert decode(convert(path, output_format=fmt("webp")).data).mode == "RGBA"


# --- metadata ---------------------------------------------------------------------------


def test_metadata_is_stripped(tmp_path: Path) -> None:
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><tiff:Orientation>1</tiff:Orientation></x:xmpmeta>'
    path = save(blocks(), tmp_path / "m.jpg", "jpg", exif=exif_bytes(1, tag_271="Camera"), xmp=xmp)
    for dst in ("jpg", "png", "webp"):
        out = decode(convert(path, output_format=fmt(dst)).data)
        assert "exif" not in out.info and "xmp" not in out.info
        assert not out.getexif()


# --- quality ----------------------------------------------------------------------------


def test_quality_changes_lossy_output(tmp_path: Path) -> None:
    path = save(noise((128, 128)), tmp_path / "n.png", "png")
    low = convert(path, output_format=fmt("jpg"), quality=10)
    default = convert(path, output_format=fmt("jpg"))
    high = convert(path, output_format=fmt("jpg"), quality=DEFAULT_QUALITY)
    assert len(low.data) < len(default.data)
    assert default.data == high.data


def test_quality_is_ignored_for_lossless(tmp_path: Path) -> None:
    path = save(blocks(), tmp_path / "a.png", "png")
    assert (
        convert(path, output_format=fmt("png"), quality=5).data
        == convert(path, output_format=fmt("png")).data
    )


@pytest.mark.parametrize("quality", [0, -3, 101, True])
@pytest.mark.parametrize("dst", ["jpg", "png"])
def test_invalid_quality(tmp_path: Path, quality: int, dst: str) -> None:
    path = save(blocks(), tmp_path / "a.png", "png")
    with raises_service_error(ErrorKind.INVALID_ARGUMENT, "INVALID_QUALITY", "params.quality"):
        convert(path, output_format=fmt(dst), quality=quality)
    with raises_service_error(ErrorKind.INVALID_ARGUMENT, "INVALID_QUALITY", "params.quality"):
        crop(path, x=0, y=0, width=4, height=4, output_format=fmt(dst), quality=quality)
    with raises_service_error(ErrorKind.INVALID_ARGUMENT, "INVALID_QUALITY", "params.quality"):
        resize(path, width=4, output_format=fmt(dst), quality=quality)


def test_format_side_limit(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (17_000, 4), "red"), tmp_path / "wide.png", "png")
    with raises_service_error(
        ErrorKind.INVALID_ARGUMENT, "IMAGE_TOO_LARGE_FOR_FORMAT", "params.format"
    ):
        convert(path, output_format=fmt("webp"))
    assert convert(path, output_format=fmt("png")).width == 17_000


# --- animation --------------------------------------------------------------------------

ANIM_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
DURATIONS = [100, 200, 300]


def animated_gif(path: Path, **params: Any) -> Path:
    frames = [blocks((40, 30)).convert("RGB")] + [
        Image.new("RGB", (40, 30), c) for c in ANIM_COLOURS[1:]
    ]
    frames[0].paste(ANIM_COLOURS[0], (0, 0, 20, 15))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=DURATIONS, **params)
    return path


@pytest.mark.parametrize("dst", ["webp", "png", "gif"])
def test_animation_keeps_frames(tmp_path: Path, dst: str) -> None:
    path = animated_gif(tmp_path / "a.gif", loop=0)
    result = convert(path, output_format=fmt(dst))
    assert result.frame_count == 3
    frames = frames_of(result.data)
    assert len(frames) == 3
    assert [round(info["duration"]) for _, info in frames] == DURATIONS
    assert frames[0][1].get("loop") == 0
    for (frame, _), colour in zip(frames, ANIM_COLOURS, strict=True):
        assert frame.size == (40, 30)
        assert_colour(mean(frame, (2, 2, 18, 13)), colour)
    assert_colour(mean(frames[0][0], (22, 17, 38, 28)), BLOCK_COLOURS[3])


@pytest.mark.parametrize(
    ("loop", "expected"), [({}, {"webp": 1, "png": 1}), ({"loop": 2}, {"webp": 3, "png": 3})]
)
def test_animation_loop_count(
    tmp_path: Path, loop: dict[str, int], expected: dict[str, int]
) -> None:
    # GIF counts repeats after the first showing (absent: shown once); WebP/APNG count plays.
    path = animated_gif(tmp_path / "a.gif", **loop)
    for dst, plays in expected.items():
        assert frames_of(convert(path, output_format=fmt(dst)).data)[0][1]["loop"] == plays
    gif_info = frames_of(convert(path, output_format=fmt("gif")).data)[0][1]
    assert gif_info.get("loop") == loop.get("loop")


def test_animation_crop_and_resize_every_frame(tmp_path: Path) -> None:
    path = animated_gif(tmp_path / "a.gif", loop=0)
    cropped = frames_of(crop(path, x=10, y=5, width=20, height=10, output_format=fmt("webp")).data)
    assert [f.size for f, _ in cropped] == [(20, 10)] * 3
    resized = frames_of(resize(path, width=20, output_format=fmt("gif")).data)
    assert [f.size for f, _ in resized] == [(20, 15)] * 3
    for (frame, _), colour in zip(resized[1:], ANIM_COLOURS[1:], strict=True):
        assert_colour(mean(frame, (2, 2, 18, 13)), colour)


@pytest.mark.parametrize("dst", ["jpg", "bmp", "tiff"])
def test_animation_into_still_format_takes_first_frame(tmp_path: Path, dst: str) -> None:
    path = animated_gif(tmp_path / "a.gif", loop=0)
    result = convert(path, output_format=fmt(dst))
    assert result.frame_count == 1
    out = decode(result.data)
    assert getattr(out, "n_frames", 1) == 1
    assert_colour(mean(out, (2, 2, 18, 13)), ANIM_COLOURS[0])
    assert_colour(mean(out, (22, 17, 38, 28)), BLOCK_COLOURS[3])


@pytest.mark.parametrize("src", ["webp", "png"])
def test_transparent_animation_round_trips(tmp_path: Path, src: str) -> None:
    frames = [Image.new("RGBA", (20, 10), c) for c in [(255, 0, 0, 255), (0, 0, 255, 0)]]
    path = tmp_path / f"a.{src}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    for dst in ("gif", "webp", "png"):
        out = frames_of(convert(path, output_format=fmt(dst)).data)
        assert len(out) == 2
        assert out[0][0].getpixel((5, 5))[3] == 255  # type: ignore[index]
        assert out[1][0].getpixel((5, 5))[3] == 0, dst  # type: ignore[index]


def test_animation_budget_applies_whatever_the_target(tmp_path: Path) -> None:
    path = animated_gif(tmp_path / "a.gif")  # 3 frames of 40x30 = 3600 pixels
    for dst in ("webp", "jpg"):
        with raises_service_error(ErrorKind.RESOURCE_EXHAUSTED, "IMAGE_TOO_MANY_PIXELS"):
            convert(path, output_format=fmt(dst), limits=ImageLimits(max_total_pixels=3599))
    assert convert(path, output_format=fmt("webp"), limits=ImageLimits(max_total_pixels=3600))
