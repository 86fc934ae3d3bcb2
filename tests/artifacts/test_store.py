"""ArtifactStore on every backend (SQLite + folder, PostgreSQL + S3): naming, dedup, owners,
ranged reads, retention; and the folder's layout and path safety (``local_store``)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from aiserver.artifacts.index import NewRef, SqliteArtifactIndex
from aiserver.artifacts.store import ArtifactStore
from aiserver.blobs import BlobStore
from aiserver.errors import ErrorKind, ServiceError
from tests.artifacts.helpers import Clock, Coordinators, PausedDeletes, put

DATA = bytes(range(256)) * 40  # 10240 bytes
SHA = hashlib.sha256(DATA).hexdigest()


async def read_all(
    store: ArtifactStore, name: str, owner: str | None = "alice", **kw: int
) -> bytes:
    return b"".join([chunk async for chunk in store.read(name, owner, **kw)])


async def stored(store: ArtifactStore, name: str) -> bool:
    """Whether the blob of ``name`` exists, on whichever backend."""
    return await store.blobs.size(store.relative_path(name)) is not None


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".png", ".jpg"))


async def test_put_names_file_and_metadata(local_store: ArtifactStore) -> None:
    ref = await local_store.put(
        DATA,
        file_name="cat.png",
        mime_type="image/png",
        width=64,
        height=40,
        seed=7,
        provider="comfy-1",
        job_id="j1",
        owner="alice",
    )
    assert ref.name == f"artifacts/2031/05/06/{SHA}.png"
    assert ref.url == f"/artifacts/2031/05/06/{SHA}.png"
    assert (ref.sha256, ref.size_bytes, ref.width, ref.height) == (SHA, len(DATA), 64, 40)
    assert (ref.seed, ref.provider, ref.job_id, ref.file_name) == (7, "comfy-1", "j1", "cat.png")
    path = local_store.path_of(ref.name)
    assert path == local_store.root / f"2031/05/06/{SHA}.png"
    assert path.read_bytes() == DATA
    assert list((local_store.root / ".tmp").iterdir()) == []  # the temp file was renamed away
    assert await local_store.get(ref.name, "alice") == ref
    assert await local_store.get(ref.url, None) == ref  # URL path and admin view


async def test_extension_follows_mime_type(store: ArtifactStore) -> None:
    name = await put(store, b"jpeg-ish", mime_type="image/jpeg")
    assert name.endswith(".jpg")
    with pytest.raises(ServiceError) as exc:
        await put(store, b"x", mime_type="text/html")
    assert exc.value.reason == "UNSUPPORTED_MIME_TYPE"


async def test_identical_bytes_are_stored_once(local_store: ArtifactStore, clock: Clock) -> None:
    first = await put(local_store, DATA, owner="alice", job_id="j1")
    path = local_store.path_of(first)
    mtime = path.stat().st_mtime_ns
    clock.advance(3 * 86400)  # another day: still the first name
    second = await put(local_store, DATA, owner="bob", job_id="j2")
    third = await put(local_store, DATA, owner="alice", job_id="j3")
    assert first == second == third
    assert files_under(local_store.root) == [path]
    assert path.stat().st_mtime_ns == mtime  # not rewritten
    assert (await local_store.get(first, "bob")).job_id == "j2"
    assert (await local_store.get(first, "alice")).job_id == "j3"  # the owner's latest reference


async def test_other_owners_artifact_is_not_found_like_a_missing_one(store: ArtifactStore) -> None:
    name = await put(store, DATA, owner="alice")
    missing = name.replace(SHA, "0" * 64)
    errors = []
    for candidate in (name, missing):
        with pytest.raises(ServiceError) as exc:
            await store.get(candidate, "mallory")
        errors.append((exc.value.kind, exc.value.reason))
        with pytest.raises(ServiceError) as exc:
            await read_all(store, candidate, "mallory")
        errors.append((exc.value.kind, exc.value.reason))
    assert set(errors) == {(ErrorKind.NOT_FOUND, "ARTIFACT_NOT_FOUND")}
    assert await read_all(store, name, None) == DATA  # admin sees everything


@pytest.mark.parametrize(
    ("offset", "limit", "chunk", "expected"),
    [
        (0, 0, 1000, DATA),
        (0, 0, 256 * 1024, DATA),
        (100, 0, 999, DATA[100:]),
        (100, 50, 7, DATA[100:150]),
        (10000, 1000, 64, DATA[10000:]),
        (len(DATA) - 1, 0, 1, DATA[-1:]),
        (len(DATA), 0, 64, b""),
    ],
)
async def test_read_ranges(
    store: ArtifactStore, offset: int, limit: int, chunk: int, expected: bytes
) -> None:
    name = await put(store, DATA)
    chunks = [c async for c in store.read(name, "alice", offset, limit, chunk)]
    assert b"".join(chunks) == expected
    assert all(len(c) <= chunk for c in chunks)


@pytest.mark.parametrize(
    ("offset", "limit", "reason", "field"),
    [
        (len(DATA) + 1, 0, "READ_OFFSET_OUT_OF_RANGE", "read_offset"),
        (-1, 0, "INVALID_READ_OFFSET", "read_offset"),
        (0, -5, "INVALID_READ_LIMIT", "read_limit"),
    ],
)
async def test_read_rejects_bad_ranges(
    store: ArtifactStore, offset: int, limit: int, reason: str, field: str
) -> None:
    name = await put(store, DATA)
    with pytest.raises(ServiceError) as exc:
        await read_all(store, name, offset=offset, limit=limit)
    assert exc.value.kind is ErrorKind.INVALID_ARGUMENT
    assert exc.value.reason == reason
    assert [v.field for v in exc.value.violations] == [field]


@pytest.mark.parametrize(
    "name",
    [
        "artifacts/../etc/passwd",
        "../../../etc/passwd",
        f"artifacts/2031/05/06/../../../{SHA}.png",
        f"artifacts/2031/05/%2e%2e/{SHA}.png",
        f"artifacts/%2e%2e/%2e%2e/{SHA}.png",
        "/etc/passwd",
        f"/tmp/2031/05/06/{SHA}.png",
        f"//2031/05/06/{SHA}.png",
        f"artifacts/2031/05/06/{SHA}.png\x00.txt",
        f"artifacts/2031/05/06/{SHA}\x00.png",
        f"artifacts\\2031\\05\\06\\{SHA}.png",
        f"artifacts/2031/05/06\\..\\{SHA}.png",
        f"artifacts/2031/05/06/{SHA}.exe",
        f"artifacts/2031/05/06/{SHA}.png.json",
        f"artifacts/2031/05/06/{SHA}.png\n",
        f"artifacts/2031/05/06/{SHA.upper()}.png",
        f"artifacts/2031/05/06/{SHA[:-1]}.png",
        f"artifacts/\uff12\uff10\uff13\uff11/05/06/{SHA}.png",  # full-width digits
        f"artifacts//2031/05/06/{SHA}.png",
        "artifacts.sqlite3",
        "artifacts/.tmp/x.part",
        "",
    ],
)
async def test_unsafe_names_are_refused(store: ArtifactStore, name: str) -> None:
    await put(store, DATA)
    for call in (
        lambda: store.relative_path(name),
        lambda: store.get(name, None),
        lambda: read_all(store, name, None),
    ):
        with pytest.raises(ServiceError) as exc:
            result = call()
            if not isinstance(result, str):
                await result
        assert exc.value.kind in (ErrorKind.INVALID_ARGUMENT, ErrorKind.NOT_FOUND)


async def test_symlinked_file_inside_root_is_refused(
    local_store: ArtifactStore, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"top secret")
    name = await put(local_store, DATA)
    path = local_store.path_of(name)
    path.unlink()
    path.symlink_to(secret)  # planted inside the root, pointing outside
    with pytest.raises(ServiceError) as exc:
        local_store.path_of(name)
    assert exc.value.reason == "ARTIFACT_NOT_FOUND"
    with pytest.raises(ServiceError) as exc:
        await read_all(local_store, name)
    assert exc.value.reason == "ARTIFACT_NOT_FOUND"


async def test_symlinked_folder_inside_root_is_refused(
    local_store: ArtifactStore, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    (outside / "05" / "06").mkdir(parents=True)
    (outside / "05" / "06" / f"{SHA}.png").write_bytes(b"not yours")
    (local_store.root / "2032").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ServiceError) as exc:
        local_store.path_of(f"artifacts/2032/05/06/{SHA}.png")
    assert exc.value.kind is ErrorKind.NOT_FOUND


async def test_unknown_extension_is_refused(local_store: ArtifactStore) -> None:
    with pytest.raises(ServiceError) as exc:
        local_store.path_of(f"artifacts/2031/05/06/{SHA}.svg")
    assert exc.value.reason == "INVALID_ARTIFACT_NAME"
    assert [v.field for v in exc.value.violations] == ["name"]


async def test_metadata_survives_a_restart(tmp_path: Path, clock: Clock) -> None:
    first = ArtifactStore(tmp_path / "s", clock=clock)
    name = await put(first, DATA, owner="alice")
    await first.close()
    second = ArtifactStore(tmp_path / "s", clock=clock)
    try:
        assert (await second.get(name, "alice")).sha256 == SHA
        assert await read_all(second, name) == DATA
    finally:
        await second.close()


async def test_sweep_by_age_respects_protect(store: ArtifactStore, clock: Clock) -> None:
    old = await put(store, b"old" * 10)
    clock.advance(60)
    kept = await put(store, b"kept" * 10)
    clock.advance(60)
    fresh = await put(store, b"fresh" * 10)
    clock.advance(30)
    deleted = await store.sweep(90, None, protect=lambda name: name == kept, fresh_s=0)
    assert deleted == [old]
    assert not await stored(store, old)
    for name in (kept, fresh):
        assert await stored(store, name)
        await store.get(name, "alice")
    with pytest.raises(ServiceError) as exc:
        await store.get(old, "alice")
    assert exc.value.reason == "ARTIFACT_NOT_FOUND"


async def test_sweep_age_counts_from_the_latest_put(store: ArtifactStore, clock: Clock) -> None:
    name = await put(store, DATA, job_id="j1")
    clock.advance(1000)
    await put(store, DATA, job_id="j2")  # re-referenced: young again
    assert await store.sweep(500, None, protect=lambda _: False, fresh_s=0) == []
    assert await stored(store, name)


async def test_sweep_by_total_size_oldest_first(store: ArtifactStore, clock: Clock) -> None:
    names = []
    for i in range(4):
        names.append(await put(store, bytes([i]) * 100, job_id=f"j{i}"))
        clock.advance(10)
    protected = {names[0]}
    deleted = await store.sweep(None, 200, protect=lambda n: n in protected, fresh_s=0)
    assert deleted == [names[1], names[2]]  # the oldest is protected, so the next two go
    assert [await stored(store, n) for n in names] == [True, False, False, True]
    assert await store.sweep(None, 200, protect=lambda n: n in protected, fresh_s=0) == []


async def test_put_after_sweep_stores_again(store: ArtifactStore, clock: Clock) -> None:
    name = await put(store, DATA)
    assert await store.sweep(None, 0, protect=lambda _: False, fresh_s=0) == [name]
    clock.advance(86400)
    again = await put(store, DATA)
    assert again != name and again.startswith("artifacts/2031/05/07/")
    assert await read_all(store, again) == DATA


async def test_large_artifact_round_trip(store: ArtifactStore) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    name = await put(store, data)
    assert name.endswith(hashlib.sha256(data).hexdigest() + ".png")
    assert await read_all(store, name, offset=1024 * 1024 + 5) == data[1024 * 1024 + 5 :]


async def test_same_bytes_named_first_elsewhere_keep_the_first_name(
    store: ArtifactStore, clock: Clock
) -> None:
    # The same bytes on a later day: the reference lands on the first name, and no copy is
    # written under the new day's key (the register names the key before any write).
    first = await put(store, DATA, owner="alice", job_id="j1")
    rel = store.relative_path(first)
    clock.advance(86400)
    assert await put(store, DATA, owner="bob", job_id="j2") == first
    assert (await store.get(first, "bob")).job_id == "j2"
    assert await store.blobs.size(f"2031/05/07/{SHA}.png") is None
    row = await store.index.register(
        NewRef(f"2031/05/08/{SHA}.webp", SHA, "image/webp", len(DATA), 1, 1,
               clock().timestamp(), "carol", "j3", "c.webp", None, "comfy")
    )  # fmt: skip
    assert (row.path, row.mime_type, row.owner) == (rel, "image/png", "carol")


async def test_register_says_whether_the_bytes_are_new(store: ArtifactStore, clock: Clock) -> None:
    # Its caller then writes new bytes without looking first (on S3, a HEAD fewer).
    new = NewRef(f"2031/05/06/{SHA}.png", SHA, "image/png", len(DATA), 1, 1,
                 clock().timestamp(), "alice", "j1", "a.png", None, "comfy")  # fmt: skip
    assert (await store.index.register(new)).new_blob
    clock.advance(1)
    again = await store.index.register(replace(new, now=clock().timestamp(), job_id="j2"))
    assert not again.new_blob
    found = await store.index.lookup(again.path, "alice", "j1")
    assert found is not None and not found.new_blob  # reads never say so


async def test_registers_that_meet_answer_each_its_own(store: ArtifactStore, clock: Clock) -> None:
    # On PostgreSQL registers of different bytes that meet go in one statement (group
    # commit): each still gets its own answer - the key its bytes belong under (known
    # bytes keep their first), whether they are new, its reference.
    first = await put(store, DATA, owner="alice", job_id="j0")
    clock.advance(86400)
    blobs = [DATA] + [os.urandom(64) for _ in range(11)]
    shas = [hashlib.sha256(b).hexdigest() for b in blobs]
    now = clock().timestamp()
    refs = await asyncio.gather(
        *(store.index.register(NewRef(f"2031/05/07/{sha}.png", sha, "image/png", 64, 1, 1, now,
                                      f"owner{i}", f"j{i}", f"{i}.png", i, "comfy"))
          for i, sha in enumerate(shas))
    )  # fmt: skip
    if hasattr(store.index, "_registers"):  # PostgreSQL
        assert store.index._registers.grouped > 1
    assert refs[0].path == store.relative_path(first) and not refs[0].new_blob
    assert [(r.sha256, r.owner, r.job_id, r.seed) for r in refs] == [
        (sha, f"owner{i}", f"j{i}", i) for i, sha in enumerate(shas)
    ]
    assert all(r.new_blob and r.path == f"2031/05/07/{r.sha256}.png" for r in refs[1:])
    for r in refs:
        found = await store.index.lookup(r.path, r.owner, r.job_id)
        assert found is not None and found.sha256 == r.sha256


async def test_two_coordinators_put_the_same_bytes_at_once(coordinators: Coordinators) -> None:
    # Clocks a day apart, so each would name new bytes differently: one blob row, the bytes
    # under the one key, every reference on it.
    early, late = Clock(), Clock()
    late.advance(86400)
    a, b = await coordinators.open(early), await coordinators.open(late)
    data = os.urandom(50_000)
    names = await asyncio.wait_for(
        asyncio.gather(*(put(s, data, job_id=f"{i}-{n}") for i in range(10) for n, s in
                         (("a", a), ("b", b)))),
        60,
    )  # fmt: skip
    assert len(set(names)) == 1
    name = names[0]
    assert [blob.name for blob in await b.index.blobs()] == [name]
    sha = hashlib.sha256(data).hexdigest()
    keys = {f"2031/05/06/{sha}.png", f"2031/05/07/{sha}.png"}
    assert [await a.blobs.size(k) for k in sorted(keys - {a.relative_path(name)})] == [None]
    for i in range(10):
        for n in "ab":
            assert await a.index.lookup(a.relative_path(name), "alice", f"{i}-{n}") is not None
    assert await read_all(b, name) == data


async def test_a_put_racing_a_retention_delete_keeps_its_bytes(
    coordinators: Coordinators, clock: Clock
) -> None:
    # Coordinator A's retention deletes the blob; while its bytes are being deleted (the
    # row is gone already), B puts the same bytes. B's put must end with its reference and
    # its bytes in place: not skip its write because the old bytes are still there.
    paused: list[PausedDeletes] = []

    def pause(blobs: BlobStore) -> BlobStore:
        paused.append(PausedDeletes(blobs))
        return paused[-1]

    a = await coordinators.open(clock, wrap=pause)
    b = await coordinators.open(clock)
    name = await put(a, DATA, job_id="j1")
    sweep = asyncio.create_task(a.sweep(None, 0, protect=lambda _: False, fresh_s=0))
    await asyncio.wait_for(paused[0].reached.wait(), 10)
    again = asyncio.create_task(put(b, DATA, job_id="j2"))
    await asyncio.sleep(0.3)  # B's put goes as far as it can meanwhile
    paused[0].resume.set()
    assert await asyncio.wait_for(sweep, 10) == [name]
    assert await asyncio.wait_for(again, 10) == name  # the same day: the same key again
    assert (await b.get(name, "alice")).job_id == "j2"
    assert await read_all(b, name) == DATA


async def test_a_delete_after_a_put_refreshed_the_blob_keeps_it(
    coordinators: Coordinators, clock: Clock
) -> None:
    # Retention listed the blob, then another coordinator stored the bytes again: the delete
    # must see the newer put and leave row and bytes alone.
    a, b = await coordinators.open(clock), await coordinators.open(clock)
    name = await put(a, DATA, job_id="j1")
    [listed] = await a.index.blobs()
    clock.advance(5)
    await put(b, DATA, job_id="j2")
    dropped: list[str] = []

    async def drop() -> None:
        dropped.append(listed.name)

    rel = a.relative_path(name)
    assert not await a.index.forget(rel, listed.sha256, listed.last_put, drop)
    assert dropped == []
    assert await read_all(a, name) == DATA


async def test_a_failed_byte_delete_keeps_the_row_on_postgres(
    coordinators: Coordinators, clock: Clock
) -> None:
    # PostgreSQL deletes the row in the transaction that deletes the bytes: a failure there
    # rolls it back. SQLite has committed its delete by then (the bytes stay unindexed).
    a = await coordinators.open(clock)
    name = await put(a, DATA)
    [blob] = await a.index.blobs()

    async def fail() -> None:
        raise OSError("the bucket said no")

    with pytest.raises(OSError):
        await a.index.forget(a.relative_path(name), blob.sha256, blob.last_put, fail)
    kept = await a.index.lookup(a.relative_path(name), "alice") is not None
    assert kept == (coordinators.index_kind == "postgres")
    assert await stored(a, name)  # the drop never ran
    if kept:
        assert await read_all(a, name) == DATA


async def test_a_put_writes_the_bytes_its_row_lacks(
    coordinators: Coordinators, clock: Clock
) -> None:
    # As after a coordinator died between a register and its write: the next put of the
    # same bytes writes them.
    a = await coordinators.open(clock)
    name = await put(a, DATA, job_id="j1")
    await a.blobs.delete(a.relative_path(name))
    assert await put(a, DATA, job_id="j2") == name
    assert await read_all(a, name) == DATA


async def test_many_concurrent_puts_finish(store: ArtifactStore) -> None:
    # More puts than index connections: none may wait for a connection another holds.
    blobs = [os.urandom(64) + bytes([i]) for i in range(12)]
    names = await asyncio.wait_for(
        asyncio.gather(*(put(store, b, job_id=f"j{i}") for i, b in enumerate(blobs))), 60
    )
    assert len(set(names)) == 12
    assert [await read_all(store, n) for n in names] == blobs


async def test_sweep_keeps_fresh_blobs_whatever_the_limits(
    store: ArtifactStore, clock: Clock
) -> None:
    old = await put(store, b"old" * 10, job_id="j1")
    clock.advance(120)
    young = await put(store, b"young" * 10, job_id="j2")
    clock.advance(30)
    # Both over the size cap and the age limit; only the blob older than fresh_s goes.
    deleted = await store.sweep(10, 0, protect=lambda _: False, fresh_s=60)
    assert deleted == [old]
    assert await stored(store, young)
    clock.advance(31)
    assert await store.sweep(10, 0, protect=lambda _: False, fresh_s=60) == [young]


class _PausedPuts(PausedDeletes):
    """Its puts wait for ``resume`` (``reached`` set then), or fail when ``fail`` is set."""

    fail = False

    async def put(self, key: str, data: bytes, *, fresh: bool = False) -> None:
        self.reached.set()
        await self.resume.wait()
        if self.fail:
            raise OSError("the disk is full")
        await self.inner.put(key, data, fresh=fresh)


async def test_a_sweep_while_a_put_writes_keeps_its_row(
    coordinators: Coordinators, clock: Clock
) -> None:
    # A's put registered the row and is still writing; B's retention (cap 0) runs then. With
    # the default freshness the new row stays: deleting it would leave A's bytes unindexed and
    # its reference dangling.
    paused: list[_PausedPuts] = []

    def pause(blobs: BlobStore) -> BlobStore:
        paused.append(_PausedPuts(blobs))
        return paused[-1]

    a = await coordinators.open(clock, wrap=pause)
    b = await coordinators.open(clock)
    writing = asyncio.create_task(put(a, DATA, job_id="j1"))
    await asyncio.wait_for(paused[0].reached.wait(), 10)
    if a.index.__class__.__name__.startswith("Sqlite") and coordinators.blob_kind == "folder":
        paused[0].resume.set()  # one process, local folder: the write is under the row's lock
    assert await b.sweep(None, 0, protect=lambda _: False) == []
    paused[0].resume.set()
    name = await asyncio.wait_for(writing, 10)
    assert (await b.get(name, "alice")).job_id == "j1"
    assert await read_all(b, name) == DATA


async def test_a_put_whose_write_fails_takes_back_its_new_row(
    coordinators: Coordinators, clock: Clock
) -> None:
    failing: list[_PausedPuts] = []

    def fail(blobs: BlobStore) -> BlobStore:
        failing.append(_PausedPuts(blobs))
        failing[-1].fail = True
        failing[-1].resume.set()
        return failing[-1]

    a = await coordinators.open(clock, wrap=fail)
    with pytest.raises(OSError):
        await put(a, DATA, job_id="j1")
    assert await a.index.blobs() == []  # no row whose bytes never came


async def test_a_put_of_known_bytes_makes_no_thread_hop(
    local_store: ArtifactStore, clock: Clock
) -> None:
    first = await put(local_store, DATA, job_id="j1")
    clock.advance(1)  # (bytes put again at the very same instant count as new)
    # Every worker thread of the loop busy (a slow disk, say): a put of bytes the store
    # already has registers its reference on the loop and is done.
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(pool)
    gate = threading.Event()
    pool.submit(gate.wait, 10)
    try:
        again = asyncio.create_task(put(local_store, DATA, job_id="j2", owner="bob"))
        new = asyncio.create_task(put(local_store, DATA + b"new", job_id="j3"))
        done, _ = await asyncio.wait({again, new}, timeout=5)
        assert done == {again}  # new bytes wait for the thread (their write and syncs)
    finally:
        gate.set()
    assert await again == first
    assert (await local_store.get(first, "bob")).job_id == "j2"
    assert await read_all(local_store, await new) == DATA + b"new"


async def test_a_put_of_known_bytes_whose_file_is_gone_writes_it(
    local_store: ArtifactStore,
) -> None:
    name = await put(local_store, DATA, job_id="j1")
    local_store.path_of(name).unlink()
    assert await put(local_store, DATA, job_id="j2") == name
    assert await read_all(local_store, name) == DATA


@pytest.mark.parametrize("lagging", [False, True])
async def test_the_sqlite_index_wal_starts_over(tmp_path: Path, lagging: bool) -> None:
    # Commits on the loop never checkpoint (that waits for the disk): the index does it in
    # a thread every CHECKPOINT_EVERY (200) writes. Each register adds ~31 KB to the WAL:
    # 1,000 are ~31 MB without checkpoints, 200 about 6 MB. ``lagging``: the checkpoint's
    # thread starts late (a busy machine): the WAL must not grow meanwhile.
    index = SqliteArtifactIndex(tmp_path / "artifacts.sqlite3")
    if lagging:
        checkpoint = index._checkpoint

        def late_checkpoint() -> None:
            time.sleep(0.2)
            checkpoint()

        index._checkpoint = late_checkpoint  # type: ignore[method-assign]
    try:
        for n in range(1000):
            sha = hashlib.sha256(str(n).encode()).hexdigest()
            await index.register(
                NewRef(f"2031/05/06/{sha}.png", sha, "image/png", 10, 1, 1, float(n),
                       "alice", f"j{n}", "out.png", None, "comfy")
            )  # fmt: skip
        # (Closing checkpoints it all and deletes the file.)
        assert (tmp_path / "artifacts.sqlite3-wal").stat().st_size < 10_000_000
    finally:
        await index.close()


def _new_ref(sha: str, now: float, owner: str, job_id: str) -> NewRef:
    return NewRef(f"2031/05/06/{sha}.png", sha, "image/png", 10, 1, 1, now, owner, job_id,
                  f"{job_id}.png", None, "comfy")  # fmt: skip


async def test_the_sqlite_index_answers_a_repeated_lookup_without_a_statement(
    tmp_path: Path,
) -> None:
    # Every warm variant begins with this lookup; its statement cost more than the rest of
    # the variant's handler.
    index = SqliteArtifactIndex(tmp_path / "artifacts.sqlite3")
    statements: list[str] = []
    try:
        ref = await index.register(_new_ref(SHA, 1.0, "alice", "j1"))
        first = await index.lookup(ref.path, "alice")
        index._conn.set_trace_callback(statements.append)  # the index's only connection
        assert await index.lookup(ref.path, "alice") == first
        assert statements == []
        assert await index.lookup(ref.path, "bob") is None  # another key: asked, not kept
        assert await index.lookup(ref.path, "bob") is None
        assert len(statements) == 2
    finally:
        await index.close()


async def test_the_sqlite_index_lookups_follow_every_write(tmp_path: Path) -> None:
    index = SqliteArtifactIndex(tmp_path / "artifacts.sqlite3")
    try:
        ref = await index.register(_new_ref(SHA, 1.0, "alice", "j1"))
        for owner in ("alice", None):
            assert (await index.lookup(ref.path, owner)).job_id == "j1"  # type: ignore[union-attr]
        await index.register(_new_ref(SHA, 2.0, "alice", "j2"))  # newer: the one looked up
        for owner in ("alice", None):
            assert (await index.lookup(ref.path, owner)).job_id == "j2"  # type: ignore[union-attr]
        await index.register(_new_ref(SHA, 3.0, "bob", "j3"))
        assert (await index.lookup(ref.path, None)).job_id == "j3"  # type: ignore[union-attr]
        assert (await index.lookup(ref.path, "alice")).job_id == "j2"  # type: ignore[union-attr]

        async def drop() -> None:
            # The row is gone before the bytes: no lookup finds it from here on.
            assert await index.lookup(ref.path, "alice") is None

        assert await index.forget(ref.path, SHA, 3.0, drop)
        for owner in ("alice", "bob", None):
            assert await index.lookup(ref.path, owner) is None
    finally:
        await index.close()


async def test_a_deleted_artifact_is_not_found_after_warm_reads(
    local_store: ArtifactStore, clock: Clock
) -> None:
    name = await put(local_store, DATA, job_id="j1")
    for _ in range(3):
        assert (await local_store.get(name, "alice")).job_id == "j1"
    clock.advance(10 * 86400)
    assert await local_store.sweep(3600, None, protect=lambda _: False)
    with pytest.raises(ServiceError) as exc:
        await local_store.get(name, "alice")
    assert exc.value.kind is ErrorKind.NOT_FOUND


async def test_a_repeated_read_of_an_artifact_makes_no_new_ref(
    local_store: ArtifactStore, clock: Clock
) -> None:
    name = await put(local_store, DATA, job_id="j1")
    first = await local_store.get(name, "alice")
    assert await local_store.get(name, "alice") is first  # the index's row was the same
    clock.advance(1)
    await put(local_store, DATA, job_id="j2")  # a newer reference: a new row, a new ref
    assert (await local_store.get(name, "alice")).job_id == "j2"
    assert (await local_store.get(name, None)).job_id == "j2"
