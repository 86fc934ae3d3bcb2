"""Jobs and their events, as plain data.

The event types map one to one onto ``imagetasks.v1.JobEvent``; ``aiserver.api.convert``
is the only place that translates them. ``Stage`` lives in :mod:`aiserver.stages`, below both
jobs and providers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from aiserver.errors import ServiceError
from aiserver.stages import Stage
from aiserver.tasks import TaskKind, TaskSpec

__all__ = [
    "Accepted",
    "ArtifactRef",
    "EventKind",
    "Finished",
    "InputRef",
    "Job",
    "JobEvent",
    "JobState",
    "OutputStored",
    "Progress",
    "Retrying",
    "Stage",
    "TextProduced",
    "WebhookDelivery",
]


class JobState(enum.Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True, slots=True)
class InputRef:
    """An uploaded input, spooled content-addressed - or, ``stored``, kept by the job store
    with the job itself (a small input on the embedded store: no file of its own)."""

    field: str
    file_name: str
    sha256: str
    size_bytes: int
    mime_type: str
    width: int
    height: int
    stored: bool = False


@dataclass(frozen=True, slots=True)
class ArtifactRef:
    """A stored output."""

    name: str
    """``artifacts/{yyyy}/{mm}/{dd}/{sha256}.{ext}``"""
    url: str
    file_name: str
    mime_type: str
    width: int
    height: int
    size_bytes: int
    sha256: str
    seed: int | None
    provider: str
    created: datetime
    job_id: str


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """How the delivery of a job's ReplyTo webhook ended."""

    state: str
    """``DELIVERED``, ``FAILED`` or ``REFUSED``."""
    attempts: int
    http_status: int | None
    """The receiver's status on the last attempt; None when none answered."""
    error: str
    ended: datetime


@dataclass(slots=True)
class Job:
    """A job record, as stored."""

    id: str
    task: TaskKind
    spec: TaskSpec
    state: JobState
    created: datetime
    updated: datetime
    owner: str = ""
    ref_id: str = ""
    tag: str = ""
    reply_to: str = ""
    provider: str = ""
    agent: str = ""
    attempts: int = 0
    started: datetime | None = None
    ended: datetime | None = None
    progress: float = 0.0
    inputs: list[InputRef] = field(default_factory=list)
    outputs: list[ArtifactRef] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    error: ServiceError | None = None
    resume: dict[str, str] = field(default_factory=dict)
    """Provider state needed to re-attach after a restart (e.g. agent and prompt id)."""
    waiting: str = ""
    """While QUEUED: why no provider can take it now ("" when it only waits its turn).
    Live state, not stored: the scheduler finds it again within seconds of a restart."""
    webhook: WebhookDelivery | None = None
    """Set once the ReplyTo delivery has ended (written by ``JobStore.record_webhook``)."""

    @property
    def name(self) -> str:
        return f"jobs/{self.id}"


@dataclass(frozen=True, slots=True)
class Accepted:
    task: TaskKind
    ref_id: str
    queue_position: int
    existing: bool = False


@dataclass(frozen=True, slots=True)
class Progress:
    stage: Stage
    fraction: float = 0.0
    queue_position: int = 0
    node: str = ""
    node_type: str = ""
    step: int = 0
    max_steps: int = 0
    provider: str = ""
    waiting: str = ""
    """``Stage.QUEUED`` only: why no provider can take the job now."""


@dataclass(frozen=True, slots=True)
class OutputStored:
    index: int
    artifact: ArtifactRef


@dataclass(frozen=True, slots=True)
class TextProduced:
    index: int
    text: str
    node: str = ""


@dataclass(frozen=True, slots=True)
class Retrying:
    attempt: int
    reason: str
    agent: str = ""


@dataclass(frozen=True, slots=True)
class Finished:
    job: Job


EventKind = Accepted | Progress | OutputStored | TextProduced | Retrying | Finished


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One event of one job; ``sequence`` counts from 1 without gaps."""

    job_id: str
    sequence: int
    time: datetime
    kind: EventKind
