"""The upload writer: a thread per file hashes and writes what the event loop hands over."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aiserver.errors import ServiceError
from aiserver.spool import KEEP_CONTENT_BYTES, InputSpool, UploadBudget
from aiserver.spool_memory import BLOCK_BYTES, SpoolMemory


async def test_a_large_upload_is_written_and_hashed_whole(tmp_path: Path) -> None:
    spool = InputSpool(tmp_path)
    data = os.urandom(20 * 1024 * 1024 + 17)  # past the inline size and the queue bound
    writer = spool.open("image", "big.bin", UploadBudget(1 << 30))
    for start in range(0, len(data), 1 << 20):
        await writer.write(data[start : start + (1 << 20)])
    done = await writer.finish()
    assert done.size == len(data) and done.sha256 == hashlib.sha256(data).hexdigest()
    assert done.path.read_bytes() == data
    committed = spool.commit(done)
    assert committed.path == spool.path_for(done.sha256) and committed.path.read_bytes() == data
    assert list(spool.tmp_dir.iterdir()) == []


async def test_a_midsize_upload_needs_no_thread(tmp_path: Path) -> None:
    spool = InputSpool(tmp_path)
    writer = spool.open("image", "mid.png", UploadBudget(1 << 22))
    data = os.urandom(KEEP_CONTENT_BYTES + 1)  # past what is kept as bytes, within inline
    await writer.write(data[:100])
    await writer.write(data[100:])
    done = await writer.finish()
    assert writer._thread is None
    assert done.written and done.content is None and done.path.read_bytes() == data
    assert done.sha256 == hashlib.sha256(data).hexdigest()


async def test_a_small_job_input_is_kept_as_bytes_and_written_only_when_committed(
    tmp_path: Path,
) -> None:
    # The job store may keep it with the job (no file at all); else commit writes its file.
    spool = InputSpool(tmp_path)
    writer = spool.open("image", "small.png", UploadBudget(1 << 20))
    await writer.write(b"abc")
    await writer.write(b"def")
    done = await writer.finish()
    assert writer._thread is None and not done.written and done.content == b"abcdef"
    assert done.sha256 == hashlib.sha256(b"abcdef").hexdigest()
    assert list(spool.tmp_dir.iterdir()) == []  # no file created
    committed = spool.commit(done)
    assert committed.written and committed.path == spool.path_for(done.sha256)
    assert committed.path.read_bytes() == b"abcdef"
    assert list(spool.tmp_dir.iterdir()) == []


async def test_an_unhashed_upload_cannot_be_committed(tmp_path: Path) -> None:
    spool = InputSpool(tmp_path)
    writer = spool.open("image", "a.png", UploadBudget(1 << 30), hashed=False)
    await writer.write(os.urandom(1 << 20))
    done = await writer.finish()
    assert done.sha256 == "" and done.size == 1 << 20
    with pytest.raises(ValueError):
        spool.commit(done)


async def test_an_oversize_upload_is_refused_on_the_chunk_that_passes_the_limit(
    tmp_path: Path,
) -> None:
    spool = InputSpool(tmp_path)
    writer = spool.open("image", "a.png", UploadBudget(3 << 20))
    for _ in range(3):
        await writer.write(os.urandom(1 << 20))  # the thread runs from the third one
    assert writer._thread is not None
    with pytest.raises(ServiceError) as exc:
        await writer.write(b"x")
    assert exc.value.reason == "UPLOAD_TOO_LARGE"
    writer.discard()
    assert list(spool.tmp_dir.iterdir()) == []
    writer._thread.join(5)
    assert not writer._thread.is_alive()


async def test_an_upload_abandoned_mid_stream_leaves_no_file(tmp_path: Path) -> None:
    spool = InputSpool(tmp_path)
    writer = spool.open("image", "a.png", UploadBudget(1 << 30))
    blocked = asyncio.create_task(_write_forever(writer))
    while writer._thread is None or writer._room is None:  # the queue is full: it waits
        await asyncio.sleep(0.001)
    blocked.cancel()  # what a client abort does to the reading handler
    with pytest.raises(asyncio.CancelledError):
        await blocked
    writer.discard()
    assert list(spool.tmp_dir.iterdir()) == []
    writer._thread.join(5)
    assert not writer._thread.is_alive()


async def _write_forever(writer: Any) -> None:
    chunk = os.urandom(1 << 20)
    while True:
        await writer.write(chunk)


async def test_a_discarded_large_upload_is_gone_at_once_and_its_descriptor_closed(
    tmp_path: Path,
) -> None:
    from aiserver.api.uploads import Upload

    spool = InputSpool(tmp_path)
    files = {}
    for name, size in (("image", 9 * 1024 * 1024), ("mask", 1000)):
        writer = spool.open(name, f"{name}.bin", UploadBudget(1 << 30), hashed=False)
        await writer.write(os.urandom(size))
        files[name] = await writer.finish()
    before = len(os.listdir("/proc/self/fd"))
    Upload(None, files).discard()
    assert list(spool.tmp_dir.iterdir()) == []  # the names go before discard returns
    for _ in range(100):  # the large file's pages are freed in a worker thread
        if len(os.listdir("/proc/self/fd")) == before:
            break
        await asyncio.sleep(0.01)
    assert len(os.listdir("/proc/self/fd")) == before
    Upload(None, files).discard()  # twice is harmless


async def test_a_small_upload_used_once_never_touches_the_disk(tmp_path: Path) -> None:
    from aiserver.api.uploads import Upload

    spool = InputSpool(tmp_path)
    writer = spool.open("image", "a.jpg", UploadBudget(1 << 30), hashed=False)
    data = os.urandom((1 << 20) + 5)
    await writer.write(memoryview(data)[: 1 << 20])  # chunks arrive as views of the message
    await writer.write(memoryview(data)[1 << 20 :])
    assert list(spool.tmp_dir.iterdir()) == []
    done = await writer.finish()
    assert done.held is not None and done.held.tobytes() == data
    assert done.size == len(data) and done.sha256 == ""
    assert list(spool.tmp_dir.iterdir()) == [] and not done.path.exists()
    Upload(None, {"image": done}).discard()
    writer.discard()  # harmless
    assert spool.memory.used == 0


async def test_a_large_upload_used_once_is_held_in_memory_within_the_budget(
    tmp_path: Path,
) -> None:
    from aiserver.api.uploads import Upload

    spool = InputSpool(tmp_path, memory=SpoolMemory(32 << 20))  # one upload: up to 8 MiB
    writer = spool.open("image", "a.bmp", UploadBudget(1 << 30), hashed=False)
    data = os.urandom(8 << 20)
    for start in range(0, len(data), 1 << 20):
        await writer.write(data[start : start + (1 << 20)])
    done = await writer.finish()
    assert done.held is not None and done.held.tobytes() == data and writer._thread is None
    assert list(spool.tmp_dir.iterdir()) == []
    assert spool.memory.used == len(data)
    with done.held.open() as fh:  # what the image pool reads
        assert fh.read(5) == data[:5]
        fh.seek(BLOCK_BYTES - 3)
        assert fh.read(10) == data[BLOCK_BYTES - 3 : BLOCK_BYTES + 7]  # across two blocks
        assert fh.seek(-4, 2) == len(data) - 4 and fh.read() == data[-4:] and fh.read(1) == b""
    reader = done.held.open()
    writer.discard()  # read_upload discards every writer when a later file fails
    with pytest.raises(ValueError):  # released: a cancelled call's worker stops early
        reader.read(1)
    assert spool.memory.used == len(data)  # the blocks are its own until it closes
    reader.close()
    assert spool.memory.used == 0
    Upload(None, {"image": done}).discard()
    assert spool.memory.used == 0 and spool.memory.kept == 0  # kept as received: no blocks


async def test_an_upload_used_once_past_its_share_spills_what_it_held_then_the_rest(
    tmp_path: Path,
) -> None:
    spool = InputSpool(tmp_path, memory=SpoolMemory(32 << 20, share=3 << 20))
    writer = spool.open("image", "a.bmp", UploadBudget(1 << 30), hashed=False)
    data = os.urandom((12 << 20) + 3)
    for start in range(0, len(data), 1 << 20):
        await writer.write(data[start : start + (1 << 20)])
        assert spool.memory.used <= 3 << 20
    done = await writer.finish()
    assert done.held is None and done.path.read_bytes() == data
    assert spool.memory.used == 0


async def test_an_upload_used_once_spills_when_the_process_budget_runs_out(
    tmp_path: Path,
) -> None:
    from aiserver.api.uploads import Upload

    spool = InputSpool(tmp_path, memory=SpoolMemory(8 << 20, share=8 << 20))
    first = spool.open("image", "a.bmp", UploadBudget(1 << 30), hashed=False)
    second = spool.open("image", "b.bmp", UploadBudget(1 << 30), hashed=False)
    a, b = os.urandom(6 << 20), os.urandom(5 << 20)
    for start in range(0, 6 << 20, 1 << 20):
        await first.write(a[start : start + (1 << 20)])
    for start in range(0, 5 << 20, 1 << 20):  # holds 2 MiB, then the budget is out
        await second.write(b[start : start + (1 << 20)])
    held, spilled = await first.finish(), await second.finish()
    assert held.held is not None and held.held.tobytes() == a
    assert spilled.held is None and spilled.path.read_bytes() == b
    assert spool.memory.used == len(a)  # the spilled one's share is back once written
    Upload(None, {"image": held}).discard()
    Upload(None, {"image": spilled}).discard()
    assert spool.memory.used == 0
    assert list(spool.tmp_dir.iterdir()) == []


async def test_with_no_memory_budget_every_upload_is_written(tmp_path: Path) -> None:
    spool = InputSpool(tmp_path, memory=SpoolMemory(0))
    writer = spool.open("image", "a.jpg", UploadBudget(1 << 30), hashed=False)
    await writer.write(b"abc")
    done = await writer.finish()
    assert done.held is None and done.path.read_bytes() == b"abc"


@pytest.mark.parametrize("spill", [False, True])
async def test_an_upload_used_once_abandoned_mid_stream_gives_its_memory_back(
    tmp_path: Path, spill: bool
) -> None:
    spool = InputSpool(tmp_path, memory=SpoolMemory(64 << 20, share=(2 if spill else 16) << 20))
    writer = spool.open("image", "a.bmp", UploadBudget(1 << 30), hashed=False)
    for _ in range(4):
        await writer.write(os.urandom(1 << 20))
    assert (writer._thread is not None) == spill
    assert spool.memory.used <= (2 if spill else 4) << 20
    writer.discard()  # what read_upload does on a cancel, a disconnect or an error
    await _until(lambda: spool.memory.used == 0)  # spilled: once the thread is past them
    assert list(spool.tmp_dir.iterdir()) == []


async def _until(check: Callable[[], bool], within: float = 10.0) -> None:
    for _ in range(int(within / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    assert check()


async def test_a_spilled_upload_gives_its_blocks_back_once_written_not_at_its_end(
    tmp_path: Path,
) -> None:
    # A slow client: the rest of the upload may take up to upload_timeout_s.
    spool = InputSpool(tmp_path, memory=SpoolMemory(64 << 20, share=3 << 20))
    writer = spool.open("image", "a.bmp", UploadBudget(1 << 30), hashed=False)
    data = os.urandom(4 << 20)
    for start in range(0, len(data), 1 << 20):  # the 4th chunk spills
        await writer.write(data[start : start + (1 << 20)])
    assert writer._thread is not None
    await _until(lambda: spool.memory.used == 0)  # before finish
    done = await writer.finish()
    assert done.held is None and done.path.read_bytes() == data
    assert spool.memory.used == 0
    writer.discard()
    assert spool.memory.used == 0  # given back once (kept as received: no blocks)


async def test_a_discarded_spill_keeps_its_blocks_until_the_thread_is_past_them(
    tmp_path: Path,
) -> None:
    spool = InputSpool(tmp_path, memory=SpoolMemory(64 << 20, share=3 << 20))
    writer = spool.open("image", "a.bmp", UploadBudget(1 << 30), hashed=False)
    # The file is a pipe nobody reads yet: the thread's first write blocks on its block.
    os.mkfifo(writer.path)
    pipe = os.open(writer.path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        for _ in range(4):
            await writer.write(os.urandom(1 << 20))
        assert writer._thread is not None
        writer.discard()
        await asyncio.sleep(0.1)
        assert spool.memory.used == 3 << 20  # still being written: not for another upload
        async with asyncio.timeout(30):
            while writer._thread.is_alive():  # the reader catches up
                with contextlib.suppress(BlockingIOError):
                    os.read(pipe, 1 << 20)
                await asyncio.sleep(0.001)
    finally:
        os.close(pipe)
    assert spool.memory.used == 0
    assert list(spool.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("held", [0, 300 << 10])
async def test_a_small_upload_with_no_room_is_joined_in_memory_without_a_thread(
    tmp_path: Path, held: int
) -> None:
    # The budget full (or 0): as a hashed upload, written at the end on the loop.
    spool = InputSpool(
        tmp_path, memory=SpoolMemory(2 * BLOCK_BYTES if held else 0, share=2 * BLOCK_BYTES)
    )
    writer = spool.open("image", "a.jpg", UploadBudget(1 << 30), hashed=False)
    first, second = os.urandom(held or 100), os.urandom(300 << 10)
    await writer.write(first)
    assert spool.memory.used == held  # kept as received
    await writer.write(second)  # no room for it: spills
    assert writer._thread is None and list(spool.tmp_dir.iterdir()) == []
    assert spool.memory.used == 0  # what it held is copied out
    done = await writer.finish()
    assert done.held is None and done.path.read_bytes() == first + second
    assert writer._thread is None and spool.memory.used == 0


async def test_a_finished_small_upload_is_deleted_by_discard(tmp_path: Path) -> None:
    # read_upload discards every writer when a later file fails: one already written too.
    spool = InputSpool(tmp_path)
    writer = spool.open("image", "small.png", UploadBudget(1 << 22))
    await writer.write(bytes(KEEP_CONTENT_BYTES + 1))
    done = await writer.finish()
    assert done.path.exists() and done.held is None
    writer.discard()
    assert list(spool.tmp_dir.iterdir()) == []
