"""VariantCache on real files: sizes, caching, single flight, the JPEG draft path, retention."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from aiserver.artifacts.spec import parse_spec
from aiserver.artifacts.store import ArtifactStore
from aiserver.artifacts.variants import VariantCache
from aiserver.errors import ErrorKind, ServiceError
from aiserver.imaging import transforms
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


@pytest.mark.parametrize(
    ("spec", "size"),
    [
        ("width=100", (100, 50)),
        ("height=50", (100, 50)),
        ("width=100,height=100", (100, 50)),  # contain: inside the box
        ("width=100,height=100,fit=cover", (100, 100)),
        ("width=100,height=100,fit=fill", (100, 100)),
        ("width=300,height=20,fit=fill", (300, 20)),
        ("width=100,height=10,fit=contain", (20, 10)),
        ("width=1000", (400, 200)),  # never enlarged with one side
        ("width=1000,height=1000", (400, 200)),  # nor with contain
    ],
)
async def test_variant_sizes(
    cache: VariantCache, source: str, spec: str, size: tuple[int, int]
) -> None:
    variant = await cache.get(source, parse_spec(spec), "alice")
    assert (variant.width, variant.height) == size
    await cache.flush()  # the files are written once the variant is handed over
    with Image.open(variant.path) as img:
        assert img.size == size
        assert img.format == "WEBP"
    assert variant.mime_type == "image/webp"
    assert variant.size == variant.path.stat().st_size


async def test_formats_and_url(cache: VariantCache, source: str) -> None:
    variant = await cache.get(source, parse_spec("width=64,format=jpeg,quality=70"), "alice")
    await cache.flush()
    with Image.open(variant.path) as img:
        assert img.format == "JPEG"
    assert variant.mime_type == "image/jpeg"
    assert variant.spec == "width=64,format=jpg,quality=70"
    rel = source.removeprefix("artifacts/")
    assert variant.url == f"/variants/width=64,format=jpg,quality=70/{rel}"
    png = await cache.get(source, parse_spec("height=20,format=png"), "alice")
    assert png.mime_type == "image/png" and png.height == 20


async def test_second_request_does_no_image_work(cache: VariantCache, source: str) -> None:
    first = await cache.get(source, parse_spec("width=100"), "alice")
    await cache.flush()
    mtime = first.path.stat().st_mtime_ns
    second = await cache.get(source, parse_spec("width=100,fit=cover,quality=80"), "alice")
    assert cache.computations == 1
    assert second == first
    assert first.path.stat().st_mtime_ns == mtime
    await cache.get(source, parse_spec("width=101"), "alice")
    assert cache.computations == 2


async def test_concurrent_identical_requests_compute_once(cache: VariantCache, source: str) -> None:
    spec = parse_spec("width=120,height=80,fit=cover")
    variants = await asyncio.gather(*(cache.get(source, spec, "alice") for _ in range(12)))
    assert cache.computations == 1
    assert len({v.etag for v in variants}) == 1


async def test_a_cancelled_waiter_does_not_cancel_the_work(
    cache: VariantCache, source: str
) -> None:
    spec = parse_spec("width=50")
    first = asyncio.ensure_future(cache.get(source, spec, "alice"))
    second = asyncio.ensure_future(cache.get(source, spec, "alice"))
    for _ in range(1000):  # until the shared render has started
        if cache._inflight:
            break
        await asyncio.sleep(0.001)
    first.cancel()
    variant = await second
    assert cache.computations == 1 and variant.width == 50


async def test_etag_is_the_content_hash_and_stable(
    store: ArtifactStore, cache: VariantCache, source: str, tmp_path: Path
) -> None:
    spec = parse_spec("width=90")
    variant = await cache.get(source, spec, "alice")
    await cache.flush()
    assert variant.etag == hashlib.sha256(variant.path.read_bytes()).hexdigest()
    again = VariantCache(store, tmp_path / "variants")  # a restart: served from disk
    assert (await again.get(source, spec, "alice")).etag == variant.etag
    assert again.computations == 0
    fresh = VariantCache(store, tmp_path / "other-cache")  # rendered anew: same bytes
    assert (await fresh.get(source, spec, "alice")).etag == variant.etag


async def test_variants_respect_owners(cache: VariantCache, source: str) -> None:
    with pytest.raises(ServiceError) as exc:
        await cache.get(source, parse_spec("width=10"), "mallory")
    assert (exc.value.kind, exc.value.reason) == (ErrorKind.NOT_FOUND, "ARTIFACT_NOT_FOUND")
    assert cache.computations == 0
    assert (await cache.get(source, parse_spec("width=10"), None)).width == 10  # admin


async def test_unsafe_source_names_are_refused(cache: VariantCache) -> None:
    with pytest.raises(ServiceError) as exc:
        await cache.get("artifacts/../../etc/passwd", parse_spec("width=10"), None)
    assert exc.value.kind is ErrorKind.INVALID_ARGUMENT


async def test_retention_removes_variants(
    store: ArtifactStore, cache: VariantCache, source: str
) -> None:
    variant = await cache.get(source, parse_spec("width=30"), "alice")
    await cache.flush()
    assert variant.path.exists()
    assert await store.sweep(None, 0, protect=lambda _: False, fresh_s=0) == [source]
    assert not variant.path.exists()
    assert not variant.path.parent.exists()
    with pytest.raises(ServiceError) as exc:
        await cache.get(source, parse_spec("width=30"), "alice")
    assert exc.value.reason == "ARTIFACT_NOT_FOUND"


async def test_large_jpeg_is_downscaled_through_the_draft_path(
    store: ArtifactStore, cache: VariantCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000), (10, 120, 200)).save(buf, format="JPEG", quality=80)
    name = await put(store, buf.getvalue(), mime_type="image/jpeg", size=(4000, 3000))
    decoded: list[tuple[int, int]] = []
    real = transforms.apply_jpeg_draft

    def spy(image: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
        result = real(image, size)
        decoded.append(result)
        return result

    monkeypatch.setattr(transforms, "apply_jpeg_draft", spy)
    variant = await cache.get(name, parse_spec("width=256"), "alice")
    assert (variant.width, variant.height) == (256, 192)
    # libjpeg decoded at 1/8 scale (500x375), never the 12 MP source.
    assert decoded == [(500, 375)]
