"""The generative tasks' parameters, as the domain sees them, and their validation.

Servicers build these from protobuf; providers (ComfyUI workflows, the local engine) read them.
Field names here are the names workflow bindings refer to.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, fields
from typing import Any

from aiserver.errors import ErrorKind, FieldViolation, ServiceError

__all__ = [
    "BUILT_IN_TASKS",
    "DEFAULT_NEGATIVE_PROMPT",
    "ImageToImageSpec",
    "ImageToTextSpec",
    "ImageUpscaleSpec",
    "ImageWithMaskSpec",
    "TaskKind",
    "TaskSpec",
    "WorkflowSpec",
    "spec_from_dict",
    "spec_to_dict",
]

DEFAULT_NEGATIVE_PROMPT = "low quality, blurry, noisy, compression artifacts"
MAX_SEED = 2**63 - 1


class TaskKind(enum.Enum):
    """A task that runs as a job; the value is AI Server's task name."""

    IMAGE_TO_IMAGE = "ImageToImage"
    IMAGE_WITH_MASK = "ImageWithMask"
    IMAGE_UPSCALE = "ImageUpscale"
    IMAGE_TO_TEXT = "ImageToText"
    WORKFLOW = "Workflow"
    """A named workflow from the workflows folder; its binding says what it takes."""

    @property
    def inputs(self) -> tuple[str, ...]:
        """The upload fields this task always needs (a workflow's depend on its binding)."""
        if self is TaskKind.WORKFLOW:
            return ()
        return ("image", "mask") if self is TaskKind.IMAGE_WITH_MASK else ("image",)


BUILT_IN_TASKS = (
    TaskKind.IMAGE_TO_IMAGE,
    TaskKind.IMAGE_WITH_MASK,
    TaskKind.IMAGE_UPSCALE,
    TaskKind.IMAGE_TO_TEXT,
)
"""The tasks with their own typed RPCs (each a thin wrapper over its bound workflow)."""


@dataclass(frozen=True, slots=True)
class _Sampling:
    """What the two diffusion tasks share. Unset values are filled by ``resolved``."""

    positive_prompt: str
    negative_prompt: str | None = None
    model: str = ""
    denoise: float | None = None
    batch_size: int | None = None
    seed: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str = ""
    scheduler: str = ""
    output_format: str = ""
    """Stored outputs' format (``webp``...); empty: as ComfyUI saves them (PNG)."""
    output_quality: int | None = None
    workflow_documents: dict[str, Any] = field(default_factory=dict, repr=False)
    """The task's bound workflow (graph and binding) as accepted: a job keeps that version."""

    def _violations(self, max_prompt_chars: int, max_batch: int) -> list[FieldViolation]:
        bad: list[FieldViolation] = []
        if not self.positive_prompt.strip():
            bad.append(FieldViolation("params.positive_prompt", "must not be blank"))
        for name in ("positive_prompt", "negative_prompt"):
            text = getattr(self, name)
            if text is not None and len(text) > max_prompt_chars:
                bad.append(
                    FieldViolation(f"params.{name}", f"longer than {max_prompt_chars} characters")
                )
            if text is not None and "\x00" in text:
                bad.append(FieldViolation(f"params.{name}", "contains a NUL character"))
        _check_range(bad, "denoise", self.denoise, 0.0, 1.0, low_open=True)
        _check_range(bad, "batch_size", self.batch_size, 1, max_batch)
        _check_range(bad, "seed", self.seed, 0, MAX_SEED)
        _check_range(bad, "steps", self.steps, 1, 150)
        _check_range(bad, "cfg_scale", self.cfg_scale, 0.0, 30.0)
        for name in ("model", "sampler", "scheduler"):
            _check_name(bad, name, getattr(self, name))
        return bad


@dataclass(frozen=True, slots=True)
class ImageToImageSpec(_Sampling):
    """ImageToImage: a new image from an image and a prompt."""

    kind = TaskKind.IMAGE_TO_IMAGE

    def validate(self, *, max_prompt_chars: int, max_batch: int) -> None:
        _raise_if(self._violations(max_prompt_chars, max_batch))


@dataclass(frozen=True, slots=True)
class ImageWithMaskSpec(_Sampling):
    """ImageWithMask: inpainting inside the mask's chosen channel."""

    mask_channel: str = "red"

    kind = TaskKind.IMAGE_WITH_MASK

    def validate(self, *, max_prompt_chars: int, max_batch: int) -> None:
        bad = self._violations(max_prompt_chars, max_batch)
        if self.mask_channel not in ("red", "green", "blue", "alpha"):
            bad.append(FieldViolation("params.mask_channel", "must be red, green, blue or alpha"))
        _raise_if(bad)


@dataclass(frozen=True, slots=True)
class ImageUpscaleSpec:
    """ImageUpscale: exactly 2x width and height."""

    model: str = ""
    seed: int | None = None
    output_format: str = ""
    output_quality: int | None = None
    workflow_documents: dict[str, Any] = field(default_factory=dict, repr=False)

    kind = TaskKind.IMAGE_UPSCALE

    def validate(self, *, max_prompt_chars: int, max_batch: int) -> None:
        bad: list[FieldViolation] = []
        _check_name(bad, "model", self.model)
        _check_range(bad, "seed", self.seed, 0, MAX_SEED)
        _raise_if(bad)


@dataclass(frozen=True, slots=True)
class ImageToTextSpec:
    """ImageToText: a caption (Florence-2 by default)."""

    model: str = ""
    prompt: str = ""
    workflow_documents: dict[str, Any] = field(default_factory=dict, repr=False)

    kind = TaskKind.IMAGE_TO_TEXT

    def validate(self, *, max_prompt_chars: int, max_batch: int) -> None:
        bad: list[FieldViolation] = []
        _check_name(bad, "model", self.model)
        if len(self.prompt) > max_prompt_chars:
            bad.append(
                FieldViolation("params.prompt", f"longer than {max_prompt_chars} characters")
            )
        _raise_if(bad)


@dataclass(frozen=True, slots=True)
class WorkflowSpec:
    """A run of a named workflow: its parameters, already checked against its binding.

    ``documents`` holds the binding and graph the run was accepted with (``{"binding": ...,
    "graph": ...}``), so a job keeps its version when the files change or the server restarts.
    """

    workflow: str = ""
    version: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    documents: dict[str, Any] = field(default_factory=dict)
    output_format: str = ""
    output_quality: int | None = None

    kind = TaskKind.WORKFLOW

    def validate(self, *, max_prompt_chars: int, max_batch: int) -> None:
        """Parameters are checked against the binding when the run is accepted."""


TaskSpec = ImageToImageSpec | ImageWithMaskSpec | ImageUpscaleSpec | ImageToTextSpec | WorkflowSpec

_SPEC_TYPES: dict[TaskKind, type[TaskSpec]] = {
    TaskKind.IMAGE_TO_IMAGE: ImageToImageSpec,
    TaskKind.IMAGE_WITH_MASK: ImageWithMaskSpec,
    TaskKind.IMAGE_UPSCALE: ImageUpscaleSpec,
    TaskKind.IMAGE_TO_TEXT: ImageToTextSpec,
    TaskKind.WORKFLOW: WorkflowSpec,
}


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def spec_to_dict(spec: TaskSpec) -> dict[str, Any]:
    """A JSON-ready dict of the spec (what the job store keeps).

    Shallow: nested values (a workflow's graph and binding, a run's parameters) are the
    spec's own JSON documents, shared and not to be changed. ``dataclasses.asdict`` copied
    them deeply on every save and every Job message: more CPU than the rest of a save."""
    names = _FIELD_NAMES.get(type(spec))
    if names is None:
        names = _FIELD_NAMES[type(spec)] = tuple(f.name for f in fields(spec))
    return {name: getattr(spec, name) for name in names}


def spec_from_dict(kind: TaskKind, data: dict[str, Any]) -> TaskSpec:
    """The inverse of :func:`spec_to_dict`; unknown keys (from newer versions) are dropped."""
    cls = _SPEC_TYPES[kind]
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


def _check_range(
    bad: list[FieldViolation],
    name: str,
    value: float | None,
    low: float,
    high: float,
    *,
    low_open: bool = False,
) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        bad.append(FieldViolation(f"params.{name}", "must be a finite number"))
    elif value < low or value > high or (low_open and value == low):
        low_bracket = "(" if low_open else "["
        bad.append(FieldViolation(f"params.{name}", f"must be in {low_bracket}{low}, {high}]"))


def _check_name(bad: list[FieldViolation], name: str, value: str) -> None:
    # Names end up as ComfyUI combo values and file names: no control characters, bounded.
    if len(value) > 256 or any(ord(c) < 32 for c in value):
        bad.append(FieldViolation(f"params.{name}", "must be at most 256 printable characters"))


def _raise_if(bad: list[FieldViolation]) -> None:
    if bad:
        summary = "; ".join(f"{v.field} {v.description}" for v in bad)
        raise ServiceError(
            ErrorKind.INVALID_ARGUMENT,
            "INVALID_PARAMETERS",
            f"invalid parameters: {summary}",
            violations=tuple(bad),
            metadata={"fields": ",".join(v.field for v in bad)},
        )
