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
_NAIVE_EPOCH = _EPOCH.replace(tzinfo=None)


def _set_ts(field: timestamp_pb2.Timestamp, when: datetime | None) -> None:
    # Direct fields: Timestamp.FromDatetime does the same in Python, three times slower,
    # and a job's events carry a dozen timestamps. Set in place: a Timestamp built apart
    # is copied again into its field.
    if when is None:
        return
    since = when - (_EPOCH if when.tzinfo is not None else _NAIVE_EPOCH)
    field.seconds = since.days * 86400 + since.seconds
    field.nanos = since.microseconds * 1000


def _ts(when: datetime | None) -> timestamp_pb2.Timestamp | None:
    if when is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    _set_ts(stamp, when)
    return stamp


def _same(url: str) -> str:
    return url


Link = Callable[[str], str]
"""Turns an artifact's URL into the one handed out (e.g. signed); identity by default."""

# Messages are filled in place (``into``): a message passed to a constructor or to CopyFrom
# is copied whole, and the finished event's Job was copied twice that way on every job.


def artifact_to_proto(
    ref: ArtifactRef, link: Link = _same, into: common_pb2.Artifact | None = None
) -> common_pb2.Artifact:
    msg = common_pb2.Artifact() if into is None else into
    msg.name = ref.name
    msg.url = link(ref.url)
    msg.file_name = ref.file_name
    msg.mime_type = ref.mime_type
    msg.width = ref.width
    msg.height = ref.height
    msg.size_bytes = ref.size_bytes
    msg.sha256 = ref.sha256
    msg.provider = ref.provider
    _set_ts(msg.create_time, ref.created)
    msg.job = f"jobs/{ref.job_id}"
    if ref.seed is not None:
        msg.seed = ref.seed
    return msg


def job_to_proto(
    job: Job, queue_position: int = 0, link: Link = _same, into: job_pb2.Job | None = None
) -> job_pb2.Job:
    msg = job_pb2.Job() if into is None else into
    msg.name = job.name
    msg.task = _TASKS[job.task]
    msg.state = _STATES[job.state]
    msg.ref_id = job.ref_id
    msg.tag = job.tag
    msg.owner = job.owner
    msg.provider = job.provider
    msg.agent = job.agent
    msg.attempts = job.attempts
    _set_ts(msg.create_time, job.created)
    _set_ts(msg.start_time, job.started)
    _set_ts(msg.end_time, job.ended)
    _set_ts(msg.update_time, job.updated)
    msg.queue_position = queue_position
    msg.progress = job.progress
    for artifact in job.outputs:
        artifact_to_proto(artifact, link, msg.outputs.add())
    for i, text in enumerate(job.texts):
        msg.text_outputs.add(index=i, text=text)
    msg.reply_to = job.reply_to
    if job.state is JobState.QUEUED:
        msg.waiting_reason = job.waiting
    for ref in job.inputs:
        msg.inputs.add(
            field=ref.field,
            file_name=ref.file_name,
            size_bytes=ref.size_bytes,
            sha256=ref.sha256,
            mime_type=ref.mime_type,
            width=ref.width,
            height=ref.height,
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
    event: JobEvent,
    queue_position: int = 0,
    link: Link = _same,
    into: job_pb2.JobEvent | None = None,
) -> job_pb2.JobEvent:
    """The wire form of a domain event; the one conversion every stream uses."""
    msg = job_pb2.JobEvent() if into is None else into
    msg.job = f"jobs/{event.job_id}"
    msg.sequence = event.sequence
    _set_ts(msg.time, event.time)
    kind = event.kind
    if isinstance(kind, Progress):
        progress = msg.progress
        progress.SetInParent()  # present in the oneof even when every field is a default
        progress.stage = _STAGES[kind.stage]
        progress.queue_position = kind.queue_position
        progress.node = kind.node
        progress.node_type = kind.node_type
        progress.step = kind.step
        progress.max_steps = kind.max_steps
        progress.fraction = kind.fraction
        progress.provider = kind.provider
        progress.waiting_reason = kind.waiting
    elif isinstance(kind, Accepted):
        accepted = msg.accepted
        accepted.SetInParent()
        accepted.task = _TASKS[kind.task]
        accepted.ref_id = kind.ref_id
        accepted.queue_position = kind.queue_position
        accepted.existing = kind.existing
    elif isinstance(kind, OutputStored):
        output = msg.output
        output.SetInParent()
        output.index = kind.index
        artifact_to_proto(kind.artifact, link, output.artifact)
    elif isinstance(kind, TextProduced):
        text = msg.text_output
        text.SetInParent()
        text.index = kind.index
        text.text = kind.text
        text.node = kind.node
    elif isinstance(kind, Retrying):
        retrying = msg.retrying
        retrying.SetInParent()
        retrying.attempt = kind.attempt
        retrying.reason = kind.reason
        retrying.agent = kind.agent
    else:
        job_to_proto(kind.job, queue_position, link, msg.finished.job)
    return msg
