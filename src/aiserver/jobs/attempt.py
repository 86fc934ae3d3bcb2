"""One unfinished job's in-memory state, and the sink its provider reports to.

:class:`AttemptSink` turns what a provider reports into stored state and events, in that
order: an output or text is written to the store before its event goes out, a checkpoint before
``checkpoint()`` returns. It knows the manager only through two callables.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

from aiserver.errors import ErrorKind, FieldViolation, ServiceError
from aiserver.jobs.model import (
    ArtifactRef,
    EventKind,
    InputRef,
    Job,
    JobEvent,
    OutputStored,
    Progress,
    Retrying,
    TextProduced,
)
from aiserver.jobs.output_encoding import encode_output
from aiserver.jobs.outputs import ArtifactWriter
from aiserver.jobs.store import JobRecord, LeaseLost
from aiserver.providers.base import (
    GeneratedImage,
    GeneratedText,
    ProviderFailure,
    ProviderProgress,
)

__all__ = [
    "ActiveJob",
    "ActiveJobs",
    "AttemptSink",
    "CancelReason",
    "cancelled_error",
    "input_missing",
    "internal_error",
    "retryable_failure",
    "with_first_cause",
]

CancelReason = Literal["user", "shutdown"]


@dataclass(eq=False, slots=True)
class ActiveJob:
    """An unfinished job and what is going on with it right now."""

    record: JobRecord
    controller: asyncio.Task[None] | None = None
    run_task: asyncio.Task[None] | None = None
    sink: AttemptSink | None = None
    cancel_reason: CancelReason | None = None
    finishing: bool = False  # set before the terminal write: nothing may happen after it
    done: asyncio.Event = field(default_factory=asyncio.Event)
    last_position: int = 0  # the queue position last published
    queued_at: float = 0.0
    """When (monotonic) it was queued, or re-queued after an attempt that reached an agent:
    the queue deadline counts from here."""
    not_before: float = 0.0
    """Not dispatched before this (monotonic): set after an attempt that found no agent, so a
    provider that keeps saying no is not asked in a loop."""
    input_bytes: dict[str, bytes] | None = None
    """The bytes of its stored inputs by SHA-256, while held in memory (:mod:`.held_inputs`):
    ``None``, its attempts read them from the store."""

    @property
    def job(self) -> Job:
        return self.record.job


class ActiveJobs(dict[str, ActiveJob]):
    """Unfinished jobs by id, with how many each owner has, kept as jobs come and go: every
    submit checks the owner's limit, and a count kept here spares a scan of every active job
    (at a backlog of N jobs, N steps per submit).

    Every way of changing a dict keeps the counts: item assignment, ``del`` and ``pop``;
    the others (``update``, ``setdefault``, ``popitem``, ``clear``) are refused rather than
    left to bypass them."""

    __slots__ = ("_by_owner",)

    def __init__(self) -> None:
        super().__init__()
        self._by_owner: dict[str, int] = {}

    def __setitem__(self, job_id: str, active: ActiveJob) -> None:
        replaced = self.get(job_id)
        if replaced is not None:
            self._uncount(replaced.job.owner)
        super().__setitem__(job_id, active)
        owner = active.job.owner
        self._by_owner[owner] = self._by_owner.get(owner, 0) + 1

    def __delitem__(self, job_id: str) -> None:
        owner = self[job_id].job.owner
        super().__delitem__(job_id)
        self._uncount(owner)

    _missing = object()

    def pop(self, job_id: str, default: Any = _missing) -> Any:
        if job_id not in self:
            if default is ActiveJobs._missing:
                raise KeyError(job_id)
            return default
        active = self[job_id]
        del self[job_id]
        return active

    def _refused(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("ActiveJobs keeps per-owner counts: use item assignment, del or pop")

    update = setdefault = popitem = clear = __ior__ = _refused

    def owned_by(self, owner: str) -> int:
        """Unfinished jobs of ``owner``."""
        return self._by_owner.get(owner, 0)

    def _uncount(self, owner: str) -> None:
        left = self._by_owner[owner] - 1
        if left:
            self._by_owner[owner] = left
        else:
            del self._by_owner[owner]


Save = Callable[[ActiveJob], Awaitable[None]]
Emit = Callable[[ActiveJob, EventKind], JobEvent | None]
RideOut = Callable[[ActiveJob, Callable[[], Awaitable[ArtifactRef]]], Awaitable[ArtifactRef]]
"""Stores an output, again while the store is away and the job's lease has time left."""


class AttemptSink:
    """The ``RunSink`` of one attempt; calls after the attempt ended are ignored."""

    def __init__(
        self,
        active: ActiveJob,
        *,
        provider: str,
        artifacts: ArtifactWriter,
        save: Save,
        emit: Emit,
        resumed: bool,
        lease_firm: Callable[[str], bool] | None = None,
        ride_out: RideOut | None = None,
        flush_progress: Callable[[ActiveJob], None] | None = None,
    ) -> None:
        self._active = active
        self._flush_progress = flush_progress
        self._lease_firm = lease_firm
        self._ride_out = ride_out
        self._provider = provider
        self._artifacts = artifacts
        self._save = save
        self._emit = emit
        self._resumed = resumed
        self.closed = False

    def _live(self) -> bool:
        return not self.closed and not self._active.finishing

    async def progress(self, update: ProviderProgress) -> None:
        if not self._live():
            return
        fraction = update.fraction if math.isfinite(update.fraction) else 0.0
        fraction = min(max(fraction, 0.0), 1.0)
        self._active.job.progress = fraction
        self._emit(
            self._active,
            Progress(
                update.stage,
                fraction=fraction,
                queue_position=update.queue_position,
                node=update.node,
                node_type=update.node_type,
                step=update.step,
                max_steps=update.max_steps,
                provider=self._provider,
            ),
        )

    async def image(self, image: GeneratedImage) -> None:
        if not self._live():
            return
        job = self._active.job
        if self._flush_progress is not None:
            # The store waits for the disk (fsyncs): the progress held back until the output
            # event goes to the callers meanwhile, not after it (EventHub.flush_progress).
            self._flush_progress(self._active)
        image = await encode_output(image, job.spec)
        if self._resumed and any(o.file_name == image.file_name for o in job.outputs):
            # A re-attached run delivers again what an earlier holder stored before it died;
            # its bytes may differ (a re-run for missed frames encodes the image again), its
            # output slot (node and index, or ComfyUI's file name) does not.
            return

        def put() -> Awaitable[ArtifactRef]:
            return self._artifacts.put(
                image.data,
                file_name=image.file_name,
                mime_type=image.mime_type,
                width=image.width,
                height=image.height,
                seed=image.seed,
                provider=self._provider,
                job_id=job.id,
                owner=job.owner,
            )

        artifact = await (put() if self._ride_out is None else self._ride_out(self._active, put))
        # Outputs are append-only per job and deduplicated by content: a re-attached run
        # delivers again what was stored before the restart.
        if not self._live() or any(o.sha256 == artifact.sha256 for o in job.outputs):
            return
        job.outputs.append(artifact)
        await self._save(self._active)
        self._emit(self._active, OutputStored(len(job.outputs) - 1, artifact))

    async def text(self, text: GeneratedText) -> None:
        job = self._active.job
        if not self._live() or (self._resumed and text.text in job.texts):
            return  # a re-attached run may deliver again what was stored before the restart
        job.texts.append(text.text)
        await self._save(self._active)
        self._emit(self._active, TextProduced(len(job.texts) - 1, text.text, text.node))

    async def checkpoint(self, state: Mapping[str, str]) -> None:
        if not self._live():
            return
        job = self._active.job
        job.resume = dict(state)
        job.agent = state.get("agent", job.agent)
        await self._save(self._active)  # stored before the provider goes on
        if self._lease_firm is not None and not self._lease_firm(job.id):
            # The provider queues its work next. The fenced save above proves that no other
            # process had taken the job yet, not that none will before the work is queued:
            # with its renewals failing, this lease may lapse now, and a taker that looks
            # for the checkpoint's prompt before it is queued here would queue it too. So a
            # run whose lease is not firm stops here; its taker queues the prompt, once.
            raise LeaseLost(job.id)


def cancelled_error() -> ServiceError:
    return ServiceError(ErrorKind.CANCELLED, "JOB_CANCELLED", "the job was cancelled")


def internal_error() -> ServiceError:
    """What the client sees of an unexpected failure (the details go to the log)."""
    return ServiceError(ErrorKind.INTERNAL, "INTERNAL", "the job failed with an internal error")


def retryable_failure(error: BaseException | None) -> ProviderFailure | None:
    """``error`` when its cause says another agent, provider or later attempt may succeed."""
    return error if isinstance(error, ProviderFailure) and error.retryable else None


def input_missing(ref: InputRef) -> ServiceError:
    return ServiceError(
        ErrorKind.FAILED_PRECONDITION,
        "INPUT_MISSING",
        f"input {ref.field!r} is no longer in the spool",
        violations=(FieldViolation(ref.field, "not found in the input spool"),),
        metadata={"field": ref.field, "sha256": ref.sha256},
    )


def with_first_cause(error: ServiceError, retries: Sequence[Retrying]) -> ServiceError:
    """``error`` naming the failure that started the retries too: that is the real cause, where
    the last attempt may only have found no agent, or the queue deadline passed."""
    if not retries or retries[0].reason in error.message:
        return error
    first = retries[0]
    where = f" (on {first.agent})" if first.agent else ""
    return ServiceError(
        error.kind,
        error.reason,
        f"{error.message}; first failure{where}: {first.reason}",
        violations=error.violations,
        metadata={**error.metadata, "first_failure": first.reason[:1000]},
        retry_after_s=error.retry_after_s,
    )
