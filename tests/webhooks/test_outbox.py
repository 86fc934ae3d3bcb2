"""The durable webhook outbox on both job stores: stored deliveries survive a restart, are
retried with backoff, and only the elected runner sends them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aiserver.jobs.store import new_holder_id
from aiserver.webhooks import WebhookSender, message_id_for
from aiserver.webhooks.outbox import WebhookOutbox
from tests.storage.backends import JobStoreBackend
from tests.webhooks.receiver import Receiver


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStoreBackend]:
    found = JobStoreBackend(request.param, tmp_path)
    try:
        yield found
    finally:
        await found.close()


@pytest.fixture
async def sender() -> AsyncIterator[WebhookSender]:
    made = WebhookSender(b"secret", allow_hosts=("127.0.0.1",), backoff_s=0.05)
    try:
        yield made
    finally:
        await made.close()


def _body(job_id: str) -> bytes:
    return json.dumps({"jobId": job_id, "state": "SUCCEEDED"}).encode()


async def test_a_stored_delivery_survives_a_restart_and_is_retried(
    backend: JobStoreBackend, sender: WebhookSender
) -> None:
    async with Receiver(503) as receiver:
        store = await backend.open()
        await store.outbox_put("job-1", receiver.url, _body("job-1"))
        await store.close()  # the process that stored it is gone before any try
        reopened = await backend.open()
        outbox = WebhookOutbox(reopened, sender, new_holder_id(), poll_s=0.05)
        outbox.start()
        try:
            async with asyncio.timeout(10):  # 503, then delivered and dropped from the outbox
                while await backend.sql("SELECT count(*) FROM webhook_outbox") != 0:
                    await asyncio.sleep(0.05)
        finally:
            await outbox.stop()
        assert len(receiver.requests) == 2
        assert sender.outcomes[-1].attempts == 2
        ids = {r.headers["webhook-id"] for r in receiver.requests}
        assert ids == {message_id_for("job-1", "SUCCEEDED")}  # one id: receivers dedupe


async def test_only_the_leader_delivers(backend: JobStoreBackend, sender: WebhookSender) -> None:
    async with Receiver() as receiver:
        store = await backend.open()
        for i in range(5):
            await store.outbox_put(f"job-{i}", receiver.url, _body(f"job-{i}"))
        first = WebhookOutbox(store, sender, new_holder_id())
        second = WebhookOutbox(store, sender, new_holder_id())
        assert await first.run_once() == 5
        await store.outbox_put("job-9", receiver.url, _body("job-9"))
        assert await second.run_once() == 0  # the first still leads
        assert await first.run_once() == 1
        assert sorted(json.loads(r.body)["jobId"] for r in receiver.requests) == sorted(
            [f"job-{i}" for i in range(5)] + ["job-9"]
        )


async def test_the_leader_renews_its_lease_every_third_of_it_not_at_every_pass(
    backend: JobStoreBackend, sender: WebhookSender
) -> None:
    store = await backend.open()
    leader = WebhookOutbox(store, sender, new_holder_id(), lease_s=0.6)
    other = WebhookOutbox(store, sender, new_holder_id(), lease_s=0.6)
    expiry = "SELECT expires_us FROM leaders WHERE role = 'webhook-outbox'"
    assert await leader.run_once() == 0
    first = await backend.sql(expiry)
    assert await leader.run_once() == 0
    assert await backend.sql(expiry) == first  # a pass within a third of the lease
    await asyncio.sleep(0.25)
    assert await leader.run_once() == 0
    renewed = await backend.sql(expiry)
    assert isinstance(renewed, int) and isinstance(first, int) and renewed > first
    assert not await other._leads()  # still held: the other follows
    await asyncio.sleep(0.7)  # lapsed: the other takes over, the first sees it at its renewal
    assert await other._leads()
    assert not await leader._leads()


async def test_a_follower_asks_for_the_lead_once_per_third_of_a_lease(
    backend: JobStoreBackend, sender: WebhookSender
) -> None:
    """A follower's passes (every poll, every wake) do not each ask the store: it asks again a
    third of a lease after it was refused, and takes over once the leader's lease lapsed."""
    store = await backend.open()
    # The second ask (a third of a lease after the first) must come before the leader's
    # lease lapses: a lease of 1.5 s leaves ~0.95 s of scheduling slack for it.
    leader = WebhookOutbox(store, sender, new_holder_id(), lease_s=1.5)
    other = WebhookOutbox(store, sender, new_holder_id(), lease_s=1.5)
    assert await leader._leads()
    asked: list[str] = []
    lead = store.lead

    async def counted(role: str, holder: str, lease_s: float) -> bool:
        asked.append(holder)
        return await lead(role, holder, lease_s)

    store.lead = counted  # type: ignore[method-assign]
    for _ in range(5):
        assert await other.run_once() == 0
    assert len(asked) == 1  # refused once; the other passes asked nothing
    await asyncio.sleep(0.55)  # a third of the lease later: it asks again
    assert not await other._leads()
    assert len(asked) == 2
    await asyncio.sleep(1.5)  # the leader stopped renewing: its lease lapsed
    assert await other._leads()


async def test_a_leader_gives_up_the_lead_when_it_stops(
    backend: JobStoreBackend, sender: WebhookSender, caplog: pytest.LogCaptureFixture
) -> None:
    """A clean stop (a rolling restart) hands the lead over at the successor's first ask,
    not a lease later; a follower's stop leaves the leader alone; a store that cannot be
    reached at stop does not hold the stop up (the lease lapses by itself)."""
    store = await backend.open()
    leader = WebhookOutbox(store, sender, new_holder_id(), lease_s=30)
    follower = WebhookOutbox(store, sender, new_holder_id(), lease_s=30)
    assert await leader._leads()
    assert not await follower._leads()
    await follower.stop()
    successor = WebhookOutbox(store, sender, new_holder_id(), lease_s=30)
    assert not await successor._leads()  # the follower's stop gave nothing up
    await leader.stop()
    late = WebhookOutbox(store, sender, new_holder_id(), lease_s=30)
    assert await late._leads()  # at once, not 30 s later

    async def away(role: str, holder: str) -> None:
        raise ConnectionError("the store is away")

    store.resign = away  # type: ignore[method-assign]
    async with asyncio.timeout(5):
        await late.stop()
    assert "could not give up the webhook outbox lead" in caplog.text


async def test_a_final_refusal_is_kept_and_not_retried(
    backend: JobStoreBackend, sender: WebhookSender
) -> None:
    async with Receiver(404) as receiver:
        store = await backend.open()
        await store.outbox_put("job-1", receiver.url, _body("job-1"))
        outbox = WebhookOutbox(store, sender, new_holder_id())
        assert await outbox.run_once() == 1
        assert await outbox.run_once() == 0
        assert len(receiver.requests) == 1
