"""ArtifactStore on every backend (SQLite + folder, PostgreSQL + S3): naming, dedup, owners,
ranged reads, retention; and the folder's layout and path safety (``local_store``)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from aiserver.artifacts.index import NewRef
from aiserver.artifacts.store import ArtifactStore
from aiserver.errors import ErrorKind, ServiceError
from tests.artifacts.helpers import Clock, put

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
    deleted = await store.sweep(90, None, protect=lambda name: name == kept)
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
    assert await store.sweep(500, None, protect=lambda _: False) == []
    assert await stored(store, name)


async def test_sweep_by_total_size_oldest_first(store: ArtifactStore, clock: Clock) -> None:
    names = []
    for i in range(4):
        names.append(await put(store, bytes([i]) * 100, job_id=f"j{i}"))
        clock.advance(10)
    protected = {names[0]}
    deleted = await store.sweep(None, 200, protect=lambda n: n in protected)
    assert deleted == [names[1], names[2]]  # the oldest is protected, so the next two go
    assert [await stored(store, n) for n in names] == [True, False, False, True]
    assert await store.sweep(None, 200, protect=lambda n: n in protected) == []


async def test_put_after_sweep_stores_again(store: ArtifactStore, clock: Clock) -> None:
    name = await put(store, DATA)
    assert await store.sweep(None, 0, protect=lambda _: False) == [name]
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
    # Another process looked the hash up before this one registered it, on the next day:
    # its own key loses, its copy goes, and its reference lands on the first name.
    first = await put(store, DATA, owner="alice", job_id="j1")
    rel = store.relative_path(first)
    clock.advance(86400)
    late = f"2031/05/07/{SHA}.png"
    await store.blobs.put(late, DATA)
    row = await store.index.register(
        NewRef(late, SHA, "image/png", len(DATA), 1, 1, clock().timestamp(), "bob", "j2",
               "b.png", None, "comfy")
    )  # fmt: skip
    assert row.path == rel and row.owner == "bob"
    assert (await store.get(first, "bob")).job_id == "j2"


async def test_hold_is_exclusive_per_hash(store: ArtifactStore) -> None:
    entered = asyncio.Event()

    async def second() -> None:
        async with store.index.hold(SHA):
            entered.set()

    async with store.index.hold(SHA):
        waiting = asyncio.create_task(second())
        async with store.index.hold("f" * 64):  # another hash is free
            pass
        await asyncio.sleep(0.3)
        assert not entered.is_set()
    await asyncio.wait_for(waiting, 10)
    assert entered.is_set()


async def test_many_concurrent_puts_finish(store: ArtifactStore) -> None:
    # More puts than index connections: holding a hash must not starve the queries.
    blobs = [os.urandom(64) + bytes([i]) for i in range(12)]
    names = await asyncio.wait_for(
        asyncio.gather(*(put(store, b, job_id=f"j{i}") for i, b in enumerate(blobs))), 60
    )
    assert len(set(names)) == 12
    assert [await read_all(store, n) for n in names] == blobs
