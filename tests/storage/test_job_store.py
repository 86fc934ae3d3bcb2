from __future__ import annotations

import asyncio
import string
from datetime import UTC, datetime, timedelta

import pytest

from aiserver.errors import ErrorKind, FieldViolation, ServiceError
from aiserver.jobs.ids import new_job_id
from aiserver.jobs.model import ArtifactRef, InputRef, Job, JobState, Retrying, WebhookDelivery
from aiserver.jobs.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from aiserver.jobs.store import JobQuery, JobRecord, migrations
from aiserver.tasks import ImageToImageSpec, ImageToTextSpec, ImageUpscaleSpec, TaskKind
from tests.storage.backends import JobStoreBackend

T0 = datetime(2025, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def make_job(
    n: int,
    *,
    owner: str = "alice",
    state: JobState = JobState.QUEUED,
    task: TaskKind = TaskKind.IMAGE_TO_IMAGE,
    tag: str = "",
    ref_id: str = "",
) -> Job:
    created = T0 + timedelta(seconds=n)
    job_id = new_job_id(created)
    spec = (
        ImageToImageSpec(positive_prompt=f"prompt {n}", seed=n)
        if task is TaskKind.IMAGE_TO_IMAGE
        else ImageToTextSpec()
    )
    return Job(
        id=job_id,
        task=task,
        spec=spec,
        state=state,
        created=created,
        updated=created,
        owner=owner,
        ref_id=ref_id or job_id,
        tag=tag,
    )


async def test_record_round_trips_every_field(backend: JobStoreBackend) -> None:
    store = await backend.open()
    job = make_job(1, tag="t", ref_id="r-1")
    job.reply_to = "https://example.test/hook"
    job.inputs = [InputRef("image", "in.png", "a" * 64, 10, "image/png", 3, 4)]
    record = JobRecord(job, 300, [Retrying(2, "agent down", "gpu-1")])
    await store.create(record)

    job.state = JobState.FAILED
    job.provider, job.agent, job.attempts = "comfy", "gpu-2", 2
    job.started, job.ended, job.progress = T0, T0 + timedelta(minutes=1), 0.75
    job.outputs = [
        ArtifactRef(
            "artifacts/2025/05/01/" + "b" * 64 + ".png",
            "/artifacts/2025/05/01/" + "b" * 64 + ".png",
            "out.png",
            "image/png",
            8,
            8,
            123,
            "b" * 64,
            None,
            "comfy",
            T0,
            job.id,
        )
    ]
    job.texts = ["a caption", "ünïcode"]
    job.resume = {"agent": "gpu-2", "prompt_id": "p-9"}
    job.error = ServiceError(
        ErrorKind.INVALID_ARGUMENT,
        "INVALID_PARAMETERS",
        "bad",
        violations=(FieldViolation("params.seed", "too big"),),
        metadata={"fields": "params.seed"},
        retry_after_s=1.5,
    )
    await store.save(record)

    loaded = await store.get(job.id)
    assert loaded is not None
    got = loaded.job
    assert (got.id, got.owner, got.ref_id, got.tag, got.reply_to) == (
        job.id,
        "alice",
        "r-1",
        "t",
        job.reply_to,
    )
    assert got.spec == job.spec and got.task is TaskKind.IMAGE_TO_IMAGE
    assert (got.state, got.provider, got.agent, got.attempts) == (
        JobState.FAILED,
        "comfy",
        "gpu-2",
        2,
    )
    assert (got.created, got.started, got.ended, got.progress) == (
        job.created,
        job.started,
        job.ended,
        0.75,
    )
    assert got.inputs == job.inputs and got.outputs == job.outputs and got.texts == job.texts
    assert got.resume == job.resume
    assert got.error is not None
    assert (got.error.kind, got.error.reason, got.error.message) == (
        ErrorKind.INVALID_ARGUMENT,
        "INVALID_PARAMETERS",
        "bad",
    )
    assert tuple(got.error.violations) == (FieldViolation("params.seed", "too big"),)
    assert dict(got.error.metadata) == {"fields": "params.seed"}
    assert got.error.retry_after_s == 1.5
    assert loaded.retries == [Retrying(2, "agent down", "gpu-1")]
    assert loaded.last_sequence == 300
    assert await store.get("missing") is None


async def test_spec_json_orjson_refuses_round_trips(backend: JobStoreBackend) -> None:
    # Rows are written by orjson; what it refuses (an integer beyond 64 bits, a non-string
    # key in a workflow document) is written by the stdlib and reads back the same.
    store = await backend.open()
    job = make_job(1)
    documents = {"graph": {"1": {"seed": 2**70, "name": "ünïcode", "ratio": 0.1}}}
    job.task, job.spec = TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec(workflow_documents=documents)
    job.texts = ["ünïcode"]
    await store.create(JobRecord(job, 100))
    job.resume = {"agent": "gpu-1"}
    await store.save(JobRecord(job, 100))
    loaded = await store.get(job.id)
    assert loaded is not None
    assert loaded.job.spec == job.spec and loaded.job.texts == ["ünïcode"]
    assert loaded.job.resume == {"agent": "gpu-1"}


async def test_owner_and_ref_id_are_unique_together(backend: JobStoreBackend) -> None:
    store = await backend.open()
    first, existing = await store.create(JobRecord(make_job(1, ref_id="same")))
    assert not existing
    again, existing = await store.create(JobRecord(make_job(2, ref_id="same")))
    assert existing and again.job.id == first.job.id
    other, existing = await store.create(JobRecord(make_job(3, owner="bob", ref_id="same")))
    assert not existing and other.job.id != first.job.id


async def test_list_filters_and_pages_newest_first(backend: JobStoreBackend) -> None:
    store = await backend.open()
    jobs = [
        make_job(i, owner="bob" if i % 3 == 0 else "alice", tag="red" if i % 2 else "blue")
        for i in range(1, 11)
    ]
    jobs[0].state = JobState.SUCCEEDED
    jobs[1].task = TaskKind.IMAGE_TO_TEXT
    jobs[1].spec = ImageToTextSpec()
    for job in jobs:
        await store.create(JobRecord(job))
    alice = [j.id for j in reversed(jobs) if j.owner == "alice"]

    seen: list[str] = []
    token = ""
    while True:
        page, token = await store.query(JobQuery(owner="alice"), page_size=3, page_token=token)
        assert len(page) <= 3
        seen += [j.id for j in page]
        if not token:
            break
    assert seen == alice  # newest first, no duplicates, nothing missed

    everyone, _ = await store.query(JobQuery(), page_size=100, page_token="")
    assert [j.id for j in everyone] == [j.id for j in reversed(jobs)]
    done, _ = await store.query(
        JobQuery(states=frozenset({JobState.SUCCEEDED})), page_size=0, page_token=""
    )
    assert [j.id for j in done] == [jobs[0].id]
    text, _ = await store.query(JobQuery(task=TaskKind.IMAGE_TO_TEXT), page_size=0, page_token="")
    assert [j.id for j in text] == [jobs[1].id]
    red, _ = await store.query(JobQuery(owner="alice", tag="red"), page_size=0, page_token="")
    assert {j.id for j in red} == {j.id for j in jobs if j.owner == "alice" and j.tag == "red"}
    by_ref, _ = await store.query(JobQuery(ref_id=jobs[4].ref_id), page_size=0, page_token="")
    assert [j.id for j in by_ref] == [jobs[4].id]

    # A token only continues the listing it came from: not another owner's, not a forgery.
    _, token = await store.query(JobQuery(owner="alice"), page_size=2, page_token="")
    for query, bad in [
        (JobQuery(owner="bob"), token),
        (JobQuery(owner="alice", tag="red"), token),
        (JobQuery(owner="alice"), "bogus!"),
        (JobQuery(owner="alice"), "eyJjIjoxfQ"),  # valid base64 JSON, wrong shape
    ]:
        with pytest.raises(ServiceError) as err:
            await store.query(query, page_size=2, page_token=bad)
        assert err.value.kind is ErrorKind.INVALID_ARGUMENT
        assert err.value.reason == "INVALID_PAGE_TOKEN"


async def test_unfinished_jobs_in_creation_order(backend: JobStoreBackend) -> None:
    store = await backend.open()
    states = [JobState.RUNNING, JobState.SUCCEEDED, JobState.QUEUED, JobState.CANCELLED]
    jobs = [make_job(10 - i, state=s) for i, s in enumerate(states)]  # created newest first
    for job in jobs:
        await store.create(JobRecord(job))
    unfinished = await store.unfinished()
    assert [r.job.id for r in unfinished] == [jobs[2].id, jobs[0].id]


async def test_schema_version_and_newer_database_refused(backend: JobStoreBackend) -> None:
    store = await backend.open()
    await store.create(JobRecord(make_job(1)))
    await store.close()
    again = await backend.open()  # reopening an up-to-date database migrates nothing
    assert len(await again.unfinished()) == 1
    steps = migrations.SQLITE if backend.kind == "sqlite" else migrations.POSTGRES
    assert await backend.sql("SELECT max(version) FROM schema_migrations") == len(steps)
    await backend.sql("INSERT INTO schema_migrations (version, applied_us) VALUES (99, 0)")
    with pytest.raises(migrations.SchemaTooNew, match="newer"):
        await backend.open()


def test_job_ids_are_url_safe_and_sort_by_time() -> None:
    base = datetime.now(UTC)
    ids = [new_job_id(base) for _ in range(500)]  # same millisecond: still increasing
    ids += [new_job_id(base + timedelta(seconds=1))]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    allowed = set(string.digits + string.ascii_uppercase)
    assert all(len(i) == 26 and set(i) <= allowed for i in ids)
    assert new_job_id(base + timedelta(days=1)) > ids[-1]


async def test_page_size_is_refused_outside_its_limits_not_clamped(
    backend: JobStoreBackend,
) -> None:
    store = await backend.open()
    for n in range(MAX_PAGE_SIZE + 1):
        await store.create(JobRecord(make_job(n)))
    full, token = await store.query(JobQuery(), page_size=MAX_PAGE_SIZE, page_token="")
    assert len(full) == MAX_PAGE_SIZE == 1000 and token  # the proto's 1..1000, all of it
    default, _ = await store.query(JobQuery(), page_size=0, page_token="")
    assert len(default) == DEFAULT_PAGE_SIZE
    for size in (-1, MAX_PAGE_SIZE + 1):
        with pytest.raises(ServiceError) as caught:
            await store.query(JobQuery(), page_size=size, page_token="")
        assert (caught.value.kind, caught.value.reason) == (
            ErrorKind.INVALID_ARGUMENT,
            "INVALID_PAGE_SIZE",
        )
        assert caught.value.violations == (FieldViolation("page_size", "must be 0..1000"),)


async def test_processes_starting_at_once_migrate_once(backend: JobStoreBackend) -> None:
    stores = await asyncio.gather(*(backend.open() for _ in range(4)))
    await stores[0].create(JobRecord(make_job(1)))
    assert [len(await s.unfinished()) for s in stores] == [1, 1, 1, 1]
    steps = migrations.SQLITE if backend.kind == "sqlite" else migrations.POSTGRES
    assert await backend.sql("SELECT count(*) FROM schema_migrations") == len(steps)


async def test_webhook_outcome_is_kept_apart_from_saves(backend: JobStoreBackend) -> None:
    store = await backend.open()
    job = make_job(1, state=JobState.SUCCEEDED)
    await store.create(JobRecord(job))
    delivery = WebhookDelivery("FAILED", 5, 503, "HTTP 503", T0 + timedelta(minutes=2))
    await store.record_webhook(job.id, delivery)
    job.progress = 1.0
    await store.save(JobRecord(job))  # a save of the (older) record keeps the outcome
    await store.close()
    again = await backend.open()
    got = await again.get(job.id)
    assert got is not None
    assert got.job.webhook == delivery
    assert got.job.progress == 1.0
    (listed,), _ = await again.query(JobQuery(), page_size=10, page_token="")
    assert listed.webhook == delivery
