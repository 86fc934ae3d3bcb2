"""GenerationService: upload -> job -> the job's events, streamed back."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from imagetasks.v1 import generation_service_pb2 as gpb
from imagetasks.v1 import generation_service_pb2_grpc

from aiserver.api.convert import spec_from_proto
from aiserver.api.job_calls import EventCarrier, JobCalls, SubmitLimits
from aiserver.api.status import rpc
from aiserver.api.uploads import read_upload
from aiserver.providers.comfy.workflows import WorkflowCatalog
from aiserver.spool import UploadBudget
from aiserver.tasks import TaskKind, WorkflowSpec

__all__ = ["GenerationServicer", "SubmitLimits"]

_C = TypeVar("_C", bound=EventCarrier)


class GenerationServicer(generation_service_pb2_grpc.GenerationServiceServicer):
    def __init__(self, calls: JobCalls, catalog: WorkflowCatalog | None = None) -> None:
        self._calls = calls
        self._catalog = catalog

    @rpc
    async def ImageToImage(
        self, request_iterator: AsyncIterator[gpb.ImageToImageRequest], context: Any
    ) -> AsyncIterator[gpb.ImageToImageResponse]:
        async for response in self._run(
            TaskKind.IMAGE_TO_IMAGE, request_iterator, context, gpb.ImageToImageResponse
        ):
            yield response

    @rpc
    async def ImageWithMask(
        self, request_iterator: AsyncIterator[gpb.ImageWithMaskRequest], context: Any
    ) -> AsyncIterator[gpb.ImageWithMaskResponse]:
        async for response in self._run(
            TaskKind.IMAGE_WITH_MASK, request_iterator, context, gpb.ImageWithMaskResponse
        ):
            yield response

    @rpc
    async def ImageUpscale(
        self, request_iterator: AsyncIterator[gpb.ImageUpscaleRequest], context: Any
    ) -> AsyncIterator[gpb.ImageUpscaleResponse]:
        async for response in self._run(
            TaskKind.IMAGE_UPSCALE, request_iterator, context, gpb.ImageUpscaleResponse
        ):
            yield response

    @rpc
    async def ImageToText(
        self, request_iterator: AsyncIterator[gpb.ImageToTextRequest], context: Any
    ) -> AsyncIterator[gpb.ImageToTextResponse]:
        async for response in self._run(
            TaskKind.IMAGE_TO_TEXT, request_iterator, context, gpb.ImageToTextResponse
        ):
            yield response

    async def _run(
        self,
        task: TaskKind,
        requests: AsyncIterator[Any],
        context: Any,
        carrier: Callable[[], _C],
    ) -> AsyncIterator[_C]:
        lim = self._calls.limits
        upload = await read_upload(
            requests,
            spool=self._calls.spool,
            budget=UploadBudget(lim.max_upload_bytes),
            inputs=task.inputs,
        )
        try:
            spec = spec_from_proto(task, upload.params)
            spec.validate(max_prompt_chars=lim.max_prompt_chars, max_batch=lim.max_batch_size)
            # A thin typed wrapper over the task's bound workflow: the job is pinned to the
            # version accepted now, as RunWorkflow's jobs are.
            workflow = self._catalog.find(task) if self._catalog is not None else None
            if workflow is not None and not isinstance(spec, WorkflowSpec):
                spec = dataclasses.replace(spec, workflow_documents=workflow.documents)
        except BaseException:
            upload.discard()
            raise
        async for response in self._calls.run(
            task, spec, upload.params.options, upload, context, carrier
        ):
            yield response
