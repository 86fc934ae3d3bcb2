"""What every job-making RPC shares: inputs checked, the job submitted, its events streamed.

GenerationService's typed task RPCs and WorkflowService.RunWorkflow both end here, so a
workflow run and a built-in task are the same kind of job with the same events and errors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from imagetasks.v1 import common_pb2, job_pb2
from PIL import ImageFile

from aiserver.api import calls
from aiserver.api.convert import Link, event_to_proto
from aiserver.api.uploads import Upload
from aiserver.artifacts.store import ArtifactStore
from aiserver.errors import invalid_argument
from aiserver.imaging import (
    ImageInfo,
    ImageLimits,
    apply_jpeg_draft,
    open_image_with_info,
    verify,
)
from aiserver.jobs.manager import JobManager
from aiserver.jobs.model import Accepted, Finished, InputRef, OutputStored
from aiserver.logs import job_id_var
from aiserver.spool import KEEP_CONTENT_BYTES, InputSpool, SpooledFile
from aiserver.tasks import TaskKind, TaskSpec
from aiserver.webhooks import RefusedTarget, TargetGuard, validate_reply_to
from aiserver.workers import BlockingPool

__all__ = ["EventCarrier", "JobCalls", "SubmitLimits", "check_options"]

logger = logging.getLogger(__name__)

_REPLY_TO = "params.options.reply_to"


class EventCarrier(Protocol):
    """A response message of a job-making RPC: one ``JobEvent`` in its ``event`` field."""

    @property
    def event(self) -> job_pb2.JobEvent: ...


_C = TypeVar("_C", bound=EventCarrier)


@dataclass(frozen=True, slots=True)
class SubmitLimits:
    max_upload_bytes: int
    max_prompt_chars: int
    max_batch_size: int
    chunk_bytes: int
    image: ImageLimits


class JobCalls:
    """Submits a checked upload as a job and streams the job's events back to the caller."""

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
        self.reply_to_guard = reply_to_guard
        self.manager = manager
        self.artifacts = artifacts
        self.spool = spool
        self.pool = pool
        self.limits = limits
        self.link = link

    async def inputs(self, upload: Upload) -> list[InputRef]:
        """Each input checked (decoded once: a damaged file is the caller's error, not a
        failed job); nothing is committed to the spool yet. A small one (its bytes in
        ``content``, at most :data:`_STORED_INPUT_BYTES`) is marked ``stored`` when the job
        store keeps inputs with their job."""
        refs = []
        keep = self.manager.holds_inputs
        for name, spooled in upload.files.items():
            stored = False
            if spooled.size <= _VERIFY_HERE_BYTES:
                # The bytes the spool kept: no second open and read.
                source = spooled.content if spooled.content is not None else spooled.path
                stored = (
                    keep and spooled.content is not None and spooled.size <= _STORED_INPUT_BYTES
                )
                info = await self._verify_small_file(source, name)
            else:
                info = await self.pool.run(verify, spooled.path, self.limits.image, name)
            refs.append(
                InputRef(
                    field=name,
                    file_name=spooled.file_name,
                    sha256=spooled.sha256,
                    size_bytes=spooled.size,
                    mime_type=info.mime_type,
                    width=info.width,
                    height=info.height,
                    stored=stored,
                )
            )
        return refs

    async def _verify_small_file(self, path: Path | bytes, field: str) -> ImageInfo:
        """:func:`~aiserver.imaging.verify`'s checks for a file of at most
        :data:`_VERIFY_HERE_BYTES`: its header read once, here; the decode here too when the
        header says at most :data:`_VERIFY_HERE_PIXELS`, else in the image pool."""
        with open_image_with_info(path, self.limits.image, field) as (image, info):
            if info.width * info.height <= _VERIFY_HERE_PIXELS:
                _decode_first_frame(image)
            else:
                await self.pool.run(_decode_first_frame, image)
        return info

    async def run(
        self,
        task: TaskKind,
        spec: TaskSpec,
        options: common_pb2.JobOptions,
        upload: Upload,
        context: Any,
        carrier: Callable[[], _C],
    ) -> AsyncIterator[_C]:
        """Submit ``spec`` with the upload's files (discarded on failure) and stream the job,
        each event written straight into a new ``carrier()`` response (no copy)."""
        try:
            check_options(options)
            await self._screen_reply_to(options.reply_to)
            inputs = await self.inputs(upload)
        except BaseException:
            upload.discard()
            raise
        stored = {ref.field for ref in inputs if ref.stored}
        input_bytes = {}
        committed: list[SpooledFile] = []
        try:
            for name, spooled in upload.files.items():
                if name in stored:
                    assert spooled.content is not None
                    input_bytes[spooled.sha256] = spooled.content
                else:
                    committed.append(self.spool.commit(spooled))
                spooled.content = None  # not held while the job runs (the manager may)
        except BaseException:  # a file not written (the disk): no job, nothing kept
            for spooled in committed:
                self.spool.unpin(spooled)
            self.manager.discard_inputs({f.sha256 for f in committed})
            done = {id(f) for f in committed}  # their paths are the spool's now
            rest = {n: f for n, f in upload.files.items() if id(f) not in done}
            Upload(upload.params, rest).discard()
            raise
        try:
            job, existing = await self.manager.submit(
                owner=calls.owner(),
                task=task,
                spec=spec,
                inputs=inputs,
                ref_id=options.ref_id,
                tag=options.tag,
                reply_to=options.reply_to,
                input_bytes=input_bytes,
            )
        except BaseException:
            for spooled in committed:
                self.spool.unpin(spooled)
            self.manager.discard_inputs({f.sha256 for f in committed})
            raise
        # The manager holds its own copy within its budget (or the attempt reads the store):
        # this frame lives as long as the stream, so it must not keep the bytes too.
        input_bytes.clear()
        for spooled in committed:
            self.spool.unpin(spooled)
        if existing:  # the ref id named an earlier job: these bytes belong to no job
            self.manager.discard_inputs(
                {f.sha256 for f in committed} - {i.sha256 for i in job.inputs}
            )
        job_id_var.set(job.id)
        mode = options.mode
        sync = mode != common_pb2.RESPONSE_MODE_ASYNC
        send_bytes = options.delivery != common_pb2.OUTPUT_DELIVERY_REFERENCES
        # RESULT: only what the result needs (each message costs both ends a gRPC write or
        # read); a skipped event is never converted.
        result_kinds = _RESULT_BYTES if send_bytes else _RESULT_REFERENCES
        result_only = mode == common_pb2.RESPONSE_MODE_RESULT
        link = self.link
        events = self.manager.subscribe(job.id, result_kinds if result_only else None)
        call = calls.current_call.get()  # here: the generator may be closed from elsewhere
        try:
            async for event in events:
                kind = event.kind
                if result_only and not isinstance(kind, result_kinds):
                    continue
                response = carrier()
                msg = event_to_proto(event, link=link, into=response.event)
                if isinstance(kind, Accepted):
                    msg.accepted.existing = existing
                    msg.accepted.queue_position = self.manager.queue_position(job.id)
                    yield response
                    if not sync:
                        return
                    continue
                yield response
                if isinstance(kind, OutputStored) and send_bytes:
                    async for chunk in self._output_chunks(event, kind, carrier):
                        yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            # The caller went away (or its deadline passed): a SYNC job goes with it - unless
            # the server is shutting down: an accepted job outlives the call then, and is
            # finished before exit or resumed at the next start. grpc cancels the handler
            # while it awaits (CancelledError) or closes this generator while it is suspended
            # at a yield, its event being written (GeneratorExit): both are the caller leaving.
            # A caller that stopped reading did not leave: its job runs on, to be read later.
            stalled = call is not None and call.stalled
            if sync and self.manager.accepting and not stalled:
                await asyncio.shield(self._cancel_quietly(job.id))
            raise
        finally:
            await events.aclose()  # a watch through the store holds a listener until closed

    async def _screen_reply_to(self, url: str) -> None:
        """Refuse now a ReplyTo that could never be delivered: the caller would not learn."""
        if not url or self.reply_to_guard is None:
            return
        try:
            await self.reply_to_guard.screen(url)
        except RefusedTarget as exc:
            raise invalid_argument(
                _REPLY_TO, "INVALID_REPLY_TO", f"reply_to is refused: {exc.reason}"
            ) from None

    async def _output_chunks(
        self, event: Any, output: OutputStored, carrier: Callable[[], _C]
    ) -> AsyncIterator[_C]:
        artifact = output.artifact
        offset = 0
        async for data in self.artifacts.read(
            artifact.name, None, 0, 0, chunk_size=self.limits.chunk_bytes
        ):
            last = offset + len(data) >= artifact.size_bytes
            response = carrier()
            msg = response.event
            msg.job = f"jobs/{event.job_id}"
            msg.sequence = event.sequence
            chunk = msg.output_chunk
            chunk.index = output.index
            chunk.offset = offset
            chunk.data = data
            chunk.last = last
            yield response
            offset += len(data)

    async def _cancel_quietly(self, job_id: str) -> None:
        try:
            await self.manager.cancel(job_id, None)
        except Exception:
            logger.exception("cancelling job %s after the caller left", job_id)


_RESULT_BYTES = (OutputStored, Finished)
_RESULT_REFERENCES = (Finished,)
"""The events a RESPONSE_MODE_RESULT call gets (the finished job lists outputs and texts)."""

_VERIFY_HERE_BYTES = KEEP_CONTENT_BYTES  # the spool keeps the bytes of these
_STORED_INPUT_BYTES = 64 * 1024
"""The largest input kept with its job where the store keeps inputs (``InputRef.stored``).
Measured per job (bench.stored_input_cpu, process CPU, a data folder on a healthy disk):
1.3 KB 179 us as a file, 118 us as a row; 64 KiB 346 / 297; 128 KiB 429 / 453; 200 KB
427 / 599 (a row's bytes go through the WAL, its checkpoint, and the free list at the end)."""
_VERIFY_HERE_PIXELS = 128 * 128
"""Inputs this small are decoded on the event loop (about 0.2-0.5 ms for a PNG here): the
hop to the image pool and back costs about 0.1 ms of CPU by itself, as much as the decode."""


def _decode_first_frame(image: ImageFile.ImageFile) -> None:
    """:func:`~aiserver.imaging.verify`'s decode (JPEG at 1/8 scale) of an open image."""
    apply_jpeg_draft(image, (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
    image.load()


def check_options(options: common_pb2.JobOptions) -> None:
    # Lengths and characters of ref_id and tag are the contract's rules (checked on arrival).
    validate_reply_to(options.reply_to, _REPLY_TO)
