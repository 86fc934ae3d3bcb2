"""The variant cache's files: written after the variant is handed over, never served torn or
half-written (the files are not fsynced), and a cache that cannot be written costs no answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiserver.artifacts.spec import parse_spec
from aiserver.artifacts.store import ArtifactStore
from aiserver.artifacts.variants import VariantCache
from tests.artifacts.helpers import image_bytes, put

SPEC = parse_spec("width=100")


@pytest.fixture
async def source(store: ArtifactStore) -> str:
    return await put(store, image_bytes((400, 200)), size=(400, 200))


def _torn(data: bytes, how: str) -> bytes:
    if how == "zeros":  # same size, other bytes: what a power loss can leave
        return bytes(len(data))
    return data[: len(data) // 2]  # half-written


@pytest.mark.parametrize("how", ["zeros", "half"])
@pytest.mark.parametrize("memory_bytes", [64 * 1024 * 1024, 0], ids=["in-memory", "from-file"])
async def test_a_torn_cache_file_is_never_served(
    store: ArtifactStore, source: str, tmp_path: Path, how: str, memory_bytes: int
) -> None:
    root = tmp_path / "variants"
    first = VariantCache(store, root, memory_bytes=memory_bytes)
    good = await first.get(source, SPEC, "alice")
    await first.close()
    data = good.path.read_bytes()
    good.path.write_bytes(_torn(data, how))
    # A restart after the power loss: nothing in memory, the torn file and its sidecar on disk.
    restarted = VariantCache(store, root, memory_bytes=memory_bytes)
    try:
        again = await restarted.get(source, SPEC, "alice")
        await restarted.flush()
        assert restarted.computations == 1
        assert again.etag == good.etag
        assert again.path.read_bytes() == data
        if again.data is not None:
            assert again.data == data
    finally:
        await restarted.close()


async def test_a_cache_that_cannot_be_written_still_answers(
    store: ArtifactStore, source: str, tmp_path: Path
) -> None:
    root = tmp_path / "variants"
    cache = VariantCache(store, root)
    try:
        sha = source.rsplit("/", 1)[-1].split(".", 1)[0]
        (root / sha[:2]).write_bytes(b"")  # a file where the variant's folder goes
        first = await cache.get(source, SPEC, "alice")
        await cache.flush()
        assert first.data is not None and first.width == 100
        assert not first.path.exists()
        again = await cache.get(source, SPEC, "alice")  # from memory
        assert again.data == first.data and cache.computations == 1
    finally:
        await cache.close()
