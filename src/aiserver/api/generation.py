"""GenerationService: upload -> job -> the job's events, streamed back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from imagetasks.v1 import common_pb2, generation_service_pb2_grpc, job_pb2
from imagetasks.v1 import generation_service_pb2 as gpb

from aiserver.api import calls
from aiserver.api.convert import Link, event_to_proto, spec_from_proto
from aiserver.api.status import rpc
from aiserver.api.uploads import Upload, read_upload
from aiserver.artifacts.store import ArtifactStore
from aiserver.errors import invalid_argument
from aiserver.imaging import ImageLimits, verify
from aiserver.jobs.manager import JobManager
from aiserver.jobs.model import Accepted, InputRef, OutputStored
from aiserver.logs import job_id_var
from aiserver.spool import InputSpool, UploadBudget
from aiserver.tasks import TaskKind
from aiserver.webhooks import RefusedTarget, TargetGuard, validate_reply_to
from aiserver.workers import BlockingPool

__all__ = ["GenerationServicer", "SubmitLimits"]

logger = logging.getLogger(__name__)

_REPLY_TO = "params.options.reply_to"


@dataclass(frozen=True, slots=True)
class SubmitLimits:
    max_upload_bytes: int
    max_prompt_chars: int
    max_batch_size: int
    chunk_bytes: int
    image: ImageLimits


class GenerationServicer(generation_service_pb2_grpc.GenerationServiceServicer):
    def __init__(
        self,
        *,
        manager: JobManager,
        artifacts: ArtifactStore,
        spool: InputSpool,
        pool: BlockingPool,
        limits: SubmitLimits,
        link: Link = lambda url: url,
        reply_to_guard: TargetGuard | None = None,
    ) -> None:
        self._manager = manager
        self._reply_to_guard = reply_to_guard
        self._artifacts = artifacts
        self._spool = spool
        self._pool = pool
        self._limits = limits
        self._link = link

    @rpc
    async def ImageToImage(
        self, request_iterator: AsyncIterator[gpb.ImageToImageRequest], context: Any
    ) -> AsyncIterator[gpb.ImageToImageResponse]:
        async for event in self._run(TaskKind.IMAGE_TO_IMAGE, request_iterator, context):
            yield gpb.ImageToImageResponse(event=event)

    @rpc
    async def ImageWithMask(
        self, request_iterator: AsyncIterator[gpb.ImageWithMaskRequest], context: Any
    ) -> AsyncIterator[gpb.ImageWithMaskResponse]:
        async for event in self._run(TaskKind.IMAGE_WITH_MASK, request_iterator, context):
            yield gpb.ImageWithMaskResponse(event=event)

    @rpc
    async def ImageUpscale(
        self, request_iterator: AsyncIterator[gpb.ImageUpscaleRequest], context: Any
    ) -> AsyncIterator[gpb.ImageUpscaleResponse]:
        async for event in self._run(TaskKind.IMAGE_UPSCALE, request_iterator, context):
            yield gpb.ImageUpscaleResponse(event=event)

    @rpc
    async def ImageToText(
        self, request_iterator: AsyncIterator[gpb.ImageToTextRequest], context: Any
    ) -> AsyncIterator[gpb.ImageToTextResponse]:
        async for event in self._run(TaskKind.IMAGE_TO_TEXT, request_iterator, context):
            yield gpb.ImageToTextResponse(event=event)

    async def _run(
        self, task: TaskKind, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[job_pb2.JobEvent]:
        lim = self._limits
        upload = await read_upload(
            requests,
            spool=self._spool,
            budget=UploadBudget(lim.max_upload_bytes),
            inputs=task.inputs,
        )
        try:
            spec = spec_from_proto(task, upload.params)
            spec.validate(max_prompt_chars=lim.max_prompt_chars, max_batch=lim.max_batch_size)
            options = upload.params.options
            _check_options(options)
            await self._screen_reply_to(options.reply_to)
            inputs = await self._inputs(upload)
        except BaseException:
            upload.discard()
            raise
        committed = [self._spool.commit(f) for f in upload.files.values()]
        try:
            job, existing = await self._manager.submit(
                owner=calls.owner(),
                task=task,
                spec=spec,
                inputs=inputs,
                ref_id=options.ref_id,
                tag=options.tag,
                reply_to=options.reply_to,
            )
        except BaseException:
            for spooled in committed:
                self._spool.unpin(spooled)
            self._manager.discard_inputs({f.sha256 for f in committed})
            raise
        for spooled in committed:
            self._spool.unpin(spooled)
        if existing:  # the ref id named an earlier job: these bytes belong to no job
            self._manager.discard_inputs(
                {f.sha256 for f in committed} - {i.sha256 for i in job.inputs}
            )
        job_id_var.set(job.id)
        sync = options.mode != common_pb2.RESPONSE_MODE_ASYNC
        send_bytes = options.delivery != common_pb2.OUTPUT_DELIVERY_REFERENCES
        try:
            async for event in self._manager.subscribe(job.id):
                kind = event.kind
                if isinstance(kind, Accepted):
                    msg = event_to_proto(event, link=self._link)
                    msg.accepted.existing = existing
                    msg.accepted.queue_position = self._manager.queue_position(job.id)
                    yield msg
                    if not sync:
                        return
                    continue
                yield event_to_proto(event, link=self._link)
                if isinstance(kind, OutputStored) and send_bytes:
                    async for chunk in self._output_chunks(event, kind):
                        yield chunk
        except asyncio.CancelledError:
            # The caller went away (or its deadline passed): a SYNC job goes with it - unless
            # the server is shutting down: an accepted job outlives the call then, and is
            # finished before exit or resumed at the next start.
            if sync and self._manager.accepting:
                await asyncio.shield(self._cancel_quietly(job.id))
            raise

    async def _screen_reply_to(self, url: str) -> None:
        """Refuse now a ReplyTo that could never be delivered: the caller would not learn."""
        if not url or self._reply_to_guard is None:
            return
        try:
            await self._reply_to_guard.screen(url)
        except RefusedTarget as exc:
            raise invalid_argument(
                _REPLY_TO, "INVALID_REPLY_TO", f"reply_to is refused: {exc.reason}"
            ) from None

    async def _inputs(self, upload: Upload) -> list[InputRef]:
        """Each input checked (decoded once: a damaged file is the caller's error, not a
        failed job); nothing is committed to the spool yet."""
        refs = []
        for name, spooled in upload.files.items():
            info = await self._pool.run(verify, spooled.path, self._limits.image, name)
            refs.append(
                InputRef(
                    field=name,
                    file_name=spooled.file_name,
                    sha256=spooled.sha256,
                    size_bytes=spooled.size,
                    mime_type=info.mime_type,
                    width=info.width,
                    height=info.height,
                )
            )
        return refs

    async def _output_chunks(
        self, event: Any, output: OutputStored
    ) -> AsyncIterator[job_pb2.JobEvent]:
        artifact = output.artifact
        offset = 0
        async for data in self._artifacts.read(
            artifact.name, None, 0, 0, chunk_size=self._limits.chunk_bytes
        ):
            last = offset + len(data) >= artifact.size_bytes
            yield job_pb2.JobEvent(
                job=f"jobs/{event.job_id}",
                sequence=event.sequence,
                output_chunk=job_pb2.OutputChunk(
                    index=output.index, offset=offset, data=data, last=last
                ),
            )
            offset += len(data)

    async def _cancel_quietly(self, job_id: str) -> None:
        try:
            await self._manager.cancel(job_id, None)
        except Exception:
            logger.exception("cancelling job %s after the caller left", job_id)


def _check_options(options: common_pb2.JobOptions) -> None:
    # Lengths and characters of ref_id and tag are the contract's rules (checked on arrival).
    validate_reply_to(options.reply_to, _REPLY_TO)
