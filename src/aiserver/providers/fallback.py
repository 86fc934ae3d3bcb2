"""Providers seen through a routing rule: a fallback, or a provider with tasks taken away."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aiserver.errors import ServiceError
from aiserver.providers.base import Provider, RunSink, WorkItem
from aiserver.tasks import TaskKind, TaskSpec

__all__ = ["Excluding", "Fallback", "unwrap"]


def unwrap(provider: Provider) -> Provider:
    """The provider behind any routing rules (what operators want to see)."""
    while isinstance(provider, _Delegate):
        provider = provider.inner
    return provider


class _Delegate:
    """Every Provider call passed through to ``inner``."""

    def __init__(self, inner: Provider) -> None:
        self.inner = inner
        self._inner = inner

    @property
    def name(self) -> str:
        return self._inner.name

    def supports(self, task: TaskKind) -> bool:
        return self._inner.supports(task)

    def can_run(self, task: TaskKind, spec: TaskSpec) -> bool:
        return self._inner.can_run(task, spec)

    def refusal(self, task: TaskKind, spec: TaskSpec) -> ServiceError | None:
        return self._inner.refusal(task, spec)

    def unavailable_reason(self, task: TaskKind, spec: TaskSpec) -> str:
        return self._inner.unavailable_reason(task, spec)

    def load(self) -> int:
        return self._inner.load()

    def capacity(self) -> int:
        return self._inner.capacity()

    async def start(self) -> None:
        await self._inner.start()

    async def close(self) -> None:
        await self._inner.close()

    async def run(self, work: WorkItem, sink: RunSink) -> None:
        await self._inner.run(work, sink)

    async def withdraw(self, resume: Mapping[str, str]) -> None:
        await self._inner.withdraw(resume)


class Fallback(_Delegate):
    """``inner`` runs a job only when no provider in ``primaries`` can run it now (none
    configured, none healthy, or none has the model). A busy primary is not a reason: the
    job waits for it.
    """

    def __init__(self, inner: Provider, primaries: Sequence[Provider]) -> None:
        super().__init__(inner)
        self._primaries = primaries

    def can_run(self, task: TaskKind, spec: TaskSpec) -> bool:
        return self._inner.can_run(task, spec) and not any(
            p.can_run(task, spec) for p in self._primaries
        )

    def unavailable_reason(self, task: TaskKind, spec: TaskSpec) -> str:
        if any(p.can_run(task, spec) for p in self._primaries):
            return ""  # a primary takes it: this one standing back is no reason to wait
        return self._inner.unavailable_reason(task, spec)


class Excluding(_Delegate):
    """``inner`` without some tasks (another provider always serves those)."""

    def __init__(self, inner: Provider, tasks: frozenset[TaskKind]) -> None:
        super().__init__(inner)
        self._excluded = tasks

    def supports(self, task: TaskKind) -> bool:
        return task not in self._excluded and self._inner.supports(task)

    def can_run(self, task: TaskKind, spec: TaskSpec) -> bool:
        return task not in self._excluded and self._inner.can_run(task, spec)

    def unavailable_reason(self, task: TaskKind, spec: TaskSpec) -> str:
        return "" if task in self._excluded else self._inner.unavailable_reason(task, spec)
