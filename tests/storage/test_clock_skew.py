"""Leases on a shared PostgreSQL store hold whatever the coordinators' clocks say.

Two store instances stand for two coordinators; one of them runs with a wall clock off by
``SKEW`` (every wall clock the code reads is offset while it acts). Leases are timed by the
database's clock, and a holder trusts its own lease by a monotonic deadline counted from
when it asked: a clock behind or ahead never lets two holders overlap (docs/scale-out.md,
"Clocks")."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, tzinfo
from pathlib import Path

import pytest

from aiserver.jobs import agent_slots
from aiserver.jobs.agent_slots import SharedAgentSlots
from aiserver.jobs.model import JobState
from aiserver.jobs.store import JobRecord, JobStore, SlotClaim, postgres
from tests.storage.backends import JobStoreBackend
from tests.storage.test_job_store import make_job

SKEW = 10.0  # seconds: far more than any lease below
LEASE = 3.0


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[JobStoreBackend]:
    found = JobStoreBackend("postgres", tmp_path)
    try:
        yield found
    finally:
        await found.close()


@contextlib.contextmanager
def clock_off_by(seconds: float, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """While inside, this process's wall clock reads ``seconds`` off the true time."""
    real_now_us = postgres._now_us

    class Skewed(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> Skewed:
            true = datetime.now(tz)
            return cls.fromtimestamp((true + timedelta(seconds=seconds)).timestamp(), tz)

    with monkeypatch.context() as patched:
        patched.setattr(postgres, "_now_us", lambda: real_now_us() + int(seconds * 1e6))
        patched.setattr(agent_slots, "datetime", Skewed, raising=False)
        yield


async def test_a_holder_whose_clock_is_behind_keeps_its_slot(
    backend: JobStoreBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coordinator whose clock runs behind claims a 1-slot agent and keeps the slot (its
    lease is valid, renewed on time): another coordinator must not find it free."""
    a, b = await backend.open(), await backend.open()
    here, there = SharedAgentSlots(a, "A", LEASE), SharedAgentSlots(b, "B", LEASE)
    here.keep_s = there.keep_s = 60.0
    with clock_off_by(-SKEW, monkeypatch):
        token = await here.take("gpu", 1)
        assert token is not None
        await here.give_back(token)
    assert await there.take("gpu", 1) is None  # A's: two runs on a 1-slot agent otherwise
    with clock_off_by(-SKEW, monkeypatch):
        await here.renew()
        assert await here.take("gpu", 1) is token


async def test_a_lapsed_slot_is_not_trusted_by_a_holder_whose_clock_is_behind(
    backend: JobStoreBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder's renewals failed and its slot lapsed in the database: a holder whose
    clock is behind must see it lapsed too (not compare the database's time with its own)."""
    a, b = await backend.open(), await backend.open()
    here, there = SharedAgentSlots(a, "A", 0.3), SharedAgentSlots(b, "B", LEASE)
    here.keep_s = 60.0
    with clock_off_by(-SKEW, monkeypatch):
        token = await here.take("gpu", 1)
        assert token is not None
        await here.give_back(token)

    async def down(claims: list[SlotClaim], lease_s: float) -> list[SlotClaim | None]:
        raise ConnectionError("the store is away")

    monkeypatch.setattr(a, "renew_slots", down)
    await asyncio.sleep(0.45)  # lapsed
    assert await there.take("gpu", 1) is not None
    with clock_off_by(-SKEW, monkeypatch):
        assert not here.kept("gpu")
        assert await here.take("gpu", 1) is None


async def _held_job(store: JobStore) -> str:
    job = make_job(1, state=JobState.RUNNING)
    await store.create(JobRecord(job), holder="A", lease_s=LEASE)
    return job.id


async def test_a_job_lease_is_not_taken_by_a_coordinator_whose_clock_is_ahead(
    backend: JobStoreBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await backend.open(), await backend.open()
    job_id = await _held_job(a)
    assert await a.renew(job_id, "A", LEASE) is not None
    with clock_off_by(SKEW, monkeypatch):
        assert await b.claim("B", LEASE, job_id=job_id) is None
        assert await b.claim("B", LEASE) is None
    assert await a.renew_all([job_id], "A", LEASE) == {job_id}


async def test_a_job_lease_renewed_by_a_holder_whose_clock_is_behind_holds(
    backend: JobStoreBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await backend.open(), await backend.open()
    with clock_off_by(-SKEW, monkeypatch):
        job_id = await _held_job(a)
        assert await a.renew_all([job_id], "A", LEASE) == {job_id}
        assert await a.renew(job_id, "A", LEASE) is not None
    assert await b.claim("B", LEASE, job_id=job_id) is None
    with clock_off_by(-SKEW, monkeypatch):
        assert await a.renew(job_id, "A", LEASE) is not None  # not lapsed in its own eyes


async def test_leadership_is_not_taken_by_a_coordinator_whose_clock_is_ahead(
    backend: JobStoreBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await backend.open(), await backend.open()
    with clock_off_by(-SKEW, monkeypatch):
        assert await a.lead("retention", "A", LEASE)
    assert not await b.lead("retention", "B", LEASE)
    with clock_off_by(SKEW, monkeypatch):
        assert not await b.lead("retention", "B", LEASE)


async def test_a_leased_outbox_row_is_not_claimed_by_a_clock_ahead(
    backend: JobStoreBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await backend.open(), await backend.open()
    await a.outbox_put("job-1", "http://127.0.0.1:1/hook", b"{}")
    assert len(await a.outbox_claim("A", LEASE, 10)) == 1
    with clock_off_by(SKEW, monkeypatch):
        assert await b.outbox_claim("B", LEASE, 10) == []
