"""Pillow's block cache: sized from the setting, Pillow's own variable wins, images reuse it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from PIL import Image

from aiserver.imaging.block_cache import keep_image_blocks


@pytest.fixture(autouse=True)
def restore() -> Iterator[None]:
    before = Image.core.get_blocks_max()
    yield
    Image.core.set_blocks_max(before)


def test_the_setting_is_counted_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PILLOW_BLOCKS_MAX", raising=False)
    size = Image.core.get_block_size()
    assert keep_image_blocks(3 * size // (1024 * 1024)) == 3
    assert Image.core.get_blocks_max() == 3
    assert keep_image_blocks(0) == 0 and Image.core.get_blocks_max() == 0


def test_pillows_own_variable_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    Image.core.set_blocks_max(5)
    monkeypatch.setenv("PILLOW_BLOCKS_MAX", "5")
    assert keep_image_blocks(1024) == 5
    assert Image.core.get_blocks_max() == 5


def test_freed_images_leave_their_blocks_for_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PILLOW_BLOCKS_MAX", raising=False)
    keep_image_blocks(128)
    Image.core.reset_stats()
    for _ in range(3):
        Image.new("RGB", (4000, 3000)).close()
    stats = Image.core.get_stats()
    assert stats["reused_blocks"] > 0, stats
