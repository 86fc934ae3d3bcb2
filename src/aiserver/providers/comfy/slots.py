"""Who else is using an agent: the slots an agent admits, shared by every coordinator.

A pool alone on its agents counts their running jobs in memory (:class:`LocalSlots` grants
every request: the pool's own count is the limit). Coordinators sharing agents take a slot
from the job store first (``aiserver.jobs.agent_slots``), so two of them never put more
than an agent's ``max_concurrent_jobs`` on it (docs/scale-out.md, "Agent slots").
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["AgentSlots", "LocalSlots", "SlotToken"]


class SlotToken(Protocol):
    """One slot taken; handed back with :meth:`AgentSlots.give_back`."""


class AgentSlots(Protocol):
    poll_s: float
    """With every local slot free but none granted, ask again this often."""

    async def take(self, agent: str, capacity: int) -> SlotToken | None:
        """One of ``agent``'s ``capacity`` slots, or ``None`` when all are in use."""
        ...

    async def give_back(self, token: SlotToken) -> None: ...

    def kept(self, agent: str) -> bool:
        """Whether a slot of ``agent`` given back here is still held here, unused: the next
        :meth:`take` there costs nothing (the pool prefers such an agent among the equally
        loaded ones)."""
        ...


class LocalSlots:
    """This process is the only one using its agents."""

    poll_s = 1.0

    async def take(self, agent: str, capacity: int) -> SlotToken | None:
        return _LOCAL

    async def give_back(self, token: SlotToken) -> None:
        return None

    def kept(self, agent: str) -> bool:
        return False


class _Local:
    pass


_LOCAL = _Local()
