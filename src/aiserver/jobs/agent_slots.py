"""Agent slots from the job store: coordinators sharing ComfyUI agents never overload one.

Each slot taken is a row lease (``claim_slot``), renewed every third of the lease while this
process holds it; a dead coordinator's slots come free when their leases lapse
(docs/scale-out.md, "Agent slots").

A slot given back stays this process's for ``keep_s`` (still leased, still renewed): a run
this process starts on the same agent meanwhile takes it without a statement, and only a
slot nobody here wanted for that long is released in the database. Under steady load the
slots of a busy coordinator thus cost no claim and no release per job (two transactions of
the ~10 a job cost PostgreSQL); a slot is still used by one run at a time, and held only by
its lease, so no agent takes more than its capacity whoever holds its slots.

A kept slot is trusted only while its lease will not lapse before the next renewal (once
lapsed, another process may hold the row), and this process holds at most one token per
row: a claim that gets a row back replaces the lapsed token that had it. Whether it lapses
is judged by this process's monotonic clock from when the claim or renewal was sent (the
database sets the lease from its own clock, later): never by comparing the stored expiry
with this process's wall clock, which may be off the database's (docs/scale-out.md,
"Clocks").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from aiserver.jobs.store import JobStore, SlotClaim
from aiserver.providers.comfy.slots import SlotToken

__all__ = ["SharedAgentSlots"]

logger = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class _Held:
    claim: SlotClaim
    deadline: float
    """(``loop.time()``) The lease lapses no sooner: when the claim or its last renewal was
    sent, plus the lease."""
    idle_until: float | None = None
    """Set while no run uses it: released after this (``loop.time()``) unless taken again."""

    @property
    def key(self) -> tuple[str, int]:
        return self.claim.agent, self.claim.slot


class SharedAgentSlots:
    """:class:`~aiserver.providers.comfy.slots.AgentSlots` on a shared job store."""

    poll_s = 0.25
    keep_s = 0.5
    """How long a slot given back waits for this process's next run on its agent. Other
    coordinators ask for free slots every ``poll_s``: a slot this process does not reuse
    at once reaches them a ``keep_s`` later than if released at once."""

    def __init__(self, store: JobStore, holder: str, lease_s: float) -> None:
        self._store = store
        self._holder = holder
        self._lease_s = lease_s
        # A kept slot is trusted only while its lease has more than this left: the renewal
        # timer comes every third of a lease, so a healthy one always has two thirds left;
        # less means renewals failed, and once it lapses another process may hold the row.
        self._margin = lease_s / 3
        self._held: dict[tuple[str, int], _Held] = {}
        """By (agent, slot): one token per row (the newest claim of it)."""
        self._idle: dict[str, list[_Held]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._releases: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._failing_since: float | None = None  # (``loop.time()``) renewals failing since
        self._failures = 0

    def _holds(self, token: _Held) -> bool:
        return self._held.get(token.key) is token

    def _lapsing(self, held: _Held) -> bool:
        """Whether ``held``'s lease may lapse before the renewal timer reaches it (or has)."""
        return held.deadline <= asyncio.get_running_loop().time() + self._margin

    def _forget(self, held: _Held) -> None:
        """Drop ``held`` without releasing its row: its lease lapsed (or is about to), so
        the row may be another's, or this process's again under a newer claim."""
        if self._holds(held):
            del self._held[held.key]
        if held.idle_until is not None:
            held.idle_until = None
            idle = self._idle.get(held.claim.agent)
            if idle is not None:
                with contextlib.suppress(ValueError):
                    idle.remove(held)
                if not idle:
                    del self._idle[held.claim.agent]

    async def take(self, agent: str, capacity: int) -> SlotToken | None:
        idle = self._idle.get(agent, [])
        while idle:
            held = idle.pop()
            held.idle_until = None
            if not self._holds(held):
                continue
            if self._lapsing(held):
                logger.warning("agent %s: a kept slot's lease lapsed; claiming afresh", agent)
                self._forget(held)
            elif held.claim.slot < capacity:
                return held  # still ours (its lease renewed): no statement
            else:
                self._release(held)  # capacity shrank below it
        if agent in self._idle and not idle:
            del self._idle[agent]
        # Shielded: a caller cancelled while the claim is on its way (a group claim, a
        # round trip) must not lose a row it took; it lands as a kept slot (see _landed).
        asked = asyncio.get_running_loop().time()
        claiming = asyncio.ensure_future(
            self._store.claim_slot(agent, capacity, self._holder, self._lease_s)
        )
        try:
            claim = await asyncio.shield(claiming)
        except asyncio.CancelledError:
            claiming.add_done_callback(lambda done: self._landed(done, asked))
            raise
        return None if claim is None else self._hold(claim, asked)

    def _hold(self, claim: SlotClaim, asked: float) -> _Held:
        held = _Held(claim, asked + self._lease_s)
        before = self._held.get(held.key)
        if before is not None:
            # This process claimed that row again: the earlier claim's lease lapsed (its
            # renewals failed) and the row came free. That token is lost: renewing or
            # releasing it would act on this claim's row.
            logger.warning("agent %s: slot %d lapsed and was claimed again", *held.key)
            self._forget(before)
        self._held[held.key] = held
        return held

    def _landed(self, claiming: asyncio.Future[SlotClaim | None], asked: float) -> None:
        """A claim whose caller was cancelled finished: keep what it took, as given back."""
        if claiming.cancelled():
            return
        if claiming.exception() is not None:
            logger.warning("an abandoned slot claim failed", exc_info=claiming.exception())
            return
        claim = claiming.result()
        if claim is None:
            return
        held = self._hold(claim, asked)
        if self._stopped:
            self._release(held)
        else:
            self._keep_idle(held)

    def kept(self, agent: str) -> bool:
        return any(self._holds(h) and not self._lapsing(h) for h in self._idle.get(agent, ()))

    def firm(self, token: SlotToken) -> bool:
        assert isinstance(token, _Held)
        return self._holds(token) and not self._lapsing(token)

    async def give_back(self, token: SlotToken) -> None:
        assert isinstance(token, _Held)
        if not self._holds(token) or self._stopped:
            return  # its lease was lost meanwhile, or lapses (the store closes)
        self._keep_idle(token)

    def _keep_idle(self, held: _Held) -> None:
        loop = asyncio.get_running_loop()
        held.idle_until = loop.time() + self.keep_s
        self._idle.setdefault(held.claim.agent, []).append(held)
        if self._sweep is None:
            self._sweep = loop.call_later(self.keep_s, self._release_idle)

    def _release_idle(self) -> None:
        """Release the slots idle for ``keep_s``; come back for the others."""
        self._sweep = None
        now = asyncio.get_running_loop().time()
        soonest: float | None = None
        for agent, idle in list(self._idle.items()):
            for held in list(idle):
                assert held.idle_until is not None
                if held.idle_until <= now:
                    idle.remove(held)
                    held.idle_until = None
                    self._release(held)
                else:
                    due = held.idle_until
                    soonest = due if soonest is None else min(soonest, due)
            if not idle:
                del self._idle[agent]
        if soonest is not None:
            self._sweep = asyncio.get_running_loop().call_at(soonest, self._release_idle)

    def _release(self, held: _Held) -> None:
        if not self._holds(held):
            return  # lost or superseded: its row is not this token's to free
        if self._lapsing(held):
            # Releasing is fenced by holder only: once lapsed, the row may be this
            # process's again under a newer claim. It comes free by itself.
            self._forget(held)
            return
        del self._held[held.key]
        task = asyncio.get_running_loop().create_task(self._give_back_now(held.claim))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _give_back_now(self, claim: SlotClaim) -> None:
        try:
            await self._store.release_slot(claim)
        except Exception:
            logger.warning("could not release a slot of %s", claim.agent, exc_info=True)

    def start(self) -> None:
        self._task = asyncio.create_task(self._renew_loop(), name="agent-slot-renewal")

    async def stop(self) -> None:
        """Stop renewing; the slots no run uses are released now (the others lapse)."""
        self._stopped = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        idle = [held for kept in self._idle.values() for held in kept]
        self._idle.clear()
        for held in idle:
            held.idle_until = None
            self._release(held)
        if self._releases:
            await asyncio.wait(list(self._releases), timeout=5.0)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _renew_loop(self) -> None:
        renewed = True
        while True:
            # After a failure, soon again (as job leases): the leases are running out, and a
            # run on a slot that is not firm queues no prompt (``SlotFencedSink``).
            every = self._lease_s / 3
            await asyncio.sleep(every if renewed else min(every, 0.5))
            renewed = await self.renew()

    async def renew(self) -> bool:
        """Renew every slot held here in one store call (one round trip per third of a lease
        however many slots this process holds; a statement per slot was the renewals' cost,
        which grew with the slots each coordinator holds). A slot whose lease was lost is
        forgotten: the run on it ends as it would have; a failed statement is retried at the
        next turn, within the lease. False when the statement failed."""
        held = list(self._held.values())
        if not held:
            return True
        asked = asyncio.get_running_loop().time()
        try:
            renewed = await self._store.renew_slots([h.claim for h in held], self._lease_s)
        except Exception as exc:
            # Retried every 0.5 s while the store is away: its first failure is logged (as
            # LeaseKeeper's), and its end, not each turn.
            if self._failing_since is None:
                self._failing_since = asked
                self._failures = 0
                logger.warning("could not renew %d agent slots: %r", len(held), exc)
            self._failures += 1
            return False
        if self._failing_since is not None:
            logger.warning(
                "agent slots renewed again after %d failed renewals (%.1f s)",
                self._failures,
                asked - self._failing_since,
            )
            self._failing_since = None
        for token, claim in zip(held, renewed, strict=True):
            if not self._holds(token):
                continue  # released, or claimed again, meanwhile
            if claim is not None:
                token.claim = claim
                token.deadline = asked + self._lease_s
            else:
                logger.warning("agent %s: slot lease lost", token.claim.agent)
                self._forget(token)
        return True
