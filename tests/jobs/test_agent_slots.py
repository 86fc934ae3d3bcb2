"""Agent slots shared through the job store (``jobs/agent_slots.py``), on every backend: a
slot given back stays this process's for a moment (the next run here takes it without a
statement), and no agent ever has more runs than its capacity across processes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path

import pytest

from aiserver.jobs.agent_slots import SharedAgentSlots
from aiserver.jobs.store import JobStore, SlotClaim
from aiserver.providers.base import Cause, ProviderUnavailable
from aiserver.providers.comfy.slots import SlotFencedSink
from tests.storage.backends import JobStoreBackend

KEEP = 0.2


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStoreBackend]:
    found = JobStoreBackend(request.param, tmp_path)
    try:
        yield found
    finally:
        await found.close()


def _slots(store: JobStore, holder: str) -> SharedAgentSlots:
    slots = SharedAgentSlots(store, holder, 30)
    slots.keep_s = KEEP
    return slots


async def _holders(backend: JobStoreBackend, agent: str) -> list[str]:
    held = await backend.sql(
        "SELECT string_agg(coalesce(holder, '-'), ',' ORDER BY slot) FROM agent_slots"
        f" WHERE agent = '{agent}'"
        if backend.kind == "postgres"
        else "SELECT group_concat(coalesce(holder, '-'), ',') FROM"
        f" (SELECT holder FROM agent_slots WHERE agent = '{agent}' ORDER BY slot)"
    )
    return str(held).split(",")


async def _eventually(backend: JobStoreBackend, agent: str, expected: list[str]) -> None:
    for _ in range(100):
        if await _holders(backend, agent) == expected:
            return
        await asyncio.sleep(0.05)
    assert await _holders(backend, agent) == expected


async def test_a_slot_given_back_is_reused_here_then_released(backend: JobStoreBackend) -> None:
    a, b = await backend.open(), await backend.open()
    here, there = _slots(a, "A"), _slots(b, "B")
    here.keep_s = 1.5  # longer than the checks below take on a loaded machine
    token = await here.take("gpu", 1)
    assert token is not None
    await here.give_back(token)
    assert await _holders(backend, "gpu") == ["A"]  # still leased here ...
    assert await there.take("gpu", 1) is None  # ... so nobody else runs on it
    again = await here.take("gpu", 1)
    assert again is token  # taken again without a claim
    await here.give_back(again)
    await asyncio.sleep(here.keep_s)
    await _eventually(backend, "gpu", ["-"])  # nobody here wanted it: released
    assert await there.take("gpu", 1) is not None
    assert await here.take("gpu", 1) is None


async def test_an_idle_slot_beyond_a_shrunk_capacity_is_released_not_reused(
    backend: JobStoreBackend,
) -> None:
    store = await backend.open()
    slots = _slots(store, "A")
    slots.keep_s = 60.0
    first, second = await slots.take("gpu", 2), await slots.take("gpu", 2)
    assert first is not None and second is not None
    await slots.give_back(second)  # slot 1
    assert await slots.take("gpu", 1) is None  # capacity now 1: slot 0 runs, slot 1 goes
    await _eventually(backend, "gpu", ["A", "-"])


async def test_stop_releases_the_idle_slots(backend: JobStoreBackend) -> None:
    store = await backend.open()
    slots = _slots(store, "A")
    slots.keep_s = 60.0
    slots.start()
    token = await slots.take("gpu", 2)
    assert token is not None
    await slots.give_back(token)
    await slots.stop()
    assert set(await _holders(backend, "gpu")) == {"-"}


async def test_runs_across_processes_never_exceed_an_agents_capacity(
    backend: JobStoreBackend,
) -> None:
    a, b = await backend.open(), await backend.open()
    processes = [_slots(a, "A"), _slots(b, "B")]
    running = 0
    most = 0
    runs = 0

    async def runner(slots: SharedAgentSlots) -> None:
        nonlocal running, most, runs
        while runs < 40:
            token = await slots.take("gpu", 2)
            if token is None:
                await asyncio.sleep(0.01)
                continue
            running += 1
            most = max(most, running)
            runs += 1
            await asyncio.sleep(0.005)
            running -= 1
            await slots.give_back(token)

    await asyncio.wait_for(asyncio.gather(*(runner(s) for s in processes * 3)), 30)
    assert most == 2
    for slots in processes:
        await slots.stop()
    assert set(await _holders(backend, "gpu")) == {"-"}


async def test_renewal_keeps_held_slots_in_one_statement_and_forgets_a_lost_one(
    backend: JobStoreBackend,
) -> None:
    """The renewal timer renews every slot held here, running or kept idle, in one store
    call; a slot whose lease was lost (lapsed, taken by another process) is forgotten, so
    it is never handed to a run here again."""
    store = await backend.open()
    slots = _slots(store, "A")
    slots.keep_s = 60.0
    running, idle, lost = [await slots.take("gpu", 3) for _ in range(3)]
    assert running is not None and idle is not None and lost is not None
    await slots.give_back(idle)
    calls: list[int] = []
    renew_slots = store.renew_slots

    async def counted(claims, lease_s):  # type: ignore[no-untyped-def]
        calls.append(len(claims))
        return await renew_slots(claims, lease_s)

    store.renew_slots = counted  # type: ignore[method-assign]
    lost_slot = lost.claim.slot  # type: ignore[attr-defined]
    await backend.sql(
        f"UPDATE agent_slots SET holder = 'B' WHERE agent = 'gpu' AND slot = {lost_slot}"
    )
    await slots.renew()
    assert calls == [3]
    assert await slots.take("gpu", 3) is idle  # still held: reused without a claim
    await slots.give_back(lost)  # its run ends: the slot is B's, not kept here
    await slots.renew()
    assert calls == [3, 2]
    holders = await _holders(backend, "gpu")
    assert holders[lost_slot] == "B"
    assert holders.count("A") == 2


async def test_an_idle_slot_lost_to_another_process_is_not_kept(backend: JobStoreBackend) -> None:
    """A slot kept idle here whose row another process took (its lease lapsed) is forgotten
    at the next renewal: the pool no longer prefers its agent, and no run here is given it."""
    store = await backend.open()
    slots = _slots(store, "A")
    slots.keep_s = 60.0
    token = await slots.take("gpu", 1)
    assert token is not None
    await slots.give_back(token)
    assert slots.kept("gpu")
    await backend.sql("UPDATE agent_slots SET holder = 'B' WHERE agent = 'gpu'")
    await slots.renew()
    assert not slots.kept("gpu")
    assert await slots.take("gpu", 1) is None  # B's: not handed to a run here
    assert await _holders(backend, "gpu") == ["B"]


def _fail_renewals(store: JobStore) -> Callable[[], None]:
    real = store.renew_slots

    async def down(claims: Sequence[SlotClaim], lease_s: float) -> list[SlotClaim | None]:
        raise ConnectionError("the store is away")

    store.renew_slots = down  # type: ignore[method-assign]

    def restore() -> None:
        store.renew_slots = real  # type: ignore[method-assign]

    return restore


async def test_a_kept_slot_whose_lease_lapsed_is_not_trusted(backend: JobStoreBackend) -> None:
    """Renewals failed for a lease: the kept slot lapsed and another process took the row.
    This process must neither prefer the agent nor hand that slot to a run (two runs on a
    one-slot agent): it claims afresh, and finds the agent full."""
    a, b = await backend.open(), await backend.open()
    here = SharedAgentSlots(a, "A", 0.3)
    here.keep_s = 60.0
    there = _slots(b, "B")
    token = await here.take("gpu", 1)
    assert token is not None
    await here.give_back(token)
    _fail_renewals(a)
    await here.renew()  # fails: logged, nothing forgotten
    await asyncio.sleep(0.45)  # the lease lapsed
    assert not here.kept("gpu")
    assert await there.take("gpu", 1) is not None
    assert await here.take("gpu", 1) is None
    assert await _holders(backend, "gpu") == ["B"]


async def test_a_lapsed_slot_claimed_again_here_is_held_once(backend: JobStoreBackend) -> None:
    """A running slot lapsed (renewals failed) and this process's next claim got the same
    row: the lapsed token is forgotten, so its run's end does not free the row the new run
    holds, and another process cannot take it."""
    a, b = await backend.open(), await backend.open()
    # Long leases: only the lapse below is meant (a loaded machine must not lapse the second
    # claim before B asks); the lapse is the database's expiry, set by hand.
    here = SharedAgentSlots(a, "A", 30)
    here.keep_s = 0.05
    there = _slots(b, "B")
    first = await here.take("gpu", 2)
    assert first is not None
    slot = first.claim.slot  # type: ignore[attr-defined]
    await _lapse(backend, "gpu", slot)  # the first's lease lapsed, its run goes on
    second = await here.take("gpu", 2)
    assert second is not None
    assert second.claim.slot == slot  # type: ignore[attr-defined]
    await here.renew()
    await here.give_back(first)  # the first run ends
    await asyncio.sleep(here.keep_s * 4)  # past keep_s: a kept slot's release is sent ...
    await here.stop()  # ... and done (stop also releases what is kept idle here)
    assert (await _holders(backend, "gpu"))[slot] == "A"
    other = await there.take("gpu", 2)
    assert other is not None and other.claim.slot != slot  # type: ignore[attr-defined]


async def _lapse(backend: JobStoreBackend, agent: str, slot: int) -> None:
    """The database's lease of a slot ran out (as when its renewals failed for a lease)."""
    await backend.sql(
        f"UPDATE agent_slots SET expires_us = 0 WHERE agent = '{agent}' AND slot = {slot}"
    )


async def test_a_take_cancelled_during_its_claim_keeps_the_slot(backend: JobStoreBackend) -> None:
    """A caller cancelled while its claim is on its way: the slot the claim took is kept here
    as given back (the next run takes it, or it is released), not held for a lease by
    nobody."""
    store = await backend.open()
    slots = _slots(store, "A")
    slots.keep_s = 60.0  # kept until stop (a loaded machine must not release them early)
    assert await slots.take("gpu", 8) is not None
    claim_slot = store.claim_slot
    on_way: list[None] = []
    go = asyncio.Event()
    landed: list[SlotClaim | None] = []

    async def slow(agent: str, capacity: int, holder: str, lease_s: float) -> SlotClaim | None:
        on_way.append(None)
        await go.wait()  # on its way when the callers are cancelled
        landed.append(await claim_slot(agent, capacity, holder, lease_s))
        return landed[-1]

    store.claim_slot = slow  # type: ignore[method-assign]
    takes = [asyncio.create_task(slots.take("gpu", 8)) for _ in range(6)]
    while len(on_way) < 6:
        await asyncio.sleep(0.005)
    for task in takes:
        task.cancel()
    done = await asyncio.gather(*takes, return_exceptions=True)
    assert all(isinstance(d, asyncio.CancelledError) for d in done)
    go.set()
    while len(landed) < 6:  # the claims landed ...
        await asyncio.sleep(0.005)
    await asyncio.sleep(0)  # ... and their done callbacks ran
    assert all(c is not None for c in landed)
    store.claim_slot = claim_slot  # type: ignore[method-assign]
    assert slots.kept("gpu")  # kept here, as slots given back
    assert (await _holders(backend, "gpu")).count("A") == 7
    await slots.stop()  # nobody here wanted them: released (the running one lapses)
    assert (await _holders(backend, "gpu")).count("A") == 1
    assert not slots.kept("gpu")


async def test_a_failed_renewal_is_tried_again_soon(
    backend: JobStoreBackend,
) -> None:
    """Renewals failing: the timer tries again within half a second, not a third of a lease
    later (the lease is running out)."""
    store = await backend.open()
    slots = SharedAgentSlots(store, "A", 6.0)  # renewed every 2 s
    token = await slots.take("gpu", 1)
    assert token is not None and slots.firm(token)
    calls: list[float] = []
    renew_slots = store.renew_slots

    async def flaky(claims: Sequence[SlotClaim], lease_s: float) -> list[SlotClaim | None]:
        calls.append(asyncio.get_running_loop().time())
        if len(calls) == 1:
            raise ConnectionError("the store is away")
        return await renew_slots(claims, lease_s)

    store.renew_slots = flaky  # type: ignore[method-assign]
    started = asyncio.get_running_loop().time()
    slots.start()
    try:
        await asyncio.sleep(3.2)
        assert len(calls) == 2  # at 2 s (failed), then 0.5 s later, not at 4 s
        assert calls[1] - calls[0] < 1.0
        assert slots.firm(token)
        assert calls[0] - started > 1.5
    finally:
        await slots.stop()


async def test_a_slot_whose_renewals_fail_stops_being_firm_a_third_of_a_lease_early(
    backend: JobStoreBackend,
) -> None:
    store = await backend.open()
    # 1.5 s: firm is checked right after a claim or renewal, with a second to spare on a
    # loaded machine; the third of a lease is then waited out on purpose.
    slots = SharedAgentSlots(store, "A", 1.5)
    token = await slots.take("gpu", 1)
    assert token is not None
    restore = _fail_renewals(store)
    await slots.renew()  # fails
    assert slots.firm(token)
    await asyncio.sleep(1.05)  # < 0.45 s left: another renewal might not come in time
    assert not slots.firm(token)
    restore()
    await slots.renew()
    assert slots.firm(token)  # renewed: firm again


async def test_an_outage_of_renewals_is_logged_at_its_start_and_its_end(
    backend: JobStoreBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """Renewals fail every half second while the store is away: one warning (no traceback)
    when they start failing, one when they succeed again, none for each turn between."""
    store = await backend.open()
    slots = SharedAgentSlots(store, "A", 30)
    assert await slots.take("gpu", 1) is not None
    restore = _fail_renewals(store)
    caplog.set_level(logging.WARNING, logger="aiserver.jobs.agent_slots")
    for _ in range(5):
        assert not await slots.renew()
    restore()
    assert await slots.renew()
    assert await slots.renew()
    logged = [(r.getMessage(), r.exc_info) for r in caplog.records]
    assert len(logged) == 2, logged
    assert "could not renew 1 agent slots" in logged[0][0] and "the store is away" in logged[0][0]
    assert logged[0][1] is None
    assert "renewed again after 5 failed renewals" in logged[1][0]
    await slots.stop()


class _SlowSave:
    """The job's checkpoint save on a slow database (up to its timeout)."""

    def __init__(self, delay_s: float = 0.5) -> None:
        self.delay_s = delay_s
        self.saved: list[Mapping[str, str]] = []

    async def checkpoint(self, state: Mapping[str, str]) -> None:
        await asyncio.sleep(self.delay_s)
        self.saved.append(state)


async def test_a_slot_that_lapses_during_the_checkpoint_save_queues_no_prompt(
    backend: JobStoreBackend,
) -> None:
    """The slot is judged after the checkpoint's save, right before the prompt goes: firm
    when the save began, lapsed (and taken by another coordinator) when it ended."""
    store_a, store_b = await backend.open(), await backend.open()
    here, there = SharedAgentSlots(store_a, "A", 1.5), SharedAgentSlots(store_b, "B", 30)
    token = await here.take("gpu", 1)
    assert token is not None
    _fail_renewals(store_a)
    assert here.firm(token)  # up to 1.5 s left: firm (a second to spare), not for the save
    save = _SlowSave(1.55)  # outlasts the lease: lapsed in the database too when it ends
    sink = SlotFencedSink(save, lambda: here.firm(token), "gpu")  # type: ignore[arg-type]
    with pytest.raises(ProviderUnavailable) as caught:
        await sink.checkpoint({"prompt_id": "p"})
    assert caught.value.cause is Cause.NO_AGENT and not caught.value.reached_agent
    assert save.saved  # the checkpoint was stored; its prompt is not queued
    assert not here.firm(token)
    assert await there.take("gpu", 1) is not None  # the slot another coordinator now holds


async def test_a_later_prompt_of_an_attempt_fenced_by_its_slot_reached_the_agent(
    backend: JobStoreBackend,
) -> None:
    """A repeat prompt (frames lost) stopped by the fence: the attempt's first prompt ran on
    the agent, so the failure says it reached the agent (the job is retried, its attempt
    counted, not re-queued as unreached under its first queueing's deadline)."""
    store = await backend.open()
    slots = SharedAgentSlots(store, "A", 1.5)  # firm at the first prompt, a second to spare
    token = await slots.take("gpu", 1)
    assert token is not None
    _fail_renewals(store)
    sink = SlotFencedSink(_SlowSave(0.0), lambda: slots.firm(token), "gpu")  # type: ignore[arg-type]
    await sink.checkpoint({"prompt_id": "p1"})  # the first prompt goes
    await asyncio.sleep(1.05)  # it runs; the lease nears its end meanwhile (renewals failing)
    with pytest.raises(ProviderUnavailable) as caught:
        await sink.checkpoint({"prompt_id": "p2"})
    assert caught.value.cause is Cause.SLOT_LAPSED
    assert caught.value.reached_agent and caught.value.retryable
    assert not caught.value.agent_lost  # the agent is fine: not taken offline
