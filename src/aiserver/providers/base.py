"""What the scheduler needs of a provider, and what a provider reports back.

A provider knows nothing of gRPC or of the job store: it gets a :class:`WorkItem`, reports
through a :class:`RunSink`, and raises :class:`aiserver.errors.ServiceError` on failure: a
:class:`ProviderFailure` (from :mod:`aiserver.providers.failures`) when the failure has a cause
the scheduler decides on, :class:`ProviderUnavailable` when another agent or provider may succeed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from aiserver.errors import ServiceError
from aiserver.providers.failures import Cause, ProviderFailure, ProviderUnavailable
from aiserver.stages import Stage
from aiserver.tasks import TaskKind, TaskSpec

__all__ = [
    "SHUTDOWN",
    "Cause",
    "GeneratedImage",
    "GeneratedText",
    "Provider",
    "ProviderFailure",
    "ProviderProgress",
    "ProviderUnavailable",
    "RunSink",
    "WorkInput",
    "WorkItem",
]


@dataclass(frozen=True, slots=True)
class WorkInput:
    """An input file ready on local disk, or its bytes in ``data`` (then nothing is at
    ``path``: a small input the job store kept with the job)."""

    field: str
    path: Path
    file_name: str
    sha256: str
    mime_type: str
    width: int
    height: int
    data: bytes | None = None


@dataclass(frozen=True, slots=True)
class WorkItem:
    job_id: str
    task: TaskKind
    spec: TaskSpec
    inputs: Mapping[str, WorkInput]
    attempt: int = 1
    resume: Mapping[str, str] = field(default_factory=dict)
    """What the provider saved with :meth:`RunSink.checkpoint` in an earlier run."""
    exclude: frozenset[str] = frozenset()
    """Agents that already failed this job: pick another one when retrying, and one of these
    only when no other can take it (one that was lost is back only once a probe found it)."""


@dataclass(frozen=True, slots=True)
class ProviderProgress:
    stage: Stage
    fraction: float = 0.0
    queue_position: int = 0
    node: str = ""
    node_type: str = ""
    step: int = 0
    max_steps: int = 0


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    data: bytes
    file_name: str
    mime_type: str
    width: int
    height: int
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class GeneratedText:
    text: str
    node: str = ""


class RunSink(Protocol):
    """Where a running provider reports. Calls are awaited in order."""

    async def progress(self, update: ProviderProgress) -> None: ...

    async def image(self, image: GeneratedImage) -> None: ...

    async def text(self, text: GeneratedText) -> None: ...

    async def checkpoint(self, state: Mapping[str, str]) -> None:
        """Persist what is needed to re-attach to this run after a restart."""
        ...


class Provider(Protocol):
    """Something that can run jobs."""

    @property
    def name(self) -> str: ...

    async def start(self) -> None:
        """Begin (health probes, model loading...); called once before any run."""
        ...

    async def close(self) -> None: ...

    def supports(self, task: TaskKind) -> bool:
        """Configured for this task at all, whatever its health right now."""
        ...

    def can_run(self, task: TaskKind, spec: TaskSpec) -> bool:
        """True when this provider is healthy and has what the task needs right now."""
        ...

    def refusal(self, task: TaskKind, spec: TaskSpec) -> ServiceError | None:
        """Why this provider cannot run ``spec`` as things stand, when waiting will not help
        (e.g. no healthy agent has the model); None when it can, or may once agents return.
        """
        ...

    def unavailable_reason(self, task: TaskKind, spec: TaskSpec) -> str:
        """Why it cannot run ``spec`` right now, for watchers of a waiting job (e.g. which
        agents are down); "" when it can."""
        ...

    def load(self) -> int:
        """Jobs running now, for least-loaded choice."""
        ...

    def capacity(self) -> int:
        """Jobs it can run at once right now (e.g. the slots of its healthy agents); the
        scheduler keeps the rest queued, with a queue position, instead of handing them over."""
        ...

    async def withdraw(self, resume: Mapping[str, str]) -> None:
        """Take off its agent the remote work an earlier process left, named by the
        checkpoint it saved (delete it if pending, interrupt it if running): its job was
        cancelled while no process followed it. Bounded in time; nothing left is no error."""
        ...

    async def run(self, work: WorkItem, sink: RunSink) -> None:
        """Run to completion.

        ``CancelledError`` cancels the remote work too, except when its message is
        :data:`SHUTDOWN` (the server is stopping): then detach and leave the remote work
        running, so the job re-attaches through its checkpoint at the next start.
        """
        ...


SHUTDOWN = "aiserver:shutdown"
"""Message of the ``CancelledError`` that means "detach, the server is stopping"."""
