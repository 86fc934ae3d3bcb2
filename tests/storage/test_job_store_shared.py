"""Primitives that let several processes share one job store, on every backend.

Two store instances on one database stand for two processes (on SQLite, the embedded
single-process default, they still must agree through the file)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import pytest

from aiserver.errors import ServiceError
from aiserver.jobs.model import ArtifactRef, InputRef, Job, JobState
from aiserver.jobs.store import (
    ActiveLimitReached,
    Announcement,
    JobQuery,
    JobRecord,
    JobStore,
    LeaseLost,
    NewEvent,
    SqliteJobStore,
    migrations,
)
from aiserver.tasks import ImageToTextSpec, TaskKind
from tests.storage.backends import JobStoreBackend
from tests.storage.test_job_store import make_job

SHORT = 0.8  # seconds: a lease the tests let expire, yet that holds through the checks
# made while it is held (0.2 s lapsed by accident when a loaded machine stalled them)


async def _two(backend: JobStoreBackend) -> tuple[JobStore, JobStore]:
    return await backend.open(), await backend.open()


async def test_claims_never_overlap_across_processes(backend: JobStoreBackend) -> None:
    a, b = await _two(backend)
    jobs = [make_job(i) for i in range(12)]
    for job in jobs:
        await a.create(JobRecord(job))
    finished = make_job(99, state=JobState.SUCCEEDED)
    await a.create(JobRecord(finished))

    leases = await asyncio.gather(
        *(store.claim(name, 30) for _ in range(10) for store, name in ((a, "A"), (b, "B")))
    )
    got = [lease for lease in leases if lease is not None]
    assert len(got) == 12 and leases.count(None) == 8
    assert sorted(lease.job_id for lease in got) == sorted(j.id for j in jobs)
    assert not any(lease.takeover for lease in got)
    assert await a.claim("A", 30) is None  # the finished job is never claimed


async def test_claim_takes_the_oldest_and_filters_by_task(backend: JobStoreBackend) -> None:
    store = await backend.open()
    old, new = make_job(1), make_job(2, task=TaskKind.IMAGE_TO_TEXT)
    for job in (new, old):
        await store.create(JobRecord(job))
    text = await store.claim("A", 30, tasks=[TaskKind.IMAGE_TO_TEXT])
    assert text is not None and text.job_id == new.id
    first = await store.claim("A", 30)
    assert first is not None and first.job_id == old.id


async def test_expired_lease_is_taken_over_and_the_old_holder_loses_it(
    backend: JobStoreBackend,
) -> None:
    a, b = await _two(backend)
    job = make_job(1, state=JobState.RUNNING)
    await a.create(JobRecord(job))
    lease = await a.claim("A", SHORT)
    assert lease is not None and lease.holder == "A"
    assert await b.claim("B", 30) is None  # held
    renewed = await a.renew(job.id, "A", SHORT)
    assert renewed is not None and renewed.expires >= lease.expires
    assert await b.renew(job.id, "B", 30) is None  # not the holder

    await asyncio.sleep(SHORT * 1.5)
    taken = await b.claim("B", 30)
    assert taken is not None and taken.job_id == job.id and taken.takeover
    assert await a.renew(job.id, "A", 30) is None  # too late: B holds it now
    assert not await a.release(job.id, "A")
    assert await b.release(job.id, "B")
    again = await a.claim("A", 30)
    assert again is not None and not again.takeover  # released cleanly: no takeover


async def test_active_counts_and_queue_positions(backend: JobStoreBackend) -> None:
    store = await backend.open()
    q1, q2 = make_job(1), make_job(3, owner="bob")
    running = make_job(2, state=JobState.RUNNING)
    done = make_job(4, state=JobState.FAILED)
    for job in (q1, q2, running, done):
        await store.create(JobRecord(job))
    assert await store.count_active() == 3
    assert await store.count_active("alice") == 2
    assert await store.count_active("bob") == 1
    assert await store.count_active("carol") == 0
    assert [await store.queue_position(j.id) for j in (q1, q2, running, done)] == [1, 2, 0, 0]
    assert await store.queue_position("missing") == 0
    q1.state = JobState.RUNNING
    await store.save(JobRecord(q1))
    assert await store.queue_position(q2.id) == 1


async def test_ref_id_race_between_processes_makes_one_job(backend: JobStoreBackend) -> None:
    a, b = await _two(backend)
    results = await asyncio.gather(
        *(s.create(JobRecord(make_job(i, ref_id="once"))) for i, s in enumerate([a, b] * 4))
    )
    ids = {record.job.id for record, _ in results}
    assert len(ids) == 1
    assert [existing for _, existing in results].count(False) == 1


async def test_cancel_request_is_stored_and_announced(backend: JobStoreBackend) -> None:
    a, b = await _two(backend)
    watcher = a if backend.kind == "sqlite" else b  # SQLite announces within its process
    job, done = make_job(1), make_job(2, state=JobState.SUCCEEDED)
    for j in (job, done):
        await a.create(JobRecord(j))
    heard = await watcher.announcements()
    try:
        assert not await b.cancel_requested(job.id)
        assert await a.request_cancel(job.id)
        assert await b.cancel_requested(job.id)
        assert await a.request_cancel(job.id)  # idempotent
        assert not await a.request_cancel(done.id)
        assert not await a.request_cancel("missing")
        first = await asyncio.wait_for(anext(heard), 5)
        assert first == Announcement("cancel", job.id)
    finally:
        await heard.aclose()


async def test_events_are_stored_in_order_and_announced(backend: JobStoreBackend) -> None:
    a, b = await _two(backend)
    watcher = a if backend.kind == "sqlite" else b
    job = make_job(1)
    await a.create(JobRecord(job))
    heard = await watcher.announcements()
    try:
        for seq in (1, 2, 3):
            await a.append_event(job.id, seq, "progress", {"fraction": seq / 4, "ü": "x"})
        with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
            await a.append_event(job.id, 2, "progress", {})
        got = [await asyncio.wait_for(anext(heard), 5) for _ in range(3)]
        assert got == [Announcement("event", job.id, s) for s in (1, 2, 3)]
    finally:
        await heard.aclose()
    events = await b.events(job.id)
    assert [(e.sequence, e.kind, dict(e.payload)) for e in events] == [
        (s, "progress", {"fraction": s / 4, "ü": "x"}) for s in (1, 2, 3)
    ]
    assert [e.sequence for e in await b.events(job.id, after=2)] == [3]
    assert await b.events("missing") == []

    await a.append_event(job.id, 4, "finished", {"state": "SUCCEEDED"})
    assert await b.prune_events(job.id, "progress") == 2  # superseded progress goes
    assert [(e.sequence, e.kind) for e in await b.events(job.id)] == [
        (3, "progress"),
        (4, "finished"),
    ]
    assert await b.prune_events(job.id, "progress") == 0


async def test_inputs_and_artifacts_in_use_come_from_the_database(
    backend: JobStoreBackend,
) -> None:
    store = await backend.open()

    def with_input(n: int, sha: str, state: JobState) -> JobRecord:
        job = make_job(n, state=state)
        job.inputs = [InputRef("image", "in.png", sha, 1, "image/png", 1, 1)]
        return JobRecord(job)

    live = with_input(1, "a" * 64, JobState.RUNNING)
    await store.create(live)
    await store.create(with_input(2, "b" * 64, JobState.SUCCEEDED))
    assert await store.inputs_in_use(["a" * 64, "b" * 64, "c" * 64]) == {"a" * 64}
    assert await store.inputs_in_use([]) == set()

    name = "artifacts/2025/05/01/" + "d" * 64 + ".png"
    out = ArtifactRef(
        name, "/" + name, "o.png", "image/png", 1, 1, 1, "d" * 64, None, "comfy",
        datetime(2025, 5, 1, tzinfo=UTC), live.job.id,
    )  # fmt: skip
    live.job.outputs = [out]
    await store.save(live)
    assert await store.artifacts_in_use() == {name}
    live.job.state = JobState.SUCCEEDED
    await store.save(live)
    assert await store.artifacts_in_use() == set()
    assert await store.inputs_in_use(["a" * 64]) == set()


async def test_agent_slots_are_shared_by_every_process(backend: JobStoreBackend) -> None:
    a, b = await _two(backend)
    claims = await asyncio.gather(
        *(s.claim_slot("gpu-1", 2, name, 30) for s, name in [(a, "A"), (b, "B")] * 5)
    )
    held = [c for c in claims if c is not None]
    assert sorted(c.slot for c in held) == [0, 1]
    assert await a.claim_slot("gpu-2", 1, "A", 30) is not None  # agents are separate

    await a.release_slot(held[0])
    retaken = await b.claim_slot("gpu-1", 2, "B", SHORT)
    assert retaken is not None and retaken.slot == held[0].slot
    assert (await b.renew_slots([retaken], SHORT))[0] is not None
    assert await a.claim_slot("gpu-1", 2, "A", 30) is None
    await asyncio.sleep(SHORT * 1.5)  # B died: its slot frees itself
    assert await b.renew_slots([retaken], 30) == [None]
    freed = await a.claim_slot("gpu-1", 2, "A", 30)
    assert freed is not None and freed.slot == retaken.slot
    assert await a.claim_slot("gpu-1", 3, "A", 30) is not None  # capacity grew


async def test_renew_slots_renews_what_is_still_held_in_one_call(
    backend: JobStoreBackend,
) -> None:
    """A holder's renewal timer renews all its slots at once: each claim still held gets the
    new lease; one that lapsed and was taken by another process, or was released, is lost
    (``None``) and stays the other's."""
    a, b = await _two(backend)
    kept = await a.claim_slot("gpu-1", 3, "A", 30)
    lapsing = await a.claim_slot("gpu-1", 3, "A", SHORT)
    released = await a.claim_slot("gpu-2", 1, "A", 30)
    assert kept is not None and lapsing is not None and released is not None
    await a.release_slot(released)
    await asyncio.sleep(SHORT * 1.5)  # A's short lease lapsed ...
    taken = await b.claim_slot("gpu-1", 2, "B", 30)  # ... and B took that slot
    assert taken is not None and taken.slot == lapsing.slot
    assert await a.renew_slots([], 30) == []
    renewed = await a.renew_slots([kept, lapsing, released], 60)
    assert renewed[1] is None and renewed[2] is None
    assert renewed[0] is not None
    assert (renewed[0].agent, renewed[0].slot, renewed[0].holder) == ("gpu-1", kept.slot, "A")
    assert renewed[0].expires > kept.expires
    # B's slot is still B's; A's renewed one still A's; the released one free.
    assert (await b.renew_slots([taken], 30))[0] is not None
    assert (await a.renew_slots([renewed[0]], 30))[0] is not None
    assert await b.claim_slot("gpu-2", 1, "B", 30) is not None


async def test_renew_slots_loses_a_lapsed_slot_nobody_took(backend: JobStoreBackend) -> None:
    """A lease that lapsed is lost even while its row is still the holder's (nobody took it
    yet): the renewal cannot tell that nobody saw it free, so the holder stops using it;
    anyone may claim it from then on. A closed store refuses the call, even for no claim."""
    a, b = await _two(backend)
    lapsing = await a.claim_slot("gpu-1", 1, "A", SHORT)
    assert lapsing is not None
    await asyncio.sleep(SHORT * 1.5)
    assert await a.renew_slots([lapsing], 30) == [None]
    taken = await b.claim_slot("gpu-1", 1, "B", 30)
    assert taken is not None and taken.slot == lapsing.slot
    await a.close()
    with pytest.raises(ServiceError) as err:
        await a.renew_slots([], 30)
    assert err.value.reason == "STORE_CLOSED"


async def test_a_leader_that_resigns_is_followed_at_once(backend: JobStoreBackend) -> None:
    """``resign`` gives the role up only for its holder: another holder's resign, or one of
    another role, changes nothing."""
    a, b = await _two(backend)
    assert await a.lead("outbox", "A", 30)
    await b.resign("outbox", "B")  # not B's
    await b.resign("retention", "A")  # not led
    assert not await b.lead("outbox", "B", 30)
    await a.resign("outbox", "A")
    assert await b.lead("outbox", "B", 30)
    assert not await a.lead("outbox", "A", 30)


async def test_one_leader_per_role_until_its_lease_lapses(backend: JobStoreBackend) -> None:
    a, b = await _two(backend)
    assert await a.lead("retention", "A", SHORT)
    assert not await b.lead("retention", "B", SHORT)
    assert await b.lead("outbox", "B", 30)  # another role
    assert await a.lead("retention", "A", SHORT)  # renewal
    await asyncio.sleep(SHORT * 1.5)
    assert await b.lead("retention", "B", 30)
    assert not await a.lead("retention", "A", 30)


async def test_webhook_outbox_survives_and_retries(backend: JobStoreBackend) -> None:
    a, b = await _two(backend)
    first = await a.outbox_put("job-1", "https://example.test/h", b"\x00{}")
    second = await a.outbox_put("job-2", "https://example.test/h", b"two")
    await a.close()  # the process that queued them is gone; the deliveries are not
    got = await b.outbox_claim("B", 30, 10)
    assert [(i.id, i.job_id, i.body, i.attempts) for i in got] == [
        (first, "job-1", b"\x00{}", 0),
        (second, "job-2", b"two", 0),
    ]
    c = await backend.open()
    assert await c.outbox_claim("C", 30, 10) == []  # leased to B
    await b.outbox_done(first)
    await b.outbox_failed(second, "HTTP 503", 0)
    retry = await c.outbox_claim("C", 30, 10)
    assert [(i.id, i.attempts) for i in retry] == [(second, 1)]
    await c.outbox_failed(second, "HTTP 410", None)  # given up: kept, never due again
    assert await c.outbox_claim("C", 30, 10) == []


async def test_sqlite_database_from_before_the_version_table_is_migrated(
    backend: JobStoreBackend,
) -> None:
    if backend.kind != "sqlite":
        return  # only SQLite databases predate the version table
    conn = sqlite3.connect(backend.db_path)
    conn.executescript(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, owner TEXT NOT NULL, ref_id TEXT NOT NULL,"
        " task TEXT NOT NULL, spec TEXT NOT NULL, state TEXT NOT NULL, tag TEXT NOT NULL,"
        " reply_to TEXT NOT NULL, provider TEXT NOT NULL, agent TEXT NOT NULL,"
        " attempts INTEGER NOT NULL, created_us INTEGER NOT NULL, updated_us INTEGER NOT NULL,"
        " started_us INTEGER, ended_us INTEGER, progress REAL NOT NULL, inputs TEXT NOT NULL,"
        " outputs TEXT NOT NULL, texts TEXT NOT NULL, error TEXT, resume TEXT NOT NULL,"
        " retries TEXT NOT NULL, last_sequence INTEGER NOT NULL, UNIQUE (owner, ref_id)) STRICT;"
        " INSERT INTO jobs VALUES ('j1', 'alice', 'j1', 'ImageToText', '{}', 'QUEUED', '',"
        ' \'\', \'\', \'\', 0, 1, 1, NULL, NULL, 0.0, \'[{"field": "image", "file_name": "a",'
        ' "sha256": "' + "e" * 64 + '", "size_bytes": 1, "mime_type": "image/png",'
        " \"width\": 1, \"height\": 1}]', '[]', '[]', NULL, '{}', '[]', 0);"
        " PRAGMA user_version = 1;"
    )
    conn.close()
    store = await SqliteJobStore.open(backend.db_path)
    backend.opened.append(store)
    record = await store.get("j1")
    assert record is not None and record.job.spec == ImageToTextSpec()
    assert await store.inputs_in_use(["e" * 64]) == {"e" * 64}
    assert await backend.sql("SELECT max(version) FROM schema_migrations") == len(migrations.SQLITE)


async def test_active_limit_is_exact_across_processes(backend: JobStoreBackend) -> None:
    a, b = await _two(backend)
    await a.create(JobRecord(make_job(0, state=JobState.SUCCEEDED)))  # finished: not counted

    async def attempt(store: JobStore, n: int) -> bool:
        try:
            await store.create(JobRecord(make_job(n)), max_active=3)
        except ActiveLimitReached:
            return False
        return True

    made = await asyncio.gather(*(attempt(s, n) for n, s in enumerate([a, b] * 5, start=1)))
    assert made.count(True) == 3
    assert await a.count_active("alice") == 3
    assert await a.create(JobRecord(make_job(50, owner="bob")), max_active=3)  # per owner
    # A retry of a job the owner already has is no new work: answered, not refused.
    existing = (await a.query(JobQuery(owner="alice"), page_size=1, page_token=""))[0][0]
    again = make_job(60, ref_id=existing.ref_id)
    found, was_there = await b.create(JobRecord(again), max_active=3)
    assert was_there and found.job.id == existing.id


async def test_fenced_save_refuses_a_process_that_lost_the_lease(
    backend: JobStoreBackend,
) -> None:
    a, b = await _two(backend)
    job = make_job(1)
    record = JobRecord(job)
    await a.create(record)
    assert await a.claim("A", SHORT) is not None
    job.state = JobState.RUNNING
    await a.save(record, holder="A")
    await asyncio.sleep(SHORT * 1.5)
    assert await b.claim("B", 30, job_id=job.id) is not None  # taken over
    job.progress = 0.5
    with pytest.raises(LeaseLost):
        await a.save(record, holder="A")
    stored = await b.get(job.id)
    assert stored is not None and stored.job.progress == 0.0  # A's write did not land
    job.state = JobState.SUCCEEDED
    await b.save(record, holder="B", outbox=[("https://example.test/h", b"done")])
    items = await b.outbox_claim("B", 30, 10)
    assert [(i.job_id, i.body) for i in items] == [(job.id, b"done")]
    ghost = JobRecord(make_job(9))
    with pytest.raises(ServiceError) as err:
        await a.save(ghost, holder="A")
    assert err.value.reason == "JOB_NOT_FOUND"


async def test_claim_one_named_job(backend: JobStoreBackend) -> None:
    store = await backend.open()
    first, second = make_job(1), make_job(2)
    for job in (first, second):
        await store.create(JobRecord(job))
    lease = await store.claim("A", 30, job_id=second.id)
    assert lease is not None and lease.job_id == second.id
    assert await store.claim("B", 30, job_id=second.id) is None
    assert await store.claim("B", 30, job_id="missing") is None


async def test_a_lost_listen_connection_comes_back_and_says_resync(
    backend: JobStoreBackend,
) -> None:
    if backend.kind != "postgres":
        return  # SQLite announces in process: there is no connection to lose
    a, b = await _two(backend)
    job = make_job(1)
    await a.create(JobRecord(job))
    heard = await b.announcements()
    try:
        killed = await backend.sql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            f" WHERE query LIKE 'LISTEN %{backend.schema}%'"
        )
        assert killed == 1
        # Whatever got through, a resync comes once LISTEN runs again; then events flow.
        seen = await asyncio.wait_for(anext(heard), 10)
        assert seen.kind == "resync"
        await a.append_event(job.id, 1, "accepted", {})
        assert await asyncio.wait_for(anext(heard), 10) == Announcement("event", job.id, 1)
    finally:
        await heard.aclose()


async def test_create_stores_its_events_and_lease_in_one_write(backend: JobStoreBackend) -> None:
    a, b = await _two(backend)
    watcher = a if backend.kind == "sqlite" else b
    heard = await watcher.announcements()
    job = make_job(1)
    try:
        accepted = NewEvent(1, "accepted", {"ref_id": job.ref_id})
        _, existing = await a.create(
            JobRecord(job), max_active=5, holder="A", lease_s=30, events=[accepted]
        )
        assert not existing
        assert await asyncio.wait_for(anext(heard), 5) == Announcement("event", job.id, 1)
    finally:
        await heard.aclose()
    assert [(e.sequence, e.kind) for e in await b.events(job.id)] == [(1, "accepted")]
    assert await b.claim("B", 30, job_id=job.id) is None  # leased to A by the create
    assert await a.renew(job.id, "A", 30) is not None
    # A retry with the same ref_id finds the job and stores nothing, leases nothing.
    again = make_job(2, ref_id=job.ref_id)
    found, existing = await b.create(
        JobRecord(again), holder="B", lease_s=30, events=[NewEvent(1, "accepted", {})]
    )
    assert existing and found.job.id == job.id
    assert await b.get(again.id) is None
    assert await a.renew(job.id, "A", 30) is not None


async def test_save_with_events_release_and_prune_is_one_fenced_write(
    backend: JobStoreBackend,
) -> None:
    a, b = await _two(backend)
    watcher = a if backend.kind == "sqlite" else b
    job = make_job(1)
    record = JobRecord(job)
    await a.create(record, holder="A", lease_s=30)
    job.state = JobState.RUNNING
    progress = [NewEvent(s, "progress", {"fraction": s / 10}) for s in (2, 3)]
    heard = await watcher.announcements()
    try:
        await a.save(record, holder="A", events=progress)
        assert await asyncio.wait_for(anext(heard), 5) == Announcement("event", job.id, 3)
    finally:
        await heard.aclose()
    # Sent again after a write that failed late: stored once.
    await a.append_events(job.id, [progress[1], NewEvent(4, "output", {"index": 0})])
    assert [e.sequence for e in await b.events(job.id)] == [2, 3, 4]

    job.state = JobState.SUCCEEDED
    finished = NewEvent(5, "finished", {"state": "SUCCEEDED"})
    with pytest.raises(LeaseLost):  # not B's job: nothing of the write lands
        await b.save(record, holder="B", events=[finished], release=True, prune="progress")
    assert [e.sequence for e in await b.events(job.id)] == [2, 3, 4]
    await a.save(
        record,
        holder="A",
        events=[finished],
        release=True,
        prune="progress",
        outbox=[("https://example.test/h", b"done")],
    )
    stored = await b.get(job.id)
    assert stored is not None and stored.job.state is JobState.SUCCEEDED
    assert [(e.sequence, e.kind) for e in await b.events(job.id)] == [
        (3, "progress"),
        (4, "output"),
        (5, "finished"),
    ]
    assert await a.renew(job.id, "A", 30) is None  # released with the write
    assert [(i.job_id, i.body) for i in await b.outbox_claim("B", 30, 10)] == [(job.id, b"done")]


async def test_renew_all_renews_only_what_the_holder_still_holds(
    backend: JobStoreBackend,
) -> None:
    a, b = await _two(backend)
    jobs = [make_job(i) for i in range(3)]
    for job in jobs:
        await a.create(JobRecord(job), holder="A", lease_s=SHORT)
    assert await a.renew_all([], "A", 30) == set()
    await asyncio.sleep(SHORT * 1.5)
    taken = await b.claim("B", 30, job_id=jobs[0].id)  # lapsed, taken over
    assert taken is not None and taken.takeover
    assert await a.renew_all([j.id for j in jobs], "A", 30) == set()  # all lapsed
    for job in jobs[1:]:
        assert await a.claim("A", 30, job_id=job.id) is not None
    assert await a.renew_all([j.id for j in jobs], "A", 30) == {j.id for j in jobs[1:]}
    assert await b.claim("B", 30, job_id=jobs[1].id) is None


async def test_unannounced_events_are_stored_and_found_at_the_next_announcement(
    backend: JobStoreBackend,
) -> None:
    a, b = await _two(backend)
    watcher = a if backend.kind == "sqlite" else b
    job = make_job(1)
    record = JobRecord(job)
    await a.create(record, holder="A", lease_s=30)
    # Watching the job: its events are announced whether or not another process follows
    # every job (unwatched, announcing stops once the store counts no such follower).
    heard = await watcher.announcements(watch=job.id)
    try:
        await a.save(record, holder="A", events=[NewEvent(2, "progress", {})], announce=False)
        await a.append_events(job.id, [NewEvent(3, "progress", {})], announce=False)
        await a.append_events(job.id, [NewEvent(4, "output", {})])
        # The first announcement is the output's: the quiet rows were not announced.
        assert await asyncio.wait_for(anext(heard), 5) == Announcement("event", job.id, 4)
    finally:
        await heard.aclose()
    assert [e.sequence for e in await b.events(job.id)] == [2, 3, 4]


def _grouped(store: JobStore) -> int:
    """Writes a PostgreSQL store stored in groups (group commit); SQLite has none."""
    return sum(
        getattr(store, name).grouped
        for name in ("_saves", "_creates", "_slot_claims", "_slot_releases")
        if hasattr(store, name)
    )


async def test_concurrent_saves_are_each_fenced_with_their_own_events(
    backend: JobStoreBackend,
) -> None:
    """Many saves at once (on PostgreSQL they meet in group statements): each one lands or
    fails by its own lease, and carries only its own events, prune, release and outbox."""
    a, b = await _two(backend)
    mine = [make_job(i) for i in range(12)]
    theirs = [make_job(i) for i in range(20, 24)]
    records = {j.id: JobRecord(j) for j in [*mine, *theirs]}
    number = {j.id: n for n, j in enumerate(mine)}
    await asyncio.gather(
        *(a.create(records[j.id], holder="A", lease_s=30) for j in mine),
        *(a.create(records[j.id], holder="B", lease_s=30) for j in theirs),
    )
    for j in mine:
        await a.append_events(j.id, [NewEvent(s, "progress", {"s": s}) for s in (2, 3)])
    ghost = JobRecord(make_job(40))

    async def save(record: JobRecord) -> str:
        job = record.job
        n = number.get(job.id, 99)
        job.state = JobState.SUCCEEDED if n % 2 else JobState.RUNNING
        job.progress = n / 100
        final = n % 2 == 1
        try:
            await a.save(
                record,
                holder="A",
                events=[NewEvent(10 + n, "finished" if final else "output", {"n": n})],
                release=final,
                prune="progress" if final else "",
                outbox=[(f"https://example.test/{n}", str(n).encode())] if final else [],
            )
        except LeaseLost:
            return "lost"
        except ServiceError as exc:
            return exc.reason
        return "saved"

    results = await asyncio.gather(*(save(records[j.id]) for j in [*mine, *theirs]), save(ghost))
    assert results == ["saved"] * len(mine) + ["lost"] * len(theirs) + ["JOB_NOT_FOUND"]
    if backend.kind == "postgres":
        assert _grouped(a) > 0  # they did meet
    for j in mine:
        stored = await b.get(j.id)
        n = number[j.id]
        assert stored is not None and stored.job.progress == n / 100
        kinds = [(e.sequence, e.kind) for e in await b.events(j.id)]
        if n % 2:
            assert kinds == [(3, "progress"), (10 + n, "finished")]  # 2 pruned
            assert await a.renew(j.id, "A", 30) is None  # released
        else:
            assert kinds == [(2, "progress"), (3, "progress"), (10 + n, "output")]
            assert await a.renew(j.id, "A", 30) is not None
    for j in theirs:
        stored = await b.get(j.id)
        assert stored is not None and stored.job.state is JobState.QUEUED
        assert await b.events(j.id) == []
    bodies = sorted(i.body for i in await b.outbox_claim("B", 30, 100))
    assert bodies == sorted(str(n).encode() for n in range(12) if n % 2)


async def test_concurrent_creates_keep_the_limit_and_ref_ids(backend: JobStoreBackend) -> None:
    """Many creates at once (grouped on PostgreSQL): the per-owner limit counts the
    group's own creates, a ref_id made twice makes one job, events and inputs go in."""
    a, b = await _two(backend)
    await a.create(JobRecord(make_job(0)), holder="A", lease_s=30)  # alice has one already
    sha = "f" * 64

    async def create(job: Job, max_active: int) -> str:
        job.inputs = [InputRef("image", "in.png", sha, 3, "image/png", 1, 1)]
        try:
            found, existing = await a.create(
                JobRecord(job),
                max_active=max_active,
                holder="A",
                lease_s=30,
                events=[NewEvent(1, "accepted", {"ref_id": job.ref_id})],
            )
        except ActiveLimitReached:
            return "limit"
        return f"existing {found.job.id}" if existing else "made"

    alice = [make_job(i) for i in range(1, 9)]
    bob = [make_job(i, owner="bob") for i in range(10, 14)]
    twins = [make_job(i, owner="carol", ref_id="same") for i in range(20, 23)]
    results = await asyncio.gather(
        *(create(j, 4) for j in alice), *(create(j, 0) for j in bob), *(create(j, 0) for j in twins)
    )
    assert sorted(results[: len(alice)]) == ["limit"] * 5 + ["made"] * 3  # 1 + 3 = 4
    assert results[len(alice) : len(alice) + len(bob)] == ["made"] * len(bob)
    made_twin = [t for t, r in zip(twins, results[-3:], strict=True) if r == "made"]
    assert len(made_twin) == 1
    assert sorted(results[-3:]) == [f"existing {made_twin[0].id}"] * 2 + ["made"]
    if backend.kind == "postgres":
        assert _grouped(a) > 0
    assert await b.count_active("alice") == 4
    for job in [*alice, *bob, *made_twin]:
        if await b.get(job.id) is None:
            continue  # refused by the limit
        assert [e.kind for e in await b.events(job.id)] == ["accepted"]
        assert await b.claim("B", 30, job_id=job.id) is None  # leased to A
    assert await b.inputs_in_use([sha]) == {sha}


async def test_concurrent_slot_claims_and_releases_never_over_admit(
    backend: JobStoreBackend,
) -> None:
    """Claims and releases at once (grouped on PostgreSQL): each agent's slots go to one
    claimant each, never more than its capacity; releases free exactly their own slots."""
    a, b = await _two(backend)
    for agent in ("gpu-1", "gpu-2"):  # the agents' rows exist (made by a first miss)
        first = await a.claim_slot(agent, 3, "A", 30)
        assert first is not None
        await a.release_slot(first)
    other = await b.claim_slot("gpu-1", 3, "B", 30)  # another process holds one of gpu-1's
    assert other is not None
    wanted = ["gpu-1"] * 5 + ["gpu-2"] * 5 + ["gpu-3"] * 2  # gpu-3: rows not made yet
    claims = await asyncio.gather(*(a.claim_slot(agent, 3, "A", 30) for agent in wanted))
    held = [c for c in claims if c is not None]
    by_agent = {
        agent: sorted(c.slot for c in held if c.agent == agent)
        for agent in ("gpu-1", "gpu-2", "gpu-3")
    }
    assert by_agent == {"gpu-1": [1, 2], "gpu-2": [0, 1, 2], "gpu-3": [0, 1]}
    assert all(c.holder == "A" for c in held)
    if backend.kind == "postgres":
        assert _grouped(a) > 0
    await asyncio.gather(*(a.release_slot(c) for c in held))
    again = await asyncio.gather(*(a.claim_slot("gpu-1", 3, "A", 30) for _ in range(3)))
    assert sorted(c.slot for c in again if c is not None) == [1, 2]  # B keeps slot 0
    assert (await b.renew_slots([other], 30))[0] is not None


class _Outside:
    """A connection listening on the store's channel, not counted as a coordinator: what is
    sent. ``since_mark`` asks for a cancel of ``marker`` (always announced) and returns what
    was heard before it: notifications arrive in commit order, so nothing sent before the
    mark comes after it."""

    def __init__(self, store: JobStore, schema: str, marker: str) -> None:
        self._store = store
        self._schema = schema
        self._marker = marker
        self._heard: list[Announcement] = []
        self._conn: object = None

    async def __aenter__(self) -> _Outside:
        import asyncpg

        from tests.storage.backends import PG_URL

        conn = await asyncpg.connect(PG_URL)
        self._conn = conn

        def heard(*args: object) -> None:
            kind, job_id, sequence = json.loads(str(args[3]))
            self._heard.append(Announcement(kind, job_id, sequence))

        await conn.add_listener(f"aiserver_{self._schema}", heard)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._conn.close()  # type: ignore[attr-defined]

    async def since_mark(self) -> list[Announcement]:
        assert await self._store.request_cancel(self._marker)
        mark = Announcement("cancel", self._marker)
        async with asyncio.timeout(5):
            while mark not in self._heard:
                await asyncio.sleep(0.01)
        at = self._heard.index(mark)
        before, self._heard = self._heard[:at], self._heard[at + 1 :]
        return before


async def _counted(store: JobStore, write: Callable[[], Awaitable[None]]) -> None:
    """A write that starts the PostgreSQL store's count of followers (at most once a second),
    then until that count is back: the store's next writes go by it."""
    await asyncio.sleep(1.05)  # the last count is at least a second old
    asked = time.monotonic()
    await write()
    async with asyncio.timeout(5):
        while store._others_counted < asked:  # type: ignore[attr-defined]
            await asyncio.sleep(0.01)


async def test_events_are_announced_only_to_a_watcher_or_a_follower_of_every_job(
    backend: JobStoreBackend,
) -> None:
    """Each notification costs every listening backend a transaction, and every coordinator
    listens (cancels): a job's events are announced only once a watcher elsewhere marked the
    job (``watch``), on every kind of write, or while another coordinator follows every job
    (``every_job``, counted within a second). Cancels always."""
    if backend.kind != "postgres":
        return  # SQLite announces in process: nothing is sent anywhere
    a, b = await _two(backend)
    marker = make_job(0)
    jobs = [make_job(i) for i in (1, 2, 3)]
    records = [JobRecord(j) for j in jobs]
    for record in [JobRecord(marker), *records]:
        await a.create(record, holder="A", lease_s=30)
    own = await a.announcements()  # every coordinator listens (cancels)
    others = await b.announcements()
    sequence = iter(range(2, 100))

    def event() -> list[NewEvent]:
        return [NewEvent(next(sequence), "output", {})]

    async with _Outside(a, backend.schema, marker.id) as outside:
        await _counted(a, lambda: a.save(records[0], holder="A", events=event()))
        await outside.since_mark()
        await a.save(records[0], holder="A", events=event())
        await a.append_events(jobs[0].id, event())
        await a.create(JobRecord(make_job(9)), events=[NewEvent(1, "accepted", {})])
        assert await outside.since_mark() == []  # nobody follows them: stored, not sent
        assert len(await b.events(jobs[0].id)) == 3

        watching = await b.announcements(watch=jobs[0].id)
        try:
            await a.save(records[0], holder="A", events=event())
            await a.append_events(jobs[0].id, event())
            await a.append_events(jobs[1].id, event())
            # Saves that meet go in one statement: the watched job's is announced alone.
            await asyncio.gather(
                *(a.save(r, holder="A", events=event()) for r in (records[2], *records[:2]))
            )
            assert _grouped(a) > 0
            heard = await outside.since_mark()
            assert {h.job_id for h in heard} == {jobs[0].id} and len(heard) == 3
            assert (await anext(watching)).job_id == jobs[0].id
        finally:
            await watching.aclose()

        following = await b.announcements(every_job=True)
        try:
            await _counted(a, lambda: a.save(records[1], holder="A", events=event()))
            await outside.since_mark()
            await a.save(records[1], holder="A", events=event())
            await a.append_events(jobs[2].id, event())
            new = make_job(10)
            await a.create(JobRecord(new), events=[NewEvent(1, "accepted", {})])
            heard = await outside.since_mark()
            assert [h.job_id for h in heard] == [jobs[1].id, jobs[2].id, new.id]
        finally:
            await following.aclose()
        # The follower is gone: counted again at the next write.
        await _counted(a, lambda: a.save(records[1], holder="A", events=event()))
        await outside.since_mark()
        await a.save(records[1], holder="A", events=event())
        assert await outside.since_mark() == []
    await own.aclose()
    await others.aclose()


async def test_a_write_waits_for_a_watchers_mark_and_announces(backend: JobStoreBackend) -> None:
    """A watcher marks the job, then reads its stored events: a write racing the mark either
    commits first (the watcher reads its rows) or sees the mark (announced). Here the mark's
    transaction is held open: a save and an event append wait for it, and announce."""
    if backend.kind != "postgres":
        return
    import asyncpg

    from tests.storage.backends import PG_URL

    a = await backend.open()
    marker, job = make_job(0), make_job(1)
    record = JobRecord(job)
    for r in (JobRecord(marker), record):
        await a.create(r, holder="A", lease_s=30)
    own = await a.announcements()
    b = await asyncpg.connect(PG_URL, server_settings={"search_path": backend.schema})
    try:
        async with _Outside(a, backend.schema, marker.id) as outside:
            await _counted(
                a, lambda: a.save(record, holder="A", events=[NewEvent(2, "output", {})])
            )
            await outside.since_mark()
            writes = (
                lambda: a.append_events(job.id, [NewEvent(3, "output", {})]),
                lambda: a.save(record, holder="A", events=[NewEvent(4, "output", {})]),
            )
            for write in writes:
                await b.execute("UPDATE jobs SET watched = false WHERE id = $1", job.id)
                mark = b.transaction()
                await mark.start()
                await b.execute("UPDATE jobs SET watched = true WHERE id = $1", job.id)
                pending = asyncio.ensure_future(write())
                async with asyncio.timeout(5):  # until the write waits for the mark's lock
                    while not await backend.sql(
                        "SELECT count(*) FROM pg_stat_activity"
                        f" WHERE {b.get_server_pid()} = ANY(pg_blocking_pids(pid))"
                    ):
                        await asyncio.sleep(0.01)
                await mark.commit()
                await pending
                heard = await outside.since_mark()
                assert [h.job_id for h in heard] == [job.id]
    finally:
        await b.close()
        await own.aclose()


async def test_concurrent_slot_claims_with_a_changed_capacity_stay_below_their_own(
    backend: JobStoreBackend,
) -> None:
    """Claims on one agent meeting while its capacity changes (2, then 4): each claim's slot
    is below the capacity it asked with, and no slot goes twice."""
    store = await backend.open()
    first = await store.claim_slot("gpu", 4, "A", 30)  # the rows exist
    assert first is not None
    await store.release_slot(first)
    capacities = [4, 2, 4, 2, 4, 2]
    claims = await asyncio.gather(*(store.claim_slot("gpu", c, "A", 30) for c in capacities))
    taken = [(c, claim.slot) for c, claim in zip(capacities, claims, strict=True) if claim]
    assert all(slot < capacity for capacity, slot in taken)
    assert len({slot for _, slot in taken}) == len(taken) == 4
