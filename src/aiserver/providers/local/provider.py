"""The ``local`` provider: ImageUpscale in this process, on the CPU."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path, PurePath

from aiserver.errors import ErrorKind, FieldViolation, ServiceError
from aiserver.imaging import DEFAULT_LIMITS, ImageLimits
from aiserver.providers.base import (
    Cause,
    GeneratedImage,
    ProviderProgress,
    ProviderUnavailable,
    RunSink,
    WorkItem,
)
from aiserver.providers.local.models import ModelError, ModelInfo, ModelPool, find_model
from aiserver.providers.local.settings import LocalUpscaleSettings
from aiserver.providers.local.upscale import (
    SCALE,
    U8,
    Source,
    TiledPass,
    alpha_from_pass,
    alpha_pass,
    assemble,
    decode,
    encode_png,
    plan_tiles,
    resize_alpha,
)
from aiserver.stages import Stage
from aiserver.tasks import ImageUpscaleSpec, TaskKind, TaskSpec
from aiserver.workers import BlockingPool

__all__ = ["LocalUpscaleProvider"]

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class LocalUpscaleProvider:
    """Runs ImageUpscale with a bundled Real-ESRGAN model through ncnn on the CPU.

    Models load lazily, once, on first use (or in :meth:`warm_up`). At most
    ``settings.max_concurrent_jobs`` jobs upscale at once; more wait inside :meth:`run`.
    Cancellation takes effect between tiles: ``run`` raises at once and the tile already
    running finishes in the background, still counted against the thread bound.

    ncnn releases the GIL while a tile computes, so the event loop keeps running; its model
    loader does not: the first use of a model stalls the loop once (about 0.2 s for the
    default model, 0.5 s or more for the 4x ones). Call :meth:`warm_up` at start-up.
    """

    def __init__(
        self,
        settings: LocalUpscaleSettings | None = None,
        *,
        limits: ImageLimits = DEFAULT_LIMITS,
        name: str = "local",
    ) -> None:
        self._settings = settings or LocalUpscaleSettings()
        self._limits = limits
        self._name = name
        self._models = ModelPool(self._settings.threads)
        self._pool = BlockingPool(self._settings.max_concurrent_jobs, name="local-upscale")
        self._slots = asyncio.Semaphore(self._settings.max_concurrent_jobs)
        self._jobs = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def settings(self) -> LocalUpscaleSettings:
        return self._settings

    def supports(self, task: TaskKind) -> bool:
        """Whether this provider is configured for ``task`` at all (health aside)."""
        return self._settings.enabled and task is TaskKind.IMAGE_UPSCALE

    def model_for(self, requested: str) -> ModelInfo | None:
        """The model a request's ``model`` selects: the default when empty, None if unknown."""
        return find_model(requested or self._settings.model)

    def overlap_for(self, model: ModelInfo) -> int:
        overlap = self._settings.tile_overlap
        return model.context if overlap is None else overlap

    def can_run(self, task: TaskKind, spec: TaskSpec) -> bool:
        if not self.supports(task) or not isinstance(spec, ImageUpscaleSpec):
            return False
        model = self.model_for(spec.model)
        return model is not None and self._models.usable(model)

    def unavailable_reason(self, task: TaskKind, spec: TaskSpec) -> str:
        if self.can_run(task, spec) or not self.supports(task):
            return ""
        requested = spec.model if isinstance(spec, ImageUpscaleSpec) else ""
        model = self.model_for(requested)
        if model is None:
            return f"the {self._name} upscaler has no model {requested!r}"
        return f"the {self._name} upscaler cannot load {model.name}"

    def load(self) -> int:
        return self._jobs

    def capacity(self) -> int:
        return self._settings.max_concurrent_jobs

    def refusal(self, task: TaskKind, spec: TaskSpec) -> ServiceError | None:
        """A model it does not have is a "no" for good: waiting never brings one. (Whether a
        ComfyUI agent has it is the pool's say; the scheduler fails a job only when every
        provider refuses it, with the first refusal, which is the pool's when agents exist.)"""
        if not self.supports(task) or not isinstance(spec, ImageUpscaleSpec):
            return None
        model = self.model_for(spec.model)
        if model is None:
            return _unknown_model(spec.model)
        if not self._models.usable(model):  # failed to load, or its files or ncnn are missing
            return ServiceError(
                ErrorKind.FAILED_PRECONDITION,
                "LOCAL_MODEL_UNAVAILABLE",
                f"the {self._name} upscaler cannot load {model.name}",
                metadata={"model": model.name},
            )
        return None

    async def withdraw(self, resume: Mapping[str, str]) -> None:
        """Runs in this process: nothing outlives it to withdraw."""
        return None

    async def start(self) -> None:
        if self._settings.enabled:
            await self.warm_up()

    async def warm_up(self) -> bool:
        """Load the default model now, in a worker thread (though holding the GIL, see the
        class doc); False if it cannot be loaded."""
        model = self.model_for("")
        if model is None or not self._settings.enabled:
            return False
        try:
            await self._pool.run(self._models.get, model)
        except ModelError:
            logger.exception("local upscaler: cannot load %s", model.name)
            return False
        return True

    async def close(self) -> None:
        self._pool.close()

    async def run(self, work: WorkItem, sink: RunSink) -> None:
        spec = work.spec
        if work.task is not TaskKind.IMAGE_UPSCALE or not isinstance(spec, ImageUpscaleSpec):
            raise ServiceError(
                ErrorKind.FAILED_PRECONDITION,
                "TASK_NOT_SUPPORTED",
                f"the {self._name} provider runs ImageUpscale only, not {work.task.value}",
            )
        model = self.model_for(spec.model)
        if model is None:
            raise _unknown_model(spec.model)
        image = work.inputs.get("image")
        if image is None:
            raise ServiceError(
                ErrorKind.INVALID_ARGUMENT,
                "INPUT_REQUIRED",
                "ImageUpscale needs 'image'",
                violations=(FieldViolation("image", "required"),),
                metadata={"field": "image"},
            )
        self._jobs += 1
        try:
            async with self._slots:
                source = image.path if image.data is None else image.data
                await self._upscale(work, model, source, image.file_name, sink)
        finally:
            self._jobs -= 1

    async def _upscale(
        self, work: WorkItem, model: ModelInfo, path: Path | bytes, file_name: str, sink: RunSink
    ) -> None:
        settings = self._settings
        overlap = self.overlap_for(model)
        started = time.monotonic()
        try:
            net = await self._pool.run(self._models.get, model)
        except ModelError as exc:
            raise ProviderUnavailable(
                f"cannot load {model.name}: {exc}", cause=Cause.MODEL_LOAD
            ) from exc
        source = await self._pool.run(
            decode, path, self._limits, "image", settings.max_input_pixels
        )
        colour = await self._pool.run(
            TiledPass,
            net,
            source.rgb,
            plan_tiles(source.width, source.height, settings.tile_size),
            overlap,
        )
        extra: TiledPass | None = None
        if settings.alpha == "model":
            extra = await self._pool.run(alpha_pass, net, source, settings.tile_size, overlap)
        passes = [colour] if extra is None else [colour, extra]
        total = sum(len(p.tiles) for p in passes)
        step = 0
        logger.debug(
            "job %s: %s on %dx%d in %d tiles",
            work.job_id,
            model.name,
            source.width,
            source.height,
            total,
        )
        for tiled in passes:
            for index in range(len(tiled.tiles)):
                await self._pool.run(tiled.run, index)
                step += 1
                await sink.progress(
                    ProviderProgress(
                        stage=Stage.RUNNING,
                        fraction=step / total,
                        node="tile",
                        node_type="RealESRGAN",
                        step=step,
                        max_steps=total,
                    )
                )
        data = await self._pool.run(_finish, source, colour, extra, settings.png_compress_level)
        elapsed = time.monotonic() - started
        logger.info(
            "job %s: %s upscaled %dx%d in %.2f s (%.1f s per input megapixel)",
            work.job_id,
            model.name,
            source.width,
            source.height,
            elapsed,
            elapsed / (source.width * source.height / 1e6),
        )
        await sink.image(
            GeneratedImage(
                data=data,
                file_name=_output_name(file_name, model),
                mime_type="image/png",
                width=source.width * SCALE,
                height=source.height * SCALE,
                seed=None,
            )
        )


def _finish(source: Source, colour: TiledPass, extra: TiledPass | None, level: int) -> bytes:
    alpha: U8 | None
    if extra is not None:
        alpha = alpha_from_pass(extra)
    else:
        alpha = None if source.alpha is None else resize_alpha(source.alpha)
    return encode_png(assemble(source, colour.out, alpha), source.icc, level)


def _output_name(input_name: str, model: ModelInfo) -> str:
    """``{input stem}-2x-local-{model}.png``, with only safe characters."""
    stem = _UNSAFE.sub("_", PurePath(input_name.replace("\\", "/")).stem).strip("._-")
    return f"{stem[:80] or 'image'}-{SCALE}x-local-{model.name}.png"


def _unknown_model(name: str) -> ServiceError:
    message = f"the local upscaler has no model {name!r}"
    return ServiceError(
        ErrorKind.INVALID_ARGUMENT,
        "UNKNOWN_MODEL",
        message,
        violations=(FieldViolation("params.model", message),),
        metadata={"field": "params.model", "model": name},
    )
