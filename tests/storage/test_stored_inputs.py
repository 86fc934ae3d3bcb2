"""Small inputs kept with their job (``InputRef.stored``): in the create's transaction, until
the job ends; the embedded store keeps them, PostgreSQL's refuses them (the spool and the
shared blob store hold its inputs)."""

from __future__ import annotations

import hashlib

import pytest

from aiserver.jobs.model import InputRef, JobState
from aiserver.jobs.store import JobRecord, migrations
from tests.storage.backends import JobStoreBackend
from tests.storage.test_job_store import make_job


def _stored(data: bytes, field: str = "image") -> InputRef:
    sha = hashlib.sha256(data).hexdigest()
    return InputRef(field, "in.png", sha, len(data), "image/png", 3, 4, stored=True)


async def test_a_stored_input_is_kept_until_the_job_ends(backend: JobStoreBackend) -> None:
    store = await backend.open()
    data, mask = b"\x89PNG small input", b"another"
    image_ref, mask_ref = _stored(data), _stored(mask, "mask")
    if not store.holds_inputs:
        job = make_job(1)
        job.inputs = [image_ref]
        with pytest.raises(ValueError):
            await store.create(JobRecord(job, 1), input_bytes={image_ref.sha256: data})
        assert await store.get(job.id) is None
        return
    job = make_job(1)
    job.inputs = [image_ref, mask_ref]
    record = JobRecord(job, 1)
    shas = {image_ref.sha256: data, mask_ref.sha256: mask}
    await store.create(record, input_bytes=shas)
    assert await store.input_bytes(job.id, image_ref.sha256) == data
    assert await store.input_bytes(job.id, mask_ref.sha256) == mask
    loaded = await store.get(job.id)
    assert loaded is not None and loaded.job.inputs == [image_ref, mask_ref]  # the flag too
    # A stored input is no spool file: no reference keeps a file of that hash.
    assert await store.inputs_in_use({image_ref.sha256}) == set()

    job.state = JobState.RUNNING
    await store.save(record)  # not the end: still kept
    assert await store.input_bytes(job.id, image_ref.sha256) == data
    job.state = JobState.SUCCEEDED
    await store.save(record)  # the end: gone in the statement that ends it
    assert await store.input_bytes(job.id, image_ref.sha256) is None
    assert await backend.sql("SELECT count(*) FROM job_input_bytes") == 0

    # Reopened (a restart): an unfinished job's bytes are there for its run.
    other = make_job(2)
    other.inputs = [image_ref]
    await store.create(JobRecord(other, 1), input_bytes={image_ref.sha256: data})
    await store.close()
    again = await backend.open()
    assert await again.input_bytes(other.id, image_ref.sha256) == data


async def test_a_stored_input_without_its_bytes_makes_no_job(backend: JobStoreBackend) -> None:
    store = await backend.open()
    job = make_job(1)
    job.inputs = [_stored(b"abc")]
    with pytest.raises(ValueError):
        await store.create(JobRecord(job, 1), input_bytes={})
    assert await store.get(job.id) is None


def test_a_trigger_keeps_its_body_whole_in_the_migration_statements() -> None:
    found = migrations.statements(migrations.SQLITE[3])
    assert len(found) == 2 and found[1].startswith("CREATE TRIGGER")
    assert found[1].endswith("END") and "DELETE FROM job_input_bytes" in found[1]
    with pytest.raises(ValueError):
        migrations.statements("CREATE TRIGGER t AFTER UPDATE ON x BEGIN DELETE FROM y;")
