"""Agent slots from the job store: coordinators sharing ComfyUI agents never overload one.

Each slot taken is a row lease (``claim_slot``), renewed every third of the lease while the
run goes on and released when it ends; a dead coordinator's slots come free when their
leases lapse (docs/scale-out.md, "Agent slots").
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiserver.jobs.store import JobStore, SlotClaim
from aiserver.providers.comfy.slots import SlotToken

__all__ = ["SharedAgentSlots"]

logger = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class _Held:
    claim: SlotClaim


class SharedAgentSlots:
    """:class:`~aiserver.providers.comfy.slots.AgentSlots` on a shared job store."""

    poll_s = 0.25

    def __init__(self, store: JobStore, holder: str, lease_s: float) -> None:
        self._store = store
        self._holder = holder
        self._lease_s = lease_s
        self._held: set[_Held] = set()
        self._task: asyncio.Task[None] | None = None

    async def take(self, agent: str, capacity: int) -> SlotToken | None:
        claim = await self._store.claim_slot(agent, capacity, self._holder, self._lease_s)
        if claim is None:
            return None
        held = _Held(claim)
        self._held.add(held)
        return held

    async def give_back(self, token: SlotToken) -> None:
        assert isinstance(token, _Held)
        self._held.discard(token)
        try:
            await self._store.release_slot(token.claim)
        except Exception:
            logger.warning("could not release a slot of %s", token.claim.agent, exc_info=True)

    def start(self) -> None:
        self._task = asyncio.create_task(self._renew_loop(), name="agent-slot-renewal")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            for held in list(self._held):
                try:
                    renewed = await self._store.renew_slot(held.claim, self._lease_s)
                except Exception:
                    logger.warning("could not renew a slot", exc_info=True)
                    continue
                if renewed is None:
                    logger.warning("agent %s: slot lease lost", held.claim.agent)
                else:
                    held.claim = renewed
