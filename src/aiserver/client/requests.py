"""The client's calls as typed request objects: one frozen dataclass per call that takes more
than a name.

A dataclass's constructor *is* the client method's signature (``client.upscale(image,
model=...)`` builds ``ImageUpscale(image, model=...)``; see :mod:`aiserver.client._method`),
and the ``aiserver`` command fills the same dataclasses from its arguments, so each call's
parameters are written here once. ``timeout`` is the call's deadline in seconds (None: the
client's default).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, ClassVar, TypeAlias

from imagetasks.v1 import (
    artifact_service_pb2,
    common_pb2,
    generation_service_pb2,
    job_pb2,
    job_service_pb2,
    tasks_pb2,
    transform_service_pb2,
    workflow_service_pb2,
)

from aiserver.client._uploads import chunk_message
from aiserver.client.inputs import Destination, Input
from aiserver.client.types import image_format

__all__ = [
    "JOB_STATES",
    "MASK_CHANNELS",
    "TASK_NAMES",
    "VARIANT_FITS",
    "ConvertImage",
    "CropImage",
    "GenerativeRequest",
    "GetVariant",
    "ImageToImage",
    "ImageToText",
    "ImageUpscale",
    "ImageWithMask",
    "JobOptions",
    "ListJobs",
    "RunWorkflow",
    "TransformRequest",
    "artifact_name",
    "job_name",
    "state_value",
    "task_value",
]

_MASK_CHANNELS = {
    "red": tasks_pb2.MASK_CHANNEL_RED,
    "green": tasks_pb2.MASK_CHANNEL_GREEN,
    "blue": tasks_pb2.MASK_CHANNEL_BLUE,
    "alpha": tasks_pb2.MASK_CHANNEL_ALPHA,
}
_FITS = {
    "": artifact_service_pb2.VARIANT_FIT_UNSPECIFIED,
    "contain": artifact_service_pb2.VARIANT_FIT_CONTAIN,
    "cover": artifact_service_pb2.VARIANT_FIT_COVER,
    "fill": artifact_service_pb2.VARIANT_FIT_FILL,
}
_TASKS: dict[str, common_pb2.Task.ValueType] = {
    "imagetoimage": common_pb2.TASK_IMAGE_TO_IMAGE,
    "img2img": common_pb2.TASK_IMAGE_TO_IMAGE,
    "imagewithmask": common_pb2.TASK_IMAGE_WITH_MASK,
    "inpaint": common_pb2.TASK_IMAGE_WITH_MASK,
    "imageupscale": common_pb2.TASK_IMAGE_UPSCALE,
    "upscale": common_pb2.TASK_IMAGE_UPSCALE,
    "imagetotext": common_pb2.TASK_IMAGE_TO_TEXT,
    "caption": common_pb2.TASK_IMAGE_TO_TEXT,
}
_STATES: dict[str, job_pb2.Job.State.ValueType] = {
    "queued": job_pb2.Job.STATE_QUEUED,
    "running": job_pb2.Job.STATE_RUNNING,
    "succeeded": job_pb2.Job.STATE_SUCCEEDED,
    "failed": job_pb2.Job.STATE_FAILED,
    "cancelled": job_pb2.Job.STATE_CANCELLED,
}
MASK_CHANNELS = tuple(_MASK_CHANNELS)
VARIANT_FITS = tuple(f for f in _FITS if f)
TASK_NAMES = tuple(_TASKS)
JOB_STATES = tuple(_STATES)


def job_name(name: str) -> str:
    """``01ABC`` or ``jobs/01ABC`` -> ``jobs/01ABC``."""
    name = name.strip()
    return name if name.startswith("jobs/") else f"jobs/{name}"


def artifact_name(name: str) -> str:
    """``artifacts/...``, ``/artifacts/...`` (an artifact URL's path) or a bare path."""
    name = name.strip().lstrip("/")
    return name if name.startswith("artifacts/") else f"artifacts/{name}"


def task_value(task: str | int | None) -> common_pb2.Task.ValueType:
    """``upscale``, ``ImageUpscale``, ``TASK_IMAGE_UPSCALE`` or the enum number."""
    if task is None or task == "":
        return common_pb2.TASK_UNSPECIFIED
    if isinstance(task, int):
        return common_pb2.Task.ValueType(task)
    key = task.replace("_", "").replace("-", "").lower().removeprefix("task")
    if key not in _TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(_TASKS)})")
    return _TASKS[key]


def state_value(state: str | int) -> job_pb2.Job.State.ValueType:
    """``queued``, ``STATE_QUEUED`` or the enum number."""
    if isinstance(state, int):
        return job_pb2.Job.State.ValueType(state)
    key = state.strip().lower().removeprefix("state_")
    if key not in _STATES:
        raise ValueError(f"unknown job state {state!r} (known: {', '.join(_STATES)})")
    return _STATES[key]


def _optional(**values: Any) -> dict[str, Any]:
    """Only the optional fields that were given (proto3 ``optional``: unset means default)."""
    return {key: value for key, value in values.items() if value is not None}


class _Upload(abc.ABC):
    """A call that uploads (a client stream): the first message carries :meth:`params`, the
    next ones the chunks of :meth:`inputs`. A subclass names its ``RPC`` and ``MESSAGE``."""

    __slots__ = ()
    RPC: ClassVar[str]
    """The method that runs the request (on GenerationService, TransformService or
    WorkflowService)."""
    MESSAGE: ClassVar[Callable[..., Any]]
    """The RPC's request message type."""
    image: Input

    @abc.abstractmethod
    def params(self) -> Any:
        """The first message's ``params``: each request type builds its own."""

    def inputs(self) -> Sequence[tuple[str, Input]]:
        """``(field, input)`` of each file to upload, in order."""
        return [("image", self.image)]

    def first_message(self) -> Any:
        return self.MESSAGE(params=self.params())

    def chunk_message(self, field: str, data: bytes | memoryview, file_name: str = "") -> bytes:
        """A message carrying one chunk of input ``field``, in wire form."""
        return chunk_message(self.MESSAGE, field, data, file_name)


# ---- generative calls (GenerationService): a job, streamed as events ------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class JobOptions(_Upload):
    """What every generative call takes: ``ref_id`` (idempotent per API key), ``tag``,
    ``reply_to`` (a URL that receives the final job), ``wait`` (False: the stream ends once
    the job is accepted), ``result_only`` (wait, but stream only the outputs and the final
    job: no accepted, progress or text events, which saves both ends work per event) and the
    call's ``timeout``."""

    ref_id: str = ""
    tag: str = ""
    reply_to: str = ""
    wait: bool = True
    result_only: bool = False
    timeout: float | None = None

    def __post_init__(self) -> None:
        if self.result_only and not self.wait:
            raise ValueError("result_only waits for the result: it cannot go with wait=False")

    def _job_options(self, references_only: bool = False) -> common_pb2.JobOptions:
        if self.result_only:
            mode = common_pb2.RESPONSE_MODE_RESULT
        elif self.wait:
            mode = common_pb2.RESPONSE_MODE_SYNC
        else:
            mode = common_pb2.RESPONSE_MODE_ASYNC
        return common_pb2.JobOptions(
            ref_id=self.ref_id,
            tag=self.tag,
            reply_to=self.reply_to,
            mode=mode,
            delivery=(
                common_pb2.OUTPUT_DELIVERY_REFERENCES
                if references_only
                else common_pb2.OUTPUT_DELIVERY_BYTES
            ),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class _ImageJob(JobOptions):
    references_only: bool = False
    """Outputs as artifact references only, without their bytes in the stream."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Sampling(_ImageJob):
    prompt: str
    negative_prompt: str | None = None
    model: str = ""
    denoise: float | None = None
    batch_size: int | None = None
    seed: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str = ""
    scheduler: str = ""

    def _sampling(self) -> dict[str, Any]:
        return {
            "positive_prompt": self.prompt,
            "model": self.model,
            "sampler": self.sampler,
            "scheduler": self.scheduler,
            "options": self._job_options(self.references_only),
            **_optional(
                negative_prompt=self.negative_prompt,
                denoise=self.denoise,
                batch_size=self.batch_size,
                seed=self.seed,
                steps=self.steps,
                cfg_scale=self.cfg_scale,
            ),
        }


@dataclass(frozen=True, slots=True)
class ImageToImage(_Sampling):
    """A new image from ``image`` and ``prompt`` (ImageToImage)."""

    image: Input

    RPC: ClassVar[str] = "ImageToImage"
    MESSAGE = generation_service_pb2.ImageToImageRequest

    def params(self) -> tasks_pb2.ImageToImageParams:
        return tasks_pb2.ImageToImageParams(**self._sampling())


@dataclass(frozen=True, slots=True)
class ImageWithMask(_Sampling):
    """Inpainting: ``prompt`` applies inside ``mask`` (``mask_channel``: red, green, blue or
    alpha) only (ImageWithMask)."""

    image: Input
    mask: Input
    _: KW_ONLY
    mask_channel: str = "red"

    RPC: ClassVar[str] = "ImageWithMask"
    MESSAGE = generation_service_pb2.ImageWithMaskRequest

    def __post_init__(self) -> None:
        JobOptions.__post_init__(self)
        if self.mask_channel not in _MASK_CHANNELS:
            raise ValueError(f"mask_channel must be one of {', '.join(_MASK_CHANNELS)}")

    def params(self) -> tasks_pb2.ImageWithMaskParams:
        return tasks_pb2.ImageWithMaskParams(
            mask_channel=_MASK_CHANNELS[self.mask_channel], **self._sampling()
        )

    def inputs(self) -> Sequence[tuple[str, Input]]:
        return [("image", self.image), ("mask", self.mask)]


@dataclass(frozen=True, slots=True)
class ImageUpscale(_ImageJob):
    """A 2x upscale of ``image`` (ImageUpscale)."""

    image: Input
    _: KW_ONLY
    model: str = ""
    seed: int | None = None

    RPC: ClassVar[str] = "ImageUpscale"
    MESSAGE = generation_service_pb2.ImageUpscaleRequest

    def params(self) -> tasks_pb2.ImageUpscaleParams:
        return tasks_pb2.ImageUpscaleParams(
            model=self.model,
            options=self._job_options(self.references_only),
            **_optional(seed=self.seed),
        )


@dataclass(frozen=True, slots=True)
class ImageToText(JobOptions):
    """A caption of ``image`` (ImageToText); ``prompt`` is the model's task, e.g.
    ``detailed_caption``."""

    image: Input
    _: KW_ONLY
    model: str = ""
    prompt: str = ""

    RPC: ClassVar[str] = "ImageToText"
    MESSAGE = generation_service_pb2.ImageToTextRequest

    def params(self) -> tasks_pb2.ImageToTextParams:
        return tasks_pb2.ImageToTextParams(
            model=self.model, prompt=self.prompt, options=self._job_options()
        )


@dataclass(frozen=True, slots=True)
class RunWorkflow(JobOptions):
    """Run workflow ``workflow`` (``aiserver workflows`` lists them) with ``params`` (JSON
    values, checked by the server against the workflow's parameters) and ``files`` (input
    name -> path, bytes or binary file), optionally storing outputs as ``output_format``."""

    workflow: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    files: Mapping[str, Input] = field(default_factory=dict)
    _: KW_ONLY
    output_format: str | int | None = None
    quality: int | None = None
    references_only: bool = False

    RPC: ClassVar[str] = "RunWorkflow"
    MESSAGE = workflow_service_pb2.RunWorkflowRequest

    def params(self) -> workflow_service_pb2.RunWorkflowParams:
        options = self._job_options(self.references_only)
        if self.output_format is not None:
            options.output_format = image_format(self.output_format)
        if self.quality is not None:
            options.quality = self.quality
        message = workflow_service_pb2.RunWorkflowParams(
            workflow=self.workflow.removeprefix("workflows/"), options=options
        )
        message.parameters.update(dict(self.parameters))
        return message

    def inputs(self) -> Sequence[tuple[str, Input]]:
        return list(self.files.items())


GenerativeRequest: TypeAlias = (
    ImageToImage | ImageWithMask | ImageUpscale | ImageToText | RunWorkflow
)


# ---- light calls (TransformService, ArtifactService.GetVariant): info, then the bytes -------


@dataclass(frozen=True, slots=True)
class CropImage(_Upload):
    """``image`` cropped to a rectangle, in ``format`` (default: the input's). With ``out``
    the bytes are written there as they arrive and ``result.data`` is None (CropImage)."""

    image: Input
    _: KW_ONLY
    x: int
    y: int
    width: int
    height: int
    format: str | int | None = None
    quality: int | None = None
    out: Destination | None = None
    timeout: float | None = None

    RPC: ClassVar[str] = "CropImage"
    MESSAGE = transform_service_pb2.CropImageRequest

    def params(self) -> tasks_pb2.CropImageParams:
        return tasks_pb2.CropImageParams(
            x=self.x,
            y=self.y,
            width=self.width,
            height=self.height,
            output_format=image_format(self.format),
            **_optional(quality=self.quality),
        )


@dataclass(frozen=True, slots=True)
class ConvertImage(_Upload):
    """``image`` in another ``format`` (``webp``, ``png``, ``jpg``...). With ``out`` the
    bytes are written there as they arrive and ``result.data`` is None (ConvertImage)."""

    image: Input
    _: KW_ONLY
    format: str | int
    quality: int | None = None
    out: Destination | None = None
    timeout: float | None = None

    RPC: ClassVar[str] = "ConvertImage"
    MESSAGE = transform_service_pb2.ConvertImageRequest

    def params(self) -> tasks_pb2.ConvertImageParams:
        return tasks_pb2.ConvertImageParams(
            output_format=image_format(self.format), **_optional(quality=self.quality)
        )


TransformRequest: TypeAlias = CropImage | ConvertImage


@dataclass(frozen=True, slots=True)
class GetVariant:
    """A resized / re-encoded copy of an artifact: ``spec`` (``width=256,format=jpg``), the
    separate fields, or a ``preset``. With ``out`` the bytes are written there (GetVariant)."""

    artifact: str
    _: KW_ONLY
    spec: str = ""
    width: int = 0
    height: int = 0
    fit: str = ""
    format: str | int | None = None
    quality: int | None = None
    preset: str = ""
    out: Destination | None = None
    timeout: float | None = None

    def __post_init__(self) -> None:
        if self.fit not in _FITS:
            raise ValueError(f"fit must be one of {', '.join(VARIANT_FITS)}")

    def message(self) -> artifact_service_pb2.GetVariantRequest:
        return artifact_service_pb2.GetVariantRequest(
            name=artifact_name(self.artifact),
            spec=self.spec,
            width=self.width,
            height=self.height,
            fit=_FITS[self.fit],
            format=image_format(self.format),
            preset=self.preset,
            **_optional(quality=self.quality),
        )


# ---- jobs ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ListJobs:
    """Jobs, newest first. ``states``: ``queued``, ``running``, ``succeeded``, ``failed``,
    ``cancelled``; ``task``: ``ImageToImage``, ``upscale``...; ``all_owners``: every API
    key's jobs (admin keys)."""

    states: Sequence[str | int] = ()
    task: str | int | None = None
    tag: str = ""
    ref_id: str = ""
    page_size: int = 0
    page_token: str = ""
    all_owners: bool = False
    timeout: float | None = None

    def message(self, page_token: str | None = None) -> job_service_pb2.ListJobsRequest:
        return job_service_pb2.ListJobsRequest(
            page_size=self.page_size,
            page_token=self.page_token if page_token is None else page_token,
            states=[state_value(s) for s in self.states],
            task=task_value(self.task),
            tag=self.tag,
            ref_id=self.ref_id,
            all_owners=self.all_owners,
        )
