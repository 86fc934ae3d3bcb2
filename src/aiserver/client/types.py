"""What the client returns: job events as small dataclasses, and collected results.

Jobs and artifacts stay protobuf messages (``imagetasks.v1.job_pb2.Job``,
``imagetasks.v1.common_pb2.Artifact``): they are rich, typed and print as JSON with
``google.protobuf.json_format``. Every event keeps the message it came from in ``raw``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import grpc
from imagetasks.v1 import artifact_service_pb2, common_pb2, job_pb2

from aiserver.client.errors import ClientError

__all__ = [
    "Accepted",
    "Event",
    "Finished",
    "ImageInfo",
    "ImageResult",
    "JobPage",
    "Output",
    "OutputData",
    "OutputReady",
    "Progress",
    "Result",
    "Retrying",
    "Stage",
    "TextOutput",
    "VariantInfo",
    "VariantResult",
    "event_from_proto",
    "format_name",
    "image_format",
    "job_error",
    "job_state_name",
    "task_name",
]


class Stage(enum.StrEnum):
    """What a job is doing (``JobProgress.Stage``)."""

    UNSPECIFIED = "unspecified"
    QUEUED = "queued"
    UPLOADING = "uploading"
    PENDING = "pending"
    RUNNING = "running"
    DOWNLOADING = "downloading"


_STAGES = {
    job_pb2.JobProgress.STAGE_QUEUED: Stage.QUEUED,
    job_pb2.JobProgress.STAGE_UPLOADING: Stage.UPLOADING,
    job_pb2.JobProgress.STAGE_PENDING: Stage.PENDING,
    job_pb2.JobProgress.STAGE_RUNNING: Stage.RUNNING,
    job_pb2.JobProgress.STAGE_DOWNLOADING: Stage.DOWNLOADING,
}

_FORMATS: dict[str, common_pb2.ImageFormat.ValueType] = {
    "jpg": common_pb2.IMAGE_FORMAT_JPEG,
    "jpeg": common_pb2.IMAGE_FORMAT_JPEG,
    "png": common_pb2.IMAGE_FORMAT_PNG,
    "gif": common_pb2.IMAGE_FORMAT_GIF,
    "bmp": common_pb2.IMAGE_FORMAT_BMP,
    "tiff": common_pb2.IMAGE_FORMAT_TIFF,
    "tif": common_pb2.IMAGE_FORMAT_TIFF,
    "webp": common_pb2.IMAGE_FORMAT_WEBP,
    "avif": common_pb2.IMAGE_FORMAT_AVIF,
}
_FORMAT_NAMES: dict[int, str] = {
    common_pb2.IMAGE_FORMAT_JPEG: "jpg",
    common_pb2.IMAGE_FORMAT_PNG: "png",
    common_pb2.IMAGE_FORMAT_GIF: "gif",
    common_pb2.IMAGE_FORMAT_BMP: "bmp",
    common_pb2.IMAGE_FORMAT_TIFF: "tiff",
    common_pb2.IMAGE_FORMAT_WEBP: "webp",
    common_pb2.IMAGE_FORMAT_AVIF: "avif",
}


def image_format(value: str | int | None) -> common_pb2.ImageFormat.ValueType:
    """``"webp"`` (or ``"IMAGE_FORMAT_WEBP"``, or the enum number) as an ``ImageFormat``."""
    if value is None or value == "":
        return common_pb2.IMAGE_FORMAT_UNSPECIFIED
    if isinstance(value, int):
        if value not in _FORMAT_NAMES and value != common_pb2.IMAGE_FORMAT_UNSPECIFIED:
            raise ValueError(f"unknown image format number {value}")
        return common_pb2.ImageFormat.ValueType(value)
    key = value.strip().lower().removeprefix("image_format_").lstrip(".")
    if key not in _FORMATS:
        known = ", ".join(sorted(_FORMATS))
        raise ValueError(f"unknown image format {value!r} (known: {known})")
    return _FORMATS[key]


def format_name(value: int) -> str:
    """``IMAGE_FORMAT_WEBP`` -> ``"webp"``; unspecified -> ``""``."""
    return _FORMAT_NAMES.get(value, "")


def task_name(task: int) -> str:
    """``TASK_IMAGE_UPSCALE`` -> ``"ImageUpscale"``."""
    name = str(common_pb2.Task.Name(common_pb2.Task.ValueType(task))).removeprefix("TASK_")
    return "".join(part.capitalize() for part in name.split("_"))


def job_state_name(state: int) -> str:
    """``STATE_SUCCEEDED`` -> ``"SUCCEEDED"``."""
    return str(job_pb2.Job.State.Name(job_pb2.Job.State.ValueType(state))).removeprefix("STATE_")


# ---- events --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accepted:
    """The job exists and is queued (first event of every job stream)."""

    job: str
    sequence: int
    task: str
    ref_id: str
    queue_position: int
    existing: bool
    """True when ``ref_id`` matched a job this caller had already created."""
    raw: job_pb2.JobEvent = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Progress:
    """The job moved in the queue, started or advanced."""

    job: str
    sequence: int
    stage: Stage
    queue_position: int
    node: str
    node_type: str
    step: int
    max_steps: int
    fraction: float
    """Overall fraction done, 0..1."""
    provider: str
    raw: job_pb2.JobEvent = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class OutputReady:
    """An output is stored; with byte delivery its bytes follow as :class:`OutputData`."""

    job: str
    sequence: int
    index: int
    artifact: common_pb2.Artifact
    raw: job_pb2.JobEvent = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class OutputData:
    """A piece of the bytes of output ``index``, at ``offset``; ``last`` on its final piece."""

    job: str
    sequence: int
    index: int
    offset: int
    data: bytes
    last: bool
    raw: job_pb2.JobEvent = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class TextOutput:
    """A text output (ImageToText)."""

    job: str
    sequence: int
    index: int
    text: str
    node: str
    raw: job_pb2.JobEvent = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Retrying:
    """An attempt failed in a way worth retrying; the job is queued again."""

    job: str
    sequence: int
    attempt: int
    reason: str
    agent: str
    raw: job_pb2.JobEvent = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Finished:
    """Last event of every job stream: ``final`` is the job in its terminal state."""

    job: str
    sequence: int
    final: job_pb2.Job = field(repr=False)
    raw: job_pb2.JobEvent = field(repr=False, compare=False)

    @property
    def state(self) -> str:
        """``SUCCEEDED``, ``FAILED`` or ``CANCELLED``."""
        return job_state_name(self.final.state)

    @property
    def error(self) -> ClientError | None:
        """Why the job failed or was cancelled; None when it succeeded."""
        return job_error(self.final)


Event = Accepted | Progress | OutputReady | OutputData | TextOutput | Retrying | Finished
"""One event of a job stream (``JobEvent``), by kind."""


def job_error(job: job_pb2.Job) -> ClientError | None:
    """Why ``job`` failed or was cancelled, as a :class:`ClientError`; None otherwise."""
    if job.state not in (job_pb2.Job.STATE_FAILED, job_pb2.Job.STATE_CANCELLED):
        return None
    if job.HasField("error") and job.error.code:
        return ClientError.from_status(job.error)
    cancelled = job.state == job_pb2.Job.STATE_CANCELLED
    code = grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN
    return ClientError(code, f"job {job.name} {job_state_name(job.state).lower()}")


def event_from_proto(event: job_pb2.JobEvent) -> Event | None:
    """The dataclass of one ``JobEvent``; None for a kind this client does not know."""
    kind = event.WhichOneof("kind")
    job, seq = event.job, event.sequence
    if kind == "accepted":
        a = event.accepted
        return Accepted(
            job, seq, task_name(a.task), a.ref_id, a.queue_position, a.existing, raw=event
        )
    if kind == "progress":
        p = event.progress
        return Progress(
            job,
            seq,
            _STAGES.get(p.stage, Stage.UNSPECIFIED),
            p.queue_position,
            p.node,
            p.node_type,
            p.step,
            p.max_steps,
            p.fraction,
            p.provider,
            raw=event,
        )
    if kind == "output":
        return OutputReady(job, seq, event.output.index, event.output.artifact, raw=event)
    if kind == "output_chunk":
        c = event.output_chunk
        return OutputData(job, seq, c.index, c.offset, c.data, c.last, raw=event)
    if kind == "text_output":
        t = event.text_output
        return TextOutput(job, seq, t.index, t.text, t.node, raw=event)
    if kind == "retrying":
        r = event.retrying
        return Retrying(job, seq, r.attempt, r.reason, r.agent, raw=event)
    if kind == "finished":
        return Finished(job, seq, event.finished.job, raw=event)
    return None


# ---- results -------------------------------------------------------------------------------


@dataclass(slots=True)
class Output:
    """One image output of a job: its artifact and, with byte delivery, its bytes."""

    index: int
    artifact: common_pb2.Artifact
    data: bytes | None = None
    """None when the call asked for references only (read it with ``read_artifact``)."""


@dataclass(slots=True)
class Result:
    """Everything a generative call produced (``JobStream.run()``)."""

    job_name: str
    job: job_pb2.Job
    """The job in its final state (or as it is now, for ``wait=False``)."""
    outputs: list[Output] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    existing: bool = False
    """The job already existed (same ``ref_id``): this is that job."""

    @property
    def state(self) -> str:
        """``SUCCEEDED``, ``FAILED``, ``CANCELLED``, or ``QUEUED``/``RUNNING`` without wait."""
        return job_state_name(self.job.state)

    @property
    def succeeded(self) -> bool:
        return self.job.state == job_pb2.Job.STATE_SUCCEEDED

    @property
    def error(self) -> ClientError | None:
        """Why the job failed or was cancelled; None otherwise."""
        return job_error(self.job)

    def raise_for_state(self) -> Result:
        """Raise the job's error as :class:`ClientError` when it failed or was cancelled."""
        err = self.error
        if err is not None:
            raise err
        return self


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """Facts about the image a light task returns."""

    format: str
    """``png``, ``jpg``, ``webp``..."""
    mime_type: str
    width: int
    height: int
    size_bytes: int
    file_name: str

    @classmethod
    def from_proto(cls, info: common_pb2.ImageInfo) -> ImageInfo:
        return cls(
            format_name(info.format),
            info.mime_type,
            info.width,
            info.height,
            info.size_bytes,
            info.file_name,
        )


@dataclass(slots=True)
class ImageResult:
    """A cropped or converted image. ``data`` is None when it was written to ``out``."""

    info: ImageInfo
    data: bytes | None


@dataclass(frozen=True, slots=True)
class VariantInfo:
    spec: str
    """The canonical spec, e.g. ``width=256,format=webp``."""
    image: ImageInfo
    etag: str
    url: str

    @classmethod
    def from_proto(cls, info: artifact_service_pb2.VariantInfo) -> VariantInfo:
        return cls(info.spec, ImageInfo.from_proto(info.image), info.etag, info.url)


@dataclass(slots=True)
class VariantResult:
    """A variant of an artifact. ``data`` is None when it was written to ``out``."""

    info: VariantInfo
    data: bytes | None


@dataclass(slots=True)
class JobPage:
    """One page of ``list_jobs``."""

    jobs: list[job_pb2.Job]
    next_page_token: str
