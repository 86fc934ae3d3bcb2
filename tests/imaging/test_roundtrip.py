"""crop and convert between every pair of formats, checking size, format and pixels."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from aiserver.errors import ServiceError
from aiserver.imaging import DEFAULT_LIMITS, EncodedImage, convert, crop

from .testkit import (
    BLOCK_COLOURS,
    FORMAT_NAMES,
    LOSSLESS,
    assert_colour,
    blocks,
    decode,
    fmt,
    mean,
    save,
)

PAIRS = [(src, dst) for src in FORMAT_NAMES for dst in FORMAT_NAMES]


def check(result: EncodedImage, dst: str, expected: Image.Image, src: str) -> None:
    out = decode(result.data)
    assert result.format == fmt(dst)
    assert out.format == fmt(dst).pil_format
    assert out.size == expected.size == (result.width, result.height)
    # Exact when nothing lossy happened; a lossy source has too many colours for GIF.
    if dst in LOSSLESS and (dst != "gif" or src in LOSSLESS):
        assert out.convert("RGB").tobytes() == expected.tobytes()


@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_convert(tmp_path: Path, src: str, dst: str) -> None:
    path = save(blocks(), tmp_path / f"in.{src}", src)
    result = convert(path, output_format=fmt(dst), limits=DEFAULT_LIMITS)
    with Image.open(path) as original:
        expected = original.convert("RGB")
    check(result, dst, expected, src)
    out = decode(result.data)
    # Block interiors keep their colour whatever the codecs did.
    interiors = [(4, 4, 28, 20), (36, 4, 60, 20), (4, 28, 28, 44), (36, 28, 60, 44)]
    for box, colour in zip(interiors, BLOCK_COLOURS, strict=True):
        assert_colour(mean(out, box), colour)


@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_crop(tmp_path: Path, src: str, dst: str) -> None:
    path = save(blocks(), tmp_path / f"in.{src}", src)
    # The rectangle spans all four blocks: TL is 16x12, TR 24x12, BL 16x18, BR 24x18.
    box = (16, 12, 56, 42)
    result = crop(path, x=16, y=12, width=40, height=30, output_format=fmt(dst))
    with Image.open(path) as original:
        expected = original.convert("RGB").crop(box)
    check(result, dst, expected, src)
    out = decode(result.data)
    regions = [(2, 2, 14, 10), (18, 2, 38, 10), (2, 14, 14, 28), (18, 14, 38, 28)]
    for region, colour in zip(regions, BLOCK_COLOURS, strict=True):
        assert_colour(mean(out, region), colour)


@pytest.mark.parametrize("src", FORMAT_NAMES)
def test_crop_defaults_to_input_format(tmp_path: Path, src: str) -> None:
    path = save(blocks(), tmp_path / f"in.{src}", src)
    result = crop(path, x=0, y=0, width=10, height=5)
    assert result.format == fmt(src)
    assert decode(result.data).format == fmt(src).pil_format


@pytest.mark.parametrize("src", FORMAT_NAMES)
def test_an_image_in_memory_reads_as_its_file(tmp_path: Path, src: str) -> None:
    path = save(blocks(), tmp_path / f"in.{src}", src)
    data = path.read_bytes()
    cropped = crop(data, x=16, y=12, width=40, height=30)
    assert cropped == crop(path, x=16, y=12, width=40, height=30)
    assert convert(data, output_format=fmt("png")) == convert(path, output_format=fmt("png"))


def test_empty_bytes_are_an_empty_image() -> None:
    with pytest.raises(ServiceError) as exc:
        crop(b"", x=0, y=0, width=1, height=1)
    assert exc.value.reason == "EMPTY_IMAGE"


def test_crop_whole_image(tmp_path: Path) -> None:
    path = save(blocks(), tmp_path / "in.png", "png")
    result = crop(path, x=0, y=0, width=64, height=48)
    assert decode(result.data).convert("RGB").tobytes() == blocks().tobytes()


def test_mpo_source_reads_as_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "in.mpo"
    blocks().save(path, "MPO", save_all=True, append_images=[blocks((64, 48))])
    with Image.open(path) as check_mpo:
        assert check_mpo.format == "MPO"
    result = crop(path, x=0, y=0, width=32, height=24)
    assert result.format == fmt("jpg")
    assert_colour(mean(decode(result.data), (4, 4, 28, 20)), BLOCK_COLOURS[0])
