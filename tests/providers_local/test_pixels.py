"""Pixel modes: alpha, grey, palette, 16-bit, CMYK, EXIF orientation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aiserver.providers.local import LocalUpscaleProvider
from tests.providers_local.helpers import RecordingSink, decoded, save, textured, work_for

MakeProvider = Callable[..., LocalUpscaleProvider]


async def upscale(provider: LocalUpscaleProvider, path: Path) -> Image.Image:
    sink = RecordingSink()
    await provider.run(work_for(path), sink)
    [image] = sink.images
    out = decoded(image)
    assert out.size == (image.width, image.height)
    return out


def half_transparent(size: tuple[int, int] = (24, 16)) -> Image.Image:
    img = textured(size, seed=1).convert("RGBA")
    alpha = Image.new("L", size, 255)
    alpha.paste(0, (0, 0, size[0] // 2, size[1]))
    img.putalpha(alpha)
    return img


@pytest.mark.parametrize("alpha_mode", ["resize", "model"])
async def test_alpha_survives(alpha_mode: str, make_provider: MakeProvider, tmp_path: Path) -> None:
    path = save(half_transparent(), tmp_path / "a.png")
    out = await upscale(make_provider(tile_size=16, alpha=alpha_mode), path)
    assert out.mode == "RGBA" and out.size == (48, 32)
    alpha = np.asarray(out.getchannel("A"))
    # the halves, away from the edge (x = 24) by more than the filter's reach
    assert (alpha[:, :17] == 0).all()
    assert (alpha[:, 31:] == 255).all()
    rgb = np.asarray(out.convert("RGB"), dtype=float)[:, 31:]
    assert rgb.std() > 5  # the colour is really there


async def test_grey_stays_grey(make_provider: MakeProvider, tmp_path: Path) -> None:
    path = save(textured((21, 14), mode="L"), tmp_path / "g.png")
    out = await upscale(make_provider(), path)
    assert out.mode == "L" and out.size == (42, 28)


async def test_one_bit(make_provider: MakeProvider, tmp_path: Path) -> None:
    path = save(textured((17, 11), mode="1"), tmp_path / "b.bmp", "BMP")
    out = await upscale(make_provider(), path)
    assert out.mode == "L" and out.size == (34, 22)


async def test_grey_with_alpha(make_provider: MakeProvider, tmp_path: Path) -> None:
    path = save(half_transparent().convert("LA"), tmp_path / "la.png")
    out = await upscale(make_provider(), path)
    assert out.mode == "LA"
    assert (np.asarray(out.getchannel("A"))[:, :17] == 0).all()


async def test_palette(make_provider: MakeProvider, tmp_path: Path) -> None:
    source = textured((19, 12)).quantize(16)
    path = save(source, tmp_path / "p.png")
    out = await upscale(make_provider(), path)
    assert out.mode == "RGB" and out.size == (38, 24)
    # colours survive: the result's mean is the source's mean
    want = np.asarray(source.convert("RGB"), dtype=float).mean(axis=(0, 1))
    got = np.asarray(out, dtype=float).mean(axis=(0, 1))
    assert np.abs(want - got).max() < 8


async def test_palette_with_transparency(make_provider: MakeProvider, tmp_path: Path) -> None:
    source = half_transparent().quantize(8)  # RGBA -> P with a transparent index
    path = save(source, tmp_path / "pt.png")
    with Image.open(path) as check:
        assert check.mode == "P"
    out = await upscale(make_provider(), path)
    assert out.mode == "RGBA"
    assert (np.asarray(out.getchannel("A"))[:, :17] == 0).all()


async def test_sixteen_bit_grey(make_provider: MakeProvider, tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 20, dtype=np.uint16), (10, 1))
    path = save(Image.fromarray(ramp), tmp_path / "16.png")
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    out = await upscale(make_provider(), path)
    assert out.mode == "L" and out.size == (40, 20)
    row = np.asarray(out, dtype=float)[10]
    assert row[0] < 20 and row[-1] > 235  # full range kept, scaled to 8 bits


async def test_cmyk(make_provider: MakeProvider, tmp_path: Path) -> None:
    source = Image.new("CMYK", (15, 10), (0, 255, 255, 0))  # red
    path = save(source, tmp_path / "c.jpg", "JPEG", quality=95)
    out = await upscale(make_provider(), path)
    assert out.mode == "RGB" and out.size == (30, 20)
    r, g, b = np.asarray(out, dtype=float).mean(axis=(0, 1))
    assert r > 200 and g < 60 and b < 60


async def test_exif_orientation_is_applied(make_provider: MakeProvider, tmp_path: Path) -> None:
    source = textured((30, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to view
    path = save(source, tmp_path / "o.jpg", "JPEG", quality=95, exif=exif.tobytes())
    out = await upscale(make_provider(), path)
    assert out.size == (40, 60)
