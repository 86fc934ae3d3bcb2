"""Pillow's cache of decoded-image memory, shared by every image in the process.

Pillow allocates pixels in 16 MiB blocks and by default hands every freed block back to the
system, so each 12 MP image (48 MB as RGBX) is page-faulted in and zeroed afresh: about a third
of a crop's time, measured (bench/README.md). Keeping a few blocks for reuse removes that.
"""

from __future__ import annotations

import os

from PIL import _imaging

__all__ = ["keep_image_blocks"]


def keep_image_blocks(mib: int) -> int:
    """Keep up to ``mib`` MiB of freed image blocks for reuse (0: none); returns the number of
    blocks. ``PILLOW_BLOCKS_MAX`` in the environment, Pillow's own setting, wins."""
    core = _imaging  # Image.core: the C module
    if "PILLOW_BLOCKS_MAX" in os.environ:
        return int(core.get_blocks_max())
    blocks = max(0, mib) * 1024 * 1024 // int(core.get_block_size())
    core.set_blocks_max(blocks)
    return blocks
