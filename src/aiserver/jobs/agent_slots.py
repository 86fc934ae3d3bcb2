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
    idle_until: float | None = None
    """Set while no run uses it: released after this (``loop.time()``) unless taken again."""


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
        self._held: set[_Held] = set()
        self._idle: dict[str, list[_Held]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._releases: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def take(self, agent: str, capacity: int) -> SlotToken | None:
        idle = self._idle.get(agent, [])
        while idle:
            held = idle.pop()
            held.idle_until = None
            if held.claim.slot < capacity and held in self._held:
                return held  # still ours (its lease renewed): no statement
            self._release(held)  # capacity shrank below it
        claim = await self._store.claim_slot(agent, capacity, self._holder, self._lease_s)
        if claim is None:
            return None
        held = _Held(claim)
        self._held.add(held)
        return held

    def kept(self, agent: str) -> bool:
        return bool(self._idle.get(agent))

    async def give_back(self, token: SlotToken) -> None:
        assert isinstance(token, _Held)
        if token not in self._held or self._stopped:
            return  # its lease was lost meanwhile, or lapses (the store closes)
        loop = asyncio.get_running_loop()
        token.idle_until = loop.time() + self.keep_s
        self._idle.setdefault(token.claim.agent, []).append(token)
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
                    self._release(held)
                else:
                    due = held.idle_until
                    soonest = due if soonest is None else min(soonest, due)
            if not idle:
                del self._idle[agent]
        if soonest is not None:
            self._sweep = asyncio.get_running_loop().call_at(soonest, self._release_idle)

    def _release(self, held: _Held) -> None:
        self._held.discard(held)
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
        for idle in self._idle.values():
            for held in idle:
                self._release(held)
        self._idle.clear()
        if self._releases:
            await asyncio.wait(list(self._releases), timeout=5.0)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            await self.renew()

    async def renew(self) -> None:
        """Renew every slot held here in one statement (one round trip per third of a lease
        however many slots this process holds; a statement per slot was the renewals' cost,
        which grew with the slots each coordinator holds). A slot whose lease was lost is
        forgotten: the run on it ends as it would have; a failed statement is retried at the
        next turn, within the lease."""
        held = list(self._held)
        if not held:
            return
        try:
            renewed = await self._store.renew_slots([h.claim for h in held], self._lease_s)
        except Exception:
            logger.warning("could not renew %d agent slots", len(held), exc_info=True)
            return
        for token, claim in zip(held, renewed, strict=True):
            if claim is not None:
                token.claim = claim
            elif token in self._held:  # (not given back meanwhile)
                logger.warning("agent %s: slot lease lost", token.claim.agent)
                self._held.discard(token)
                if token.idle_until is not None:
                    with contextlib.suppress(KeyError, ValueError):
                        self._idle[token.claim.agent].remove(token)
