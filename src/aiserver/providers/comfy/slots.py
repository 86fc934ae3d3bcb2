"""Who else is using an agent: the slots an agent admits, shared by every coordinator.

A pool alone on its agents counts their running jobs in memory (:class:`LocalSlots` grants
every request: the pool's own count is the limit). Coordinators sharing agents take a slot
from the job store first (``aiserver.jobs.agent_slots``), so two of them never put more
than an agent's ``max_concurrent_jobs`` on it (docs/scale-out.md, "Agent slots").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from aiserver.providers.base import (
    GeneratedImage,
    GeneratedText,
    ProviderProgress,
    RunSink,
)
from aiserver.providers.failures import Cause, ProviderUnavailable

__all__ = ["AgentSlots", "LocalSlots", "SlotFencedSink", "SlotToken"]


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

    def firm(self, token: SlotToken) -> bool:
        """Whether ``token`` is still held with a third of its lease or more to run: long
        enough to put a prompt on its agent before another process could take the slot."""
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

    def firm(self, token: SlotToken) -> bool:
        return True


class SlotFencedSink:
    """A run's sink that puts no prompt on an agent while the run's slot is not firm.

    A run checkpoints right before each prompt it queues (``run.py``). With the slot's
    renewals failing (or its claim answered late), the lease may lapse before the prompt is
    on the agent, and another coordinator may have claimed the slot by then: two prompts
    on a one-slot agent. As a job lease that is not firm stops a run before its prompt
    (``AttemptSink.checkpoint``), this fails the attempt before the prompt reaches the agent
    (the job goes back to the queue and claims a slot afresh); a prompt already queued runs
    on. The slot is judged after the checkpoint is saved, right before the prompt goes: the
    save may take up to the database timeout, long enough for the lease to lapse."""

    def __init__(self, sink: RunSink, firm: Callable[[], bool], agent: str) -> None:
        self._sink = sink
        self._firm = firm
        self._agent = agent
        self._queued = False  # a checkpoint passed: its prompt went to the agent

    async def progress(self, update: ProviderProgress) -> None:
        await self._sink.progress(update)

    async def image(self, image: GeneratedImage) -> None:
        await self._sink.image(image)

    async def text(self, text: GeneratedText) -> None:
        await self._sink.text(text)

    async def checkpoint(self, state: Mapping[str, str]) -> None:
        await self._sink.checkpoint(state)
        if not self._firm():
            # A later prompt of the attempt (a repeat for lost frames): its first ran on the
            # agent, so the attempt reached it and counts: retried now, not re-queued as
            # unreached under its first queueing's deadline (a long run may have passed it).
            raise ProviderUnavailable(
                f"agent {self._agent}: its slot's lease may lapse before the prompt is queued"
                " (renewals failing or late): not queued there",
                cause=Cause.SLOT_LAPSED if self._queued else Cause.NO_AGENT,
                agent=self._agent,
            )
        self._queued = True


class _Local:
    pass


_LOCAL = _Local()
