from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageOps, ImageStat

from aiserver.errors import ErrorKind
from aiserver.imaging import (
    DEFAULT_LIMITS,
    ImageLimits,
    apply_jpeg_draft,
    open_image,
    resize,
    transforms,
)

from .testkit import (
    BLOCK_COLOURS,
    assert_colour,
    blocks,
    decode,
    fmt,
    mean,
    quadrant_means,
    raises_service_error,
    save,
)

STRIPES = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 30)]


def stripes(size: tuple[int, int] = (200, 100)) -> Image.Image:
    img = Image.new("RGB", size)
    step = size[0] // 4
    for i, colour in enumerate(STRIPES):
        img.paste(colour, (i * step, 0, (i + 1) * step, size[1]))
    return img


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12 MP JPEG (4000x3000)."""
    return save(blocks((4000, 3000)), tmp_path_factory.mktemp("big") / "big.jpg", "jpg")


def size_of(data: bytes) -> tuple[int, int]:
    return decode(data).size


@pytest.mark.parametrize(
    ("width", "height", "fit", "expected"),
    [
        (100, None, "contain", (100, 50)),
        (None, 25, "contain", (50, 25)),
        (50, None, "cover", (50, 25)),  # one side: fit does not matter
        (400, None, "contain", (200, 100)),  # never enlarged
        (None, 300, "fill", (200, 100)),
        (100, 100, "contain", (100, 50)),
        (50, 100, "contain", (50, 25)),
        (400, 400, "contain", (200, 100)),
        (100, 100, "cover", (100, 100)),
        (400, 400, "cover", (400, 400)),
        (50, 80, "fill", (50, 80)),
        (400, 30, "fill", (400, 30)),
        (200, 100, "contain", (200, 100)),
    ],
)
def test_output_sizes(
    tmp_path: Path, width: int | None, height: int | None, fit: str, expected: tuple[int, int]
) -> None:
    path = save(stripes(), tmp_path / "s.png", "png")
    result = resize(path, width=width, height=height, fit=fit)
    assert (result.width, result.height) == expected == size_of(result.data)
    assert result.format == fmt("png")


def test_same_size_is_not_resampled(tmp_path: Path) -> None:
    path = save(stripes(), tmp_path / "s.png", "png")
    out = decode(resize(path, width=200, height=100).data)
    assert out.convert("RGB").tobytes() == stripes().tobytes()


def test_cover_crops_the_centre(tmp_path: Path) -> None:
    path = save(stripes(), tmp_path / "s.png", "png")
    out = decode(resize(path, width=100, height=100, fit="cover").data)
    assert_colour(mean(out, (5, 5, 45, 95)), STRIPES[1])
    assert_colour(mean(out, (55, 5, 95, 95)), STRIPES[2])


def test_fill_stretches(tmp_path: Path) -> None:
    path = save(blocks((64, 48)), tmp_path / "b.png", "png")
    out = decode(resize(path, width=40, height=90, fit="FILL").data)
    assert out.size == (40, 90)
    for actual, colour in zip(quadrant_means(out), BLOCK_COLOURS, strict=True):
        assert_colour(actual, colour)


def test_contain_keeps_content_and_format(tmp_path: Path) -> None:
    path = save(blocks((64, 48)), tmp_path / "b.webp", "webp")
    result = resize(path, width=32, height=32, fit=" Contain ")
    assert result.format == fmt("webp") and (result.width, result.height) == (32, 24)
    for actual, colour in zip(quadrant_means(decode(result.data)), BLOCK_COLOURS, strict=True):
        assert_colour(actual, colour)
    as_jpg = resize(path, width=16, fit="", output_format=fmt("jpg"))
    assert decode(as_jpg.data).format == "JPEG" and (as_jpg.width, as_jpg.height) == (16, 12)


def test_alpha_edges_have_no_dark_fringe(tmp_path: Path) -> None:
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    img.paste((255, 255, 255, 255), (16, 16, 48, 48))
    path = save(img, tmp_path / "a.png", "png")
    out = decode(resize(path, width=20).data).convert("RGBA")
    # Colour is resampled premultiplied: partly transparent edge pixels stay white.
    edge = [out.getpixel((x, 10)) for x in range(20)]
    assert all(p[0] >= 250 for p in edge if p[3] > 0), edge  # type: ignore[index]


@pytest.mark.parametrize(
    ("kwargs", "reason", "fields"),
    [
        ({}, "INVALID_SIZE", {"params.width", "params.height"}),
        ({"width": 0}, "INVALID_SIZE", {"params.width"}),
        ({"width": 10, "height": -1}, "INVALID_SIZE", {"params.height"}),
        ({"width": 10, "fit": "stretch"}, "INVALID_FIT", {"params.fit"}),
        ({"width": 20_000}, "VARIANT_TOO_LARGE", {"params.width"}),
        ({"width": 10, "height": 16_385, "fit": "fill"}, "VARIANT_TOO_LARGE", {"params.height"}),
    ],
)
def test_invalid_requests(
    tmp_path: Path, kwargs: dict[str, object], reason: str, fields: set[str]
) -> None:
    path = save(stripes(), tmp_path / "s.png", "png")
    with raises_service_error(ErrorKind.INVALID_ARGUMENT, reason, *fields):
        resize(path, **kwargs)  # type: ignore[arg-type]


def test_output_side_cap_applies_to_computed_sides(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (400, 20), "red"), tmp_path / "w.png", "png")
    limits = ImageLimits(max_output_side=300)
    with raises_service_error(
        ErrorKind.INVALID_ARGUMENT, "VARIANT_TOO_LARGE", "params.width"
    ) as info:
        resize(path, height=20, limits=limits)
    assert info.value.metadata["limit"] == "300"
    assert resize(path, height=10, limits=limits).width == 200
    with raises_service_error(ErrorKind.INVALID_ARGUMENT, "VARIANT_TOO_LARGE", "params.width"):
        resize(path, width=301, height=10, fit="cover", limits=limits)


# --- the JPEG draft path ----------------------------------------------------------------


def test_draft_helper_reduces_decode_size(big_jpeg: Path) -> None:
    with open_image(big_jpeg, DEFAULT_LIMITS) as im:
        assert apply_jpeg_draft(im, (256, 192)) == (500, 375)
        im.load()
        assert im.size == (500, 375)  # decoded at 1/8 scale, never at 12 MP


def test_draft_helper_ignores_other_formats(tmp_path: Path) -> None:
    path = save(blocks((400, 300)), tmp_path / "b.png", "png")
    with open_image(path, DEFAULT_LIMITS) as im:
        assert apply_jpeg_draft(im, (40, 30)) == (400, 300)


def test_resize_uses_the_draft_path(big_jpeg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[tuple[int, int], tuple[int, int]]] = []
    real = transforms.apply_jpeg_draft

    def spy(image: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
        decoded = real(image, size)
        calls.append((size, decoded))
        return decoded

    monkeypatch.setattr(transforms, "apply_jpeg_draft", spy)
    result = resize(big_jpeg, width=256)
    assert (result.width, result.height) == (256, 192)
    (requested, decoded) = calls[0]
    assert requested[0] >= 256 and requested[1] >= 192
    assert decoded == (500, 375)  # 1/8 scale: the smallest that covers the output
    for actual, colour in zip(quadrant_means(decode(result.data)), BLOCK_COLOURS, strict=True):
        assert_colour(actual, colour)


def test_draft_with_orientation_and_cover(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = blocks((4000, 3000))
    path = save(raw, tmp_path / "o.jpg", "jpg", exif=exif.tobytes())
    result = resize(path, width=150)
    assert (result.width, result.height) == (150, 200)
    expected = quadrant_means(raw.transpose(Image.Transpose.ROTATE_270).resize((150, 200)))
    for actual, colour in zip(quadrant_means(decode(result.data)), expected, strict=True):
        assert_colour(actual, colour)
    covered = decode(resize(path, width=100, height=100, fit="cover").data)
    assert covered.size == (100, 100)
    for actual, colour in zip(quadrant_means(covered), expected, strict=True):
        assert_colour(actual, colour)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fit", ["cover", "fill", "contain"])
def test_resize_matches_orient_then_resize(tmp_path: Path, orientation: int, fit: str) -> None:
    # Resizing happens on stored pixels, before the orientation is applied: the result
    # must match orienting first. A smooth two-axis gradient exposes any misplaced box.
    ramp = Image.linear_gradient("L").resize((96, 64))
    raw = Image.merge(
        "RGB", (ramp, ramp.transpose(Image.Transpose.ROTATE_90).resize((96, 64)), ramp)
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(raw, tmp_path / "g.png", "png", exif=exif.tobytes())
    with Image.open(path) as src:
        oriented = ImageOps.exif_transpose(src).convert("RGB")
    w, h = oriented.size
    if fit == "cover":
        expected = ImageOps.fit(oriented, (30, 40), Image.Resampling.LANCZOS)
    elif fit == "fill":
        expected = oriented.resize((30, 40), Image.Resampling.LANCZOS)
    else:
        expected = ImageOps.contain(oriented, (30, 40), Image.Resampling.LANCZOS)
    out = decode(resize(path, width=30, height=40, fit=fit).data).convert("RGB")
    assert out.size == expected.size
    diff = ImageStat.Stat(ImageChops.difference(out, expected)).mean
    assert max(diff) < 2, (w, h, diff)


# --- encoder effort -----------------------------------------------------------------------


def test_fast_encode_keeps_size_and_quality_of_webp(tmp_path: Path) -> None:
    """Variants are encoded with less effort: the same pixels within WebP's quality, at the
    same quality setting; other formats are untouched."""
    noise = Image.effect_noise((320, 240), 40).convert("RGB")
    source = save(Image.blend(blocks((320, 240)), noise, 0.3), tmp_path / "s.png", "png")
    webp = fmt("webp")
    slow = resize(source, width=160, output_format=webp, quality=80)
    fast = resize(source, width=160, output_format=webp, quality=80, fast_encode=True)
    assert (fast.width, fast.height) == (slow.width, slow.height) == (160, 120)
    assert fast.data != slow.data  # a different encoder effort
    assert 0.8 < len(fast.data) / len(slow.data) < 1.25
    diff = ImageStat.Stat(ImageChops.difference(decode(fast.data), decode(slow.data)))
    assert max(diff.mean) < 4  # per channel, out of 255
    png = fmt("png")
    assert (
        resize(source, width=160, output_format=png, fast_encode=True).data
        == resize(source, width=160, output_format=png).data
    )
