"""Protobuf <-> domain conversions: the one place where the two vocabularies meet."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from imagetasks.v1 import common_pb2, job_pb2, tasks_pb2

from aiserver.api.status import to_status_proto
from aiserver.errors import invalid_argument
from aiserver.imaging import OutputFormat, parse_format
from aiserver.jobs.model import (
    Accepted,
    ArtifactRef,
    Job,
    JobEvent,
    JobState,
    OutputStored,
    Progress,
    Retrying,
    Stage,
    TextProduced,
    WebhookDelivery,
)
from aiserver.tasks import (
    ImageToImageSpec,
    ImageToTextSpec,
    ImageUpscaleSpec,
    ImageWithMaskSpec,
    TaskKind,
    TaskSpec,
    WorkflowSpec,
    spec_to_dict,
)

__all__ = [
    "Link",
    "artifact_to_proto",
    "event_to_proto",
    "format_from_proto",
    "format_to_proto",
    "job_to_proto",
    "output_encoding",
    "spec_from_proto",
    "state_from_proto",
    "struct_from_dict",
    "struct_to_dict",
    "task_from_proto",
    "task_to_proto",
]

_FORMAT_NAMES = {
    common_pb2.IMAGE_FORMAT_JPEG: "jpg",
    common_pb2.IMAGE_FORMAT_PNG: "png",
    common_pb2.IMAGE_FORMAT_GIF: "gif",
    common_pb2.IMAGE_FORMAT_BMP: "bmp",
    common_pb2.IMAGE_FORMAT_TIFF: "tiff",
    common_pb2.IMAGE_FORMAT_WEBP: "webp",
    common_pb2.IMAGE_FORMAT_AVIF: "avif",
}
_FORMAT_VALUES = {name: value for value, name in _FORMAT_NAMES.items()}


def format_from_proto(value: int, field: str) -> OutputFormat | None:
    """None for UNSPECIFIED; INVALID_ARGUMENT for numbers the contract does not define."""
    if value == common_pb2.IMAGE_FORMAT_UNSPECIFIED:
        return None
    name = _FORMAT_NAMES.get(value)  # type: ignore[call-overload]
    if name is None:
        raise invalid_argument(field, "UNSUPPORTED_FORMAT", f"unknown image format {value}")
    return parse_format(name, field)


def format_to_proto(fmt: OutputFormat | str) -> common_pb2.ImageFormat.ValueType:
    """The enum value of a format (or of its canonical name)."""
    return _FORMAT_VALUES[fmt if isinstance(fmt, str) else fmt.name]


# --- task parameters ---------------------------------------------------------------------

_MASK_CHANNELS = {
    tasks_pb2.MASK_CHANNEL_UNSPECIFIED: "red",
    tasks_pb2.MASK_CHANNEL_RED: "red",
    tasks_pb2.MASK_CHANNEL_GREEN: "green",
    tasks_pb2.MASK_CHANNEL_BLUE: "blue",
    tasks_pb2.MASK_CHANNEL_ALPHA: "alpha",
}
_MASK_VALUES = {name: value for value, name in _MASK_CHANNELS.items() if value}

_TASKS = {
    TaskKind.IMAGE_TO_IMAGE: common_pb2.TASK_IMAGE_TO_IMAGE,
    TaskKind.IMAGE_WITH_MASK: common_pb2.TASK_IMAGE_WITH_MASK,
    TaskKind.IMAGE_UPSCALE: common_pb2.TASK_IMAGE_UPSCALE,
    TaskKind.IMAGE_TO_TEXT: common_pb2.TASK_IMAGE_TO_TEXT,
    TaskKind.WORKFLOW: common_pb2.TASK_WORKFLOW,
}
_TASK_KINDS: dict[int, TaskKind] = {value: kind for kind, value in _TASKS.items()}


def task_to_proto(kind: TaskKind) -> common_pb2.Task.ValueType:
    return _TASKS[kind]


def task_from_proto(value: int) -> TaskKind | None:
    """None for UNSPECIFIED (no filter)."""
    if value == common_pb2.TASK_UNSPECIFIED:
        return None
    kind = _TASK_KINDS.get(value)
    if kind is None:
        raise invalid_argument("task", "UNKNOWN_TASK", f"unknown task {value}")
    return kind


def _opt(msg: Any, name: str) -> Any:
    return getattr(msg, name) if msg.HasField(name) else None


def _sampling(p: Any) -> dict[str, Any]:
    return {
        "positive_prompt": p.positive_prompt,
        "negative_prompt": _opt(p, "negative_prompt"),
        "model": p.model,
        "denoise": _opt(p, "denoise"),
        "batch_size": _opt(p, "batch_size"),
        "seed": _opt(p, "seed"),
        "steps": _opt(p, "steps"),
        "cfg_scale": _opt(p, "cfg_scale"),
        "sampler": p.sampler,
        "scheduler": p.scheduler,
        **output_encoding(p.options),
    }


def output_encoding(options: common_pb2.JobOptions) -> dict[str, Any]:
    """``output_format`` / ``output_quality`` of a spec, from job options the contract's rules
    have passed (:func:`~aiserver.api.validation.check_request`: quality is 1..100)."""
    fmt = format_from_proto(options.output_format, "params.options.output_format")
    quality = options.quality if options.HasField("quality") else None
    return {"output_format": fmt.name if fmt is not None else "", "output_quality": quality}


def spec_from_proto(kind: TaskKind, p: Any) -> TaskSpec:
    """The domain spec of a task's params message (not yet validated)."""
    if kind is TaskKind.IMAGE_TO_IMAGE:
        return ImageToImageSpec(**_sampling(p))
    if kind is TaskKind.IMAGE_WITH_MASK:
        channel = _MASK_CHANNELS.get(p.mask_channel)
        if channel is None:
            raise invalid_argument(
                "params.mask_channel",
                "INVALID_PARAMETERS",
                f"unknown mask channel {p.mask_channel}",
            )
        return ImageWithMaskSpec(**_sampling(p), mask_channel=channel)
    if kind is TaskKind.IMAGE_UPSCALE:
        return ImageUpscaleSpec(model=p.model, seed=_opt(p, "seed"), **output_encoding(p.options))
    return ImageToTextSpec(model=p.model, prompt=p.prompt)


def _set_optional(msg: Any, values: dict[str, Any]) -> None:
    for name, value in values.items():
        if value is not None and value != "":
            setattr(msg, name, value)


def spec_to_job_params(spec: TaskSpec, job: job_pb2.Job) -> None:
    """Fill the ``params`` oneof of a Job message from its spec."""
    if isinstance(spec, WorkflowSpec):
        job.workflow.workflow = f"workflows/{spec.workflow}"
        job.workflow.version = spec.version
        job.workflow.parameters.CopyFrom(struct_from_dict(spec.params))
        return
    values = spec_to_dict(spec)
    values.pop("workflow_documents", None)
    fmt, quality = values.pop("output_format", ""), values.pop("output_quality", None)
    target: Any
    if isinstance(spec, ImageWithMaskSpec):
        channel = values.pop("mask_channel")
        target = job.image_with_mask
        _set_optional(target, values)
        target.mask_channel = _MASK_VALUES[channel]
    elif isinstance(spec, ImageToImageSpec):
        target = job.image_to_image
        _set_optional(target, values)
    elif isinstance(spec, ImageUpscaleSpec):
        target = job.image_upscale
        _set_optional(target, values)
    else:
        target = job.image_to_text
        _set_optional(target, values)
    if fmt:
        target.options.output_format = format_to_proto(fmt)
    if quality is not None:
        target.options.quality = quality


def struct_from_dict(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain JSON values (numbers are floats, as in the Struct)."""
    values: dict[str, Any] = json_format.MessageToDict(struct)
    return values


# --- jobs and events ---------------------------------------------------------------------

_STATES = {
    JobState.QUEUED: job_pb2.Job.STATE_QUEUED,
    JobState.RUNNING: job_pb2.Job.STATE_RUNNING,
    JobState.SUCCEEDED: job_pb2.Job.STATE_SUCCEEDED,
    JobState.FAILED: job_pb2.Job.STATE_FAILED,
    JobState.CANCELLED: job_pb2.Job.STATE_CANCELLED,
}
_STATE_VALUES: dict[int, JobState] = {value: state for state, value in _STATES.items()}

_STAGES = {
    Stage.QUEUED: job_pb2.JobProgress.STAGE_QUEUED,
    Stage.UPLOADING: job_pb2.JobProgress.STAGE_UPLOADING,
    Stage.PENDING: job_pb2.JobProgress.STAGE_PENDING,
    Stage.RUNNING: job_pb2.JobProgress.STAGE_RUNNING,
    Stage.DOWNLOADING: job_pb2.JobProgress.STAGE_DOWNLOADING,
}


def state_from_proto(value: int) -> JobState:
    state = _STATE_VALUES.get(value)
    if state is None:
        raise invalid_argument("states", "UNKNOWN_STATE", f"unknown job state {value}")
    return state


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ts(when: datetime | None) -> timestamp_pb2.Timestamp | None:
    # Direct fields: Timestamp.FromDatetime does the same in Python, three times slower,
    # and a job's events carry a dozen timestamps.
    if when is None:
        return None
    since = when - _EPOCH if when.tzinfo is not None else when - _EPOCH.replace(tzinfo=None)
    return timestamp_pb2.Timestamp(
        seconds=since.days * 86400 + since.seconds, nanos=since.microseconds * 1000
    )


def _same(url: str) -> str:
    return url


Link = Callable[[str], str]
"""Turns an artifact's URL into the one handed out (e.g. signed); identity by default."""


def artifact_to_proto(ref: ArtifactRef, link: Link = _same) -> common_pb2.Artifact:
    msg = common_pb2.Artifact(
        name=ref.name,
        url=link(ref.url),
        file_name=ref.file_name,
        mime_type=ref.mime_type,
        width=ref.width,
        height=ref.height,
        size_bytes=ref.size_bytes,
        sha256=ref.sha256,
        provider=ref.provider,
        create_time=_ts(ref.created),
        job=f"jobs/{ref.job_id}",
    )
    if ref.seed is not None:
        msg.seed = ref.seed
    return msg


def job_to_proto(job: Job, queue_position: int = 0, link: Link = _same) -> job_pb2.Job:
    msg = job_pb2.Job(
        name=job.name,
        task=_TASKS[job.task],
        state=_STATES[job.state],
        ref_id=job.ref_id,
        tag=job.tag,
        owner=job.owner,
        provider=job.provider,
        agent=job.agent,
        attempts=job.attempts,
        create_time=_ts(job.created),
        start_time=_ts(job.started),
        end_time=_ts(job.ended),
        update_time=_ts(job.updated),
        queue_position=queue_position,
        progress=job.progress,
        outputs=[artifact_to_proto(a, link) for a in job.outputs],
        text_outputs=[job_pb2.TextOutput(index=i, text=t) for i, t in enumerate(job.texts)],
        reply_to=job.reply_to,
        waiting_reason=job.waiting if job.state is JobState.QUEUED else "",
        inputs=[
            job_pb2.InputFile(
                field=i.field,
                file_name=i.file_name,
                size_bytes=i.size_bytes,
                sha256=i.sha256,
                mime_type=i.mime_type,
                width=i.width,
                height=i.height,
            )
            for i in job.inputs
        ],
    )
    if job.error is not None:
        msg.error.CopyFrom(to_status_proto(job.error))
    if job.webhook is not None:
        msg.webhook.CopyFrom(webhook_to_proto(job.webhook))
    spec_to_job_params(job.spec, msg)
    return msg


def webhook_to_proto(delivery: WebhookDelivery) -> job_pb2.WebhookDelivery:
    return job_pb2.WebhookDelivery(
        state=job_pb2.WebhookDelivery.State.Value(f"STATE_{delivery.state}"),
        attempts=delivery.attempts,
        last_http_status=delivery.http_status or 0,
        last_error=delivery.error,
        end_time=_ts(delivery.ended),
    )


def event_to_proto(
    event: JobEvent, queue_position: int = 0, link: Link = _same
) -> job_pb2.JobEvent:
    """The wire form of a domain event; the one conversion every stream uses."""
    msg = job_pb2.JobEvent(
        job=f"jobs/{event.job_id}", sequence=event.sequence, time=_ts(event.time)
    )
    kind = event.kind
    if isinstance(kind, Accepted):
        msg.accepted.CopyFrom(
            job_pb2.JobAccepted(
                task=_TASKS[kind.task],
                ref_id=kind.ref_id,
                queue_position=kind.queue_position,
                existing=kind.existing,
            )
        )
    elif isinstance(kind, Progress):
        msg.progress.CopyFrom(
            job_pb2.JobProgress(
                stage=_STAGES[kind.stage],
                queue_position=kind.queue_position,
                node=kind.node,
                node_type=kind.node_type,
                step=kind.step,
                max_steps=kind.max_steps,
                fraction=kind.fraction,
                provider=kind.provider,
                waiting_reason=kind.waiting,
            )
        )
    elif isinstance(kind, OutputStored):
        msg.output.CopyFrom(
            job_pb2.OutputReady(index=kind.index, artifact=artifact_to_proto(kind.artifact, link))
        )
    elif isinstance(kind, TextProduced):
        msg.text_output.CopyFrom(
            job_pb2.TextOutput(index=kind.index, text=kind.text, node=kind.node)
        )
    elif isinstance(kind, Retrying):
        msg.retrying.CopyFrom(
            job_pb2.JobRetrying(attempt=kind.attempt, reason=kind.reason, agent=kind.agent)
        )
    else:
        msg.finished.CopyFrom(job_pb2.JobFinished(job=job_to_proto(kind.job, queue_position, link)))
    return msg
