"""The in-memory variants: served without files, bounded by bytes, dropped with their
source, checked against the owner on every request, and a torn cache file is never served."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aiserver.artifacts.spec import parse_spec
from aiserver.artifacts.store import ArtifactStore
from aiserver.artifacts.variants import MemoryLru, Variant, VariantCache
from aiserver.errors import ErrorKind, ServiceError
from tests.artifacts.helpers import image_bytes, put


@pytest.fixture
async def cache(store: ArtifactStore, tmp_path: Path) -> AsyncIterator[VariantCache]:
    c = VariantCache(store, tmp_path / "variants")
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def source(store: ArtifactStore) -> str:
    return await put(store, image_bytes((400, 200)), size=(400, 200))


def _variant(spec: str, size: int) -> Variant:
    return Variant(Path("x"), "image/webp", 1, 1, size, "e", spec, "/u", "s", b"\0" * size)


def test_the_least_recently_used_go_first_once_past_the_byte_bound() -> None:
    lru = MemoryLru(max_bytes=250, max_item_bytes=200)
    lru.put("a", _variant("w=1", 100))
    lru.put("a", _variant("w=2", 100))
    assert lru.get("a", "w=1") is not None  # w=2 is now the least recently used
    lru.put("b", _variant("w=1", 100))
    assert lru.bytes == 200 and len(lru) == 2
    assert lru.get("a", "w=2") is None
    assert lru.get("a", "w=1") is not None and lru.get("b", "w=1") is not None
    lru.put("c", _variant("w=1", 201))  # above the item bound: never held
    assert lru.get("c", "w=1") is None and lru.bytes == 200
    lru.put("a", _variant("w=1", 50))  # replaced, not counted twice
    assert lru.bytes == 150
    lru.drop_source("a")
    assert lru.bytes == 100 and lru.get("a", "w=1") is None


async def test_a_warm_variant_is_served_from_memory_without_its_file(
    cache: VariantCache, source: str
) -> None:
    spec = parse_spec("width=100")
    first = await cache.get(source, spec, "alice")
    await cache.flush()
    assert first.data is not None and first.data == first.path.read_bytes()
    first.path.unlink()  # a hit must not need the file
    again = await cache.get(source, spec, "alice")
    assert again.data == first.data and cache.computations == 1


async def test_memory_does_not_bypass_the_owner_check(cache: VariantCache, source: str) -> None:
    spec = parse_spec("width=100")
    await cache.get(source, spec, "alice")
    assert len(cache.memory) == 1
    with pytest.raises(ServiceError) as exc:
        await cache.get(source, spec, "mallory")
    assert (exc.value.kind, exc.value.reason) == (ErrorKind.NOT_FOUND, "ARTIFACT_NOT_FOUND")


async def test_retention_drops_the_variants_held_in_memory(
    store: ArtifactStore, cache: VariantCache, source: str
) -> None:
    await cache.get(source, parse_spec("width=30"), "alice")
    await cache.get(source, parse_spec("width=40"), "alice")
    assert len(cache.memory) == 2 and cache.memory.bytes > 0
    assert await store.sweep(None, 0, protect=lambda _: False, fresh_s=0) == [source]
    assert len(cache.memory) == 0 and cache.memory.bytes == 0
    with pytest.raises(ServiceError) as exc:
        await cache.get(source, parse_spec("width=30"), "alice")
    assert exc.value.reason == "ARTIFACT_NOT_FOUND"


async def test_a_torn_cache_file_is_rendered_again(
    store: ArtifactStore, source: str, tmp_path: Path
) -> None:
    spec = parse_spec("width=100")
    first = VariantCache(store, tmp_path / "variants")
    good = await first.get(source, spec, "alice")
    await first.flush()
    assert good.data is not None
    torn = bytes(len(good.data))  # same size, other bytes: what a power loss can leave
    good.path.write_bytes(torn)
    restarted = VariantCache(store, tmp_path / "variants")
    again = await restarted.get(source, spec, "alice")
    await restarted.flush()
    assert restarted.computations == 1
    assert again.data == good.data and again.path.read_bytes() == good.data


async def test_presets_are_rendered_when_an_artifact_is_stored(
    store: ArtifactStore, cache: VariantCache
) -> None:
    thumb = parse_spec("width=64")
    cache.prerender([thumb])
    name = await put(store, image_bytes((300, 150)), size=(300, 150))
    for _ in range(500):
        if cache.memory.get(_sha(name), thumb.canonical) is not None:
            break
        await asyncio.sleep(0.01)
    assert cache.computations == 1
    first = await cache.get(name, thumb, "alice")  # the first request is warm
    assert cache.computations == 1 and first.width == 64 and first.data is not None


def _sha(name: str) -> str:
    return name.rsplit("/", 1)[-1].split(".", 1)[0]
