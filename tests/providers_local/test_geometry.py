"""Sizes, tiling and progress, with the real default model."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aiserver.jobs.model import Stage
from aiserver.providers.local import DEFAULT_MODEL, LocalUpscaleProvider
from aiserver.providers.local.upscale import Tile, plan_tiles
from tests.providers_local.helpers import RecordingSink, decoded, save, textured, work_for

MakeProvider = Callable[..., LocalUpscaleProvider]


@pytest.mark.parametrize("size", [(37, 23), (1, 1), (2, 1), (1, 5), (33, 17)])
async def test_result_is_exactly_twice_the_input(
    size: tuple[int, int], make_provider: MakeProvider, tmp_path: Path
) -> None:
    provider = make_provider(tile_size=16)  # several tiles for the larger sizes
    path = save(textured(size), tmp_path / "in put.png")
    sink = RecordingSink()
    await provider.run(work_for(path), sink)
    [image] = sink.images
    assert (image.width, image.height) == (size[0] * 2, size[1] * 2)
    out = decoded(image)
    assert out.size == (size[0] * 2, size[1] * 2)
    assert out.format == "PNG" and image.mime_type == "image/png" and out.mode == "RGB"
    assert image.seed is None
    assert image.file_name == f"in_put-2x-local-{DEFAULT_MODEL}.png"


async def test_tiled_matches_untiled(make_provider: MakeProvider, tmp_path: Path) -> None:
    path = save(textured((60, 44), seed=3), tmp_path / "a.png")
    whole, tiled = RecordingSink(), RecordingSink()
    await make_provider(tile_size=64, tile_overlap=16).run(work_for(path), whole)
    await make_provider(tile_size=16, tile_overlap=16).run(work_for(path), tiled)
    assert len(whole.progress_updates) == 1
    assert len(tiled.progress_updates) == 4 * 3
    a = np.asarray(decoded(whole.images[0]), dtype=np.int16)
    b = np.asarray(decoded(tiled.images[0]), dtype=np.int16)
    diff = np.abs(a - b)
    assert diff.mean() < 0.05, diff.mean()
    assert diff.max() <= 2, diff.max()


async def test_too_little_overlap_shows(make_provider: MakeProvider, tmp_path: Path) -> None:
    """The check above has teeth: without context, tile edges differ visibly."""
    path = save(textured((60, 44), seed=3), tmp_path / "a.png")
    whole, tiled = RecordingSink(), RecordingSink()
    await make_provider(tile_size=64, tile_overlap=0).run(work_for(path), whole)
    await make_provider(tile_size=16, tile_overlap=0).run(work_for(path), tiled)
    a = np.asarray(decoded(whole.images[0]), dtype=np.int16)
    b = np.asarray(decoded(tiled.images[0]), dtype=np.int16)
    assert np.abs(a - b).max() > 10


async def test_progress_per_tile_is_monotonic(make_provider: MakeProvider, tmp_path: Path) -> None:
    size = (70, 41)
    path = save(textured(size), tmp_path / "a.png")
    sink = RecordingSink()
    await make_provider(tile_size=24).run(work_for(path), sink)
    total = math.ceil(70 / 24) * math.ceil(41 / 24)
    updates = sink.progress_updates
    assert [u.step for u in updates] == list(range(1, total + 1))
    assert all(u.max_steps == total for u in updates)
    assert all(u.stage is Stage.RUNNING for u in updates)
    assert all((u.node, u.node_type) == ("tile", "RealESRGAN") for u in updates)
    fractions = [u.fraction for u in updates]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert fractions == pytest.approx([i / total for i in range(1, total + 1)])


async def test_four_x_model_is_brought_to_two_x(
    make_provider: MakeProvider, tmp_path: Path
) -> None:
    path = save(textured((13, 9), seed=5), tmp_path / "small.png")
    sink = RecordingSink()
    # "RealESRGAN_x4plus.pth" is the name ComfyUI users know for the same weights.
    await make_provider(tile_size=16).run(work_for(path, model="RealESRGAN_x4plus.pth"), sink)
    [image] = sink.images
    out = decoded(image)
    assert out.size == (26, 18) == (image.width, image.height)
    assert image.file_name == "small-2x-local-realesrgan-x4plus.png"
    # Still the same picture: close to a plain enlargement on average.
    with Image.open(path) as source:
        plain = np.asarray(source.resize((26, 18), Image.Resampling.BICUBIC), dtype=float)
    assert np.abs(np.asarray(out, dtype=float) - plain).mean() < 20


def test_tile_plan_covers_the_image_once() -> None:
    tiles = plan_tiles(70, 41, 24)
    assert len(tiles) == 3 * 2
    covered = np.zeros((41, 70), dtype=int)
    for t in tiles:
        assert 0 < t.x1 - t.x0 <= 24 and 0 < t.y1 - t.y0 <= 24
        covered[t.y0 : t.y1, t.x0 : t.x1] += 1
    assert (covered == 1).all()
    assert plan_tiles(1, 1, 192) == [Tile(0, 0, 1, 1)]
    # near-equal tiles: no sliver at the end
    assert {t.x1 - t.x0 for t in plan_tiles(200, 1, 192)} == {100}
