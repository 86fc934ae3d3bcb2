"""One set of blob-store tests, run on the local folder and on S3 (moto's real server)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
import pytest

from aiserver.blobs import BlobStore, LocalBlobStore
from aiserver.blobs.s3 import S3BlobStore

KEY = "2031/05/06/" + "a" * 64 + ".png"


async def _read(store: BlobStore, key: str, offset: int = 0, length: int | None = None) -> bytes:
    return b"".join([c async for c in store.read(key, offset, length, chunk_size=1000)])


async def test_put_then_read_whole_and_ranges(blobs: BlobStore) -> None:
    data = os.urandom(5000)
    assert await blobs.size(KEY) is None
    await blobs.put(KEY, data)
    assert await blobs.size(KEY) == 5000
    assert await _read(blobs, KEY) == data
    assert await _read(blobs, KEY, 1234) == data[1234:]
    assert await _read(blobs, KEY, 10, 2500) == data[10:2510]
    assert await _read(blobs, KEY, 4990, 100) == data[4990:]  # a range past the end is cut
    assert await _read(blobs, KEY, 5000) == b""
    assert await _read(blobs, KEY, 0, 0) == b""
    chunks = [c async for c in blobs.read(KEY, chunk_size=1000)]
    assert [len(c) for c in chunks] == [1000] * 5


async def test_a_key_keeps_its_first_bytes(blobs: BlobStore) -> None:
    await blobs.put(KEY, b"first")
    await blobs.put(KEY, b"second, longer")  # content-addressed callers never do this
    assert await _read(blobs, KEY) == b"first"


async def test_a_fresh_put_writes_without_looking_on_s3(blobs: BlobStore) -> None:
    # fresh: the caller has just indexed these bytes as new. S3 skips its HEAD (a request's
    # client CPU); the folder keeps its look (a stat).
    calls: list[str] = []
    if isinstance(blobs, S3BlobStore):
        blobs._client.meta.events.register(
            "before-call.s3", lambda model, **_: calls.append(model.name)
        )
    await blobs.put(KEY, b"new bytes", fresh=True)
    await blobs.put(KEY.replace("a", "b"), b"other bytes")
    assert await _read(blobs, KEY) == b"new bytes"
    if isinstance(blobs, S3BlobStore):
        assert calls[:3] == ["PutObject", "HeadObject", "PutObject"]


async def test_missing_blobs(blobs: BlobStore) -> None:
    with pytest.raises(FileNotFoundError):
        await _read(blobs, KEY)
    with pytest.raises(FileNotFoundError):
        await _read(blobs, KEY, 0, 0)
    with pytest.raises(FileNotFoundError):
        async with blobs.local_file(KEY):
            pass
    await blobs.delete(KEY)  # deleting what is gone is no error


async def test_delete(blobs: BlobStore) -> None:
    await blobs.put(KEY, b"bytes")
    await blobs.delete(KEY)
    assert await blobs.size(KEY) is None
    with pytest.raises(FileNotFoundError):
        await _read(blobs, KEY)
    await blobs.put(KEY, b"again")  # a deleted key can be stored anew
    assert await _read(blobs, KEY) == b"again"


def _frame(offset: int, length: int) -> tuple[bytes, bytes]:
    return f"<{offset}+{length}|".encode(), f"|{offset + length}>".encode()


def _unframe(chunks: list[bytes]) -> tuple[bytes, list[int]]:
    """The bytes inside each chunk's frame (checked against the frame's own words), and the
    offset of each chunk."""
    data, offsets = b"", []
    for chunk in chunks:
        head, _, rest = chunk.partition(b"|")
        offset, length = (int(x) for x in head[1:].split(b"+"))
        assert (head + b"|", rest[length:]) == _frame(offset, length)
        data += rest[:length]
        offsets.append(offset)
    return data, offsets


async def test_a_framed_read_puts_each_chunk_in_its_frame(blobs: BlobStore) -> None:
    data = os.urandom(200_000)
    await blobs.put(KEY, data)
    for offset, length in ((0, None), (1234, None), (10, 150_000), (199_990, 100)):
        chunks = [c async for c in blobs.read(KEY, offset, length, 64 * 1024, frame=_frame)]
        got, offsets = _unframe(chunks)
        end = len(data) if length is None else min(len(data), offset + length)
        assert got == data[offset:end]
        assert offsets == list(range(offset, end, 64 * 1024))
        assert all(type(c) is bytes for c in chunks)


async def test_local_file_holds_the_bytes(blobs: BlobStore) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    await blobs.put(KEY, data)
    async with blobs.local_file(KEY) as path:
        assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()


async def test_concurrent_puts_of_many_keys(blobs: BlobStore) -> None:
    keys = {f"2031/05/06/{i:064x}.png": os.urandom(100 + i) for i in range(20)}
    await asyncio.gather(*(blobs.put(k, v) for k, v in keys.items()))
    got = await asyncio.gather(*(_read(blobs, k) for k in keys))
    assert got == list(keys.values())


async def test_presigned_url_serves_the_blob_or_is_none(blobs: BlobStore) -> None:
    await blobs.put(KEY, b"signed bytes")
    url = blobs.presigned_url(KEY, 60)
    if isinstance(blobs, LocalBlobStore):
        assert url is None  # the service signs its own /artifacts URLs
        return
    assert url is not None
    async with httpx.AsyncClient() as client:
        ok = await client.get(url)
        assert ok.status_code == 200 and ok.content == b"signed bytes"
    # (moto does not check signatures, so a forged URL cannot be shown refused here.)


async def test_local_keys_never_leave_the_root(tmp_path: object) -> None:
    from pathlib import Path

    root = Path(str(tmp_path)) / "blobs"
    store = LocalBlobStore(root)
    outside = Path(str(tmp_path)) / "outside"
    outside.mkdir()
    (outside / "x.png").write_bytes(b"secret")
    (root / "2031").mkdir()
    (root / "2031" / "05").symlink_to(outside)
    with pytest.raises(FileNotFoundError):
        await _read(store, "2031/05/x.png")
    assert await store.size("2031/05/x.png") is None


async def test_local_symlinks_and_dot_dot_are_refused_at_any_level(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    outside = tmp_path / "outside"
    (outside / "06").mkdir(parents=True)
    (outside / "06" / "x.png").write_bytes(b"secret")
    await store.put("2031/05/07/y.png", b"mine")
    (store.root / "2031" / "05" / "06").symlink_to(outside / "06")  # the last folder
    (store.root / "2031" / "05" / "07" / "z.png").symlink_to(outside / "06" / "x.png")  # file
    for key in ("2031/05/06/x.png", "2031/05/07/z.png", "2031/05/07/../06/x.png", "../x.png"):
        with pytest.raises(FileNotFoundError):
            await _read(store, key)
        assert await store.size(key) is None
    assert await _read(store, "2031/05/07/y.png") == b"mine"
    assert await _read(store, "2031/05/07/./y.png") == b"mine"  # as Path reads it
    assert await store.size("2031/05/07/y.png/more") is None  # a file is no folder


async def test_a_local_blob_that_is_no_regular_file_is_missing_without_blocking(
    tmp_path: Path,
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    await store.put("2031/05/07/y.png", b"mine")
    fifo = store.root / "2031" / "05" / "07" / "fifo.png"
    os.mkfifo(fifo)  # no writer: a blocking open would wait for ever, on the event loop
    (store.root / "2031" / "05" / "07" / "dir.png").mkdir()
    for key in ("2031/05/07/fifo.png", "2031/05/07/dir.png"):
        with pytest.raises(FileNotFoundError):
            await asyncio.wait_for(_read(store, key), 5)
        assert await store.size(key) is None


def test_concurrent_puts_share_directory_syncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: each caller returns after a sync that began after its call, and calls
    that arrive while a sync runs share the next one."""
    from aiserver.blobs.local import _DirSyncs

    began: list[float] = []
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        began.append(time.monotonic())
        time.sleep(0.05)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    syncs = _DirSyncs()
    called: dict[int, float] = {}
    returned: dict[int, float] = {}

    def put(i: int) -> None:
        called[i] = time.monotonic()
        syncs.sync(tmp_path)
        returned[i] = time.monotonic()

    threads = [threading.Thread(target=put, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(returned) == 16
    assert len(began) <= 4, began  # 16 callers, a few syncs
    for i in range(16):
        assert any(called[i] <= b <= returned[i] for b in began), i


@pytest.mark.parametrize("evicted", [False, True], ids=["page cache", "disk"])
async def test_local_reads_whole_and_ranges_from_cache_or_disk(
    tmp_path: Path, evicted: bool
) -> None:
    """Chunks in the page cache are read on the event loop, others in threads one ahead:
    the bytes are the same either way, for every range."""
    store = LocalBlobStore(tmp_path / "blobs")
    data = os.urandom(3 * 1024 * 1024 + 123)
    await store.put(KEY, data)

    def evict() -> None:
        if not evicted:
            return
        fd = os.open(store.root / KEY, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    for offset, length in ((0, None), (1, None), (70_000, 2_000_000), (len(data) - 5, 100)):
        evict()
        chunks = [c async for c in store.read(KEY, offset, length, chunk_size=1 << 20)]
        end = len(data) if length is None else offset + length
        assert b"".join(chunks) == data[offset:end]
        assert all(isinstance(c, bytes) and 0 < len(c) <= 1 << 20 for c in chunks)


@pytest.mark.parametrize("evicted", [False, True], ids=["page cache", "disk"])
async def test_a_local_framed_read_from_cache_or_disk(tmp_path: Path, evicted: bool) -> None:
    """Each chunk is read into its frame on either path (event loop or threads), and a chunk
    cut short (the file shrank under the reader) gets the frame of what was read."""
    store = LocalBlobStore(tmp_path / "blobs")
    data = os.urandom(3 * 1024 * 1024 + 123)
    await store.put(KEY, data)
    path = store.root / KEY
    if evicted:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    chunks = [c async for c in store.read(KEY, 5, None, 1 << 20, frame=_frame)]
    got, offsets = _unframe(chunks)
    assert got == data[5:]
    assert offsets == [5 + i * (1 << 20) for i in range(4)]

    # Blobs are never rewritten; a file cut short by hand still gives whole frames.
    reader = store.read(KEY, 0, None, 1 << 20, frame=_frame)
    first = await anext(reader)
    os.truncate(path, 1_500_000)
    rest = [c async for c in reader]
    got, offsets = _unframe([first, *rest])
    assert got == data[:1_500_000]
    assert offsets == [0, 1 << 20]


@pytest.mark.parametrize("chunk_size", [1 << 20, 40_000], ids=["1 MiB", "inline"])
async def test_a_local_framed_chunk_is_one_buffer(tmp_path: Path, chunk_size: int) -> None:
    """The read lands in the framed object itself: no second buffer of the chunk's size
    (a zero-filled one read into, then joined into the frame, was two)."""
    store = LocalBlobStore(tmp_path / "blobs")
    await store.put(KEY, os.urandom(chunk_size * 3 if chunk_size > 1 << 16 else chunk_size))
    reader = store.read(KEY, 0, None, chunk_size, frame=_frame)
    tracemalloc.start()
    try:
        chunk = await anext(reader)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await reader.aclose()  # type: ignore[attr-defined]  # an async generator
    assert len(chunk) == chunk_size + sum(len(part) for part in _frame(0, chunk_size))
    assert chunk_size <= peak < chunk_size * 1.5


async def test_a_local_read_abandoned_mid_file_closes_its_descriptor(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    await store.put(KEY, os.urandom(4 * 1024 * 1024))
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        reader = store.read(KEY, chunk_size=1 << 20)
        assert len(await anext(reader)) == 1 << 20
        await reader.aclose()  # type: ignore[attr-defined]  # an async generator
    await asyncio.sleep(0.05)  # a read still in a thread closes the descriptor when done
    assert len(os.listdir("/proc/self/fd")) == before


def test_local_put_makes_again_a_folder_removed_since_its_last_put(tmp_path: Path) -> None:
    """The folder of a day is made once and remembered; removed meanwhile (by hand, or a
    cleanup), the next put of that day makes it again instead of failing."""
    store = LocalBlobStore(tmp_path / "blobs")
    store.put_now("2026/12/07/a.png", b"first")
    shutil.rmtree(tmp_path / "blobs" / "2026")
    store.put_now("2026/12/07/b.png", b"second")
    assert (tmp_path / "blobs" / "2026/12/07/b.png").read_bytes() == b"second"
    assert list((tmp_path / "blobs" / ".tmp").iterdir()) == []


def test_local_put_that_fails_leaves_no_temp_file(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    (tmp_path / "blobs" / "2026").write_bytes(b"a file where the folder goes")
    with pytest.raises(OSError):
        store.put_now("2026/12/07/a.png", b"bytes")
    assert list((tmp_path / "blobs" / ".tmp").iterdir()) == []
    store.put_now("2027/01/01/a.png", b"ok")  # the store goes on
    assert (tmp_path / "blobs" / "2027/01/01/a.png").read_bytes() == b"ok"
