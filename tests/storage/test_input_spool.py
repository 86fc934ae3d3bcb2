"""Inputs through a shared blob store: a job's inputs reach whichever process runs it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from aiserver.blobs import BlobStore
from aiserver.spool import InputSpool, UploadBudget


async def _upload(spool: InputSpool, data: bytes) -> str:
    writer = spool.open("image", "in.png", UploadBudget(1 << 30))
    await writer.write(data)
    spooled = spool.commit(await writer.finish())
    spool.unpin(spooled)
    return spooled.sha256


async def test_an_input_shared_by_one_process_is_found_by_another(
    tmp_path: Path, blobs: BlobStore
) -> None:
    data = os.urandom(2 * 1024 * 1024 + 3)
    here = InputSpool(tmp_path / "a", shared=blobs)
    there = InputSpool(tmp_path / "b", shared=blobs)
    sha = await _upload(here, data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert not await there.share(sha)  # not shared yet: nowhere the other process can see
    assert await here.share(sha)
    assert await here.share(sha)  # idempotent
    assert await there.share(sha)  # found in the shared store

    path = await there.local_path(sha)
    assert path == there.path_for(sha) and path.read_bytes() == data
    assert list(there.tmp_dir.iterdir()) == []

    here.delete_local(sha)
    await here.delete_shared(sha)
    there.delete_local(sha)
    assert not await there.share(sha)
    with pytest.raises(FileNotFoundError):
        await there.local_path(sha)


async def test_without_a_shared_store_the_spool_is_the_folder(tmp_path: Path) -> None:
    spool = InputSpool(tmp_path / "spool")
    assert not spool.shared
    sha = await _upload(spool, b"bytes")
    assert await spool.share(sha)
    assert await spool.local_path(sha) == spool.path_for(sha)
    spool.delete_local(sha)
    await spool.delete_shared(sha)  # nothing shared: nothing to do
    assert not await spool.share(sha)
    with pytest.raises(FileNotFoundError):
        await spool.local_path(sha)


async def test_inputs_are_committed_again_after_their_folder_went(tmp_path: Path) -> None:
    # The spool makes each {sha[:2]} folder once; one removed since (by hand, or a cleanup)
    # is made again.
    spool = InputSpool(tmp_path / "spool")
    data = b"first input"
    sha = await _upload(spool, data)
    spool.delete_local(sha)
    spool.path_for(sha).parent.rmdir()
    assert await _upload(spool, data) == sha
    assert spool.path_for(sha).read_bytes() == data
    assert list(spool.tmp_dir.iterdir()) == []


async def test_uploads_in_flight_have_distinct_temporary_files(tmp_path: Path) -> None:
    spool = InputSpool(tmp_path / "spool")
    budget = UploadBudget(1 << 30)
    writers = [spool.open("image", "in.png", budget) for _ in range(3)]
    assert len({w.path for w in writers}) == 3
    for n, writer in enumerate(writers):
        await writer.write(b"same bytes" if n else b"other bytes")
    files = [await w.finish() for w in writers]
    assert [f.content for f in files] == [b"other bytes", b"same bytes", b"same bytes"]
    for f in files:  # small: each written by its commit, from its own temporary file
        spool.unpin(spool.commit(f))
    assert [f.path.read_bytes() for f in files] == [b"other bytes", b"same bytes", b"same bytes"]
    assert list(spool.tmp_dir.iterdir()) == []
