"""``AsyncClient``: every call of the imagetasks.v1 contract, on a grpc.aio channel.

This is the client's one hand-written copy. ``tools/gen_sync_client.py`` turns it into
``_sync.py``, the blocking :class:`~aiserver.client.Client` on a blocking grpc channel, by
dropping ``async``/``await`` and renaming (``AsyncClient`` -> ``Client``, ``JobStream`` ->
``SyncJobStream``, ``_io_async`` -> ``_io_sync``); ``make client-check`` (part of ``make
test``) fails when ``_sync.py`` is not what the generator makes of this file.

Why generated rather than a shared base (httpx's way): what the two clients share is the
upload and streaming code, and there asyncio and blocking code differ in keywords only, so a
base class would still hold each streaming method twice. The few real differences (channel,
how an upload is fed to grpc, file I/O, the default deadline) are the same names in
``_io_async.py`` and ``_io_sync.py``. Each call's parameters are written once too: a method
is its request dataclass (``aiserver.client.requests``) through
:class:`~aiserver.client._method.RequestMethod`, so adding a call is a dataclass there and one
line here (then ``make client-sync``).
"""

# ``timeout`` here is a gRPC deadline: it travels to the server, which stops the work when it
# passes (a SYNC job is cancelled), unlike a local timeout.
# ruff: noqa: ASYNC109

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import ExitStack, closing
from typing import Any

import grpc
from imagetasks.v1 import (
    artifact_service_pb2,
    common_pb2,
    job_pb2,
    job_service_pb2,
    workflow_service_pb2,
)

from aiserver.client._io_async import (
    DEFAULT_TIMEOUT,
    Stubs,
    open_channel,
    open_stream,
    send_requests,
    sink_commit,
    sink_write,
    source_chunks,
    stubs_on,
)
from aiserver.client._method import RequestMethod
from aiserver.client.errors import ClientError, guarded
from aiserver.client.inputs import Destination, InputSource, OutputSink
from aiserver.client.requests import (
    ConvertImage,
    CropImage,
    GenerativeRequest,
    GetVariant,
    ImageToImage,
    ImageToText,
    ImageUpscale,
    ImageWithMask,
    ListJobs,
    RunWorkflow,
    TransformRequest,
    artifact_name,
    job_name,
)
from aiserver.client.types import (
    Accepted,
    Event,
    Finished,
    ImageInfo,
    ImageResult,
    JobPage,
    Output,
    OutputData,
    OutputReady,
    Result,
    TextOutput,
    VariantInfo,
    VariantResult,
    event_from_proto,
)

__all__ = ["DEFAULT_TARGET", "AsyncClient", "JobStream"]

DEFAULT_TARGET = "localhost:50051"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


async def _requests(
    request: GenerativeRequest | TransformRequest, sources: Sequence[InputSource]
) -> AsyncIterator[Any]:
    """An upload: the params first, then each input in chunks (the contract's order)."""
    yield request.first_message()
    for source in sources:
        first = True
        async for data in source_chunks(source):
            yield request.chunk_message(source.field, data, source.file_name if first else "")
            first = False


class JobStream:
    """A generative call: iterate it for its events, or call ``run()`` for a
    :class:`Result`. The call starts when iteration starts; a stream can be consumed once.

    Events are :class:`Accepted`, :class:`Progress`, :class:`OutputReady`, :class:`OutputData`,
    :class:`TextOutput`, :class:`Retrying` and :class:`Finished`; with ``result_only`` only
    :class:`OutputReady`, :class:`OutputData` and :class:`Finished`. Leaving the iteration
    early cancels the call, and with it a job that was waited for (``wait=True``).
    """

    def __init__(self, client: AsyncClient, request: GenerativeRequest) -> None:
        self._client = client
        self.request = request
        """The request the stream runs."""
        self._consumed = False
        self.job_name = ""
        """The job's name, ``jobs/{id}``, once the first event has arrived."""

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        if self._consumed:
            raise RuntimeError("a JobStream can be consumed only once; call the method again")
        self._consumed = True
        client = self._client
        with ExitStack() as inputs:
            call, requests = client._open_upload(self.request, inputs)
            with guarded(call):
                await send_requests(call, requests)
                async for response in call:
                    event = event_from_proto(response.event)
                    if event is None:
                        continue
                    if not self.job_name:  # ``accepted``, or the first of ``result_only``
                        self.job_name = event.job
                    yield event

    async def run(self) -> Result:
        """Consume the stream and collect its outputs (bytes in memory), texts and final job.

        With ``wait=False`` the job is fetched once it is accepted. A job that failed is
        still a :class:`Result` (see ``result.error`` and ``result.raise_for_state()``). With
        ``result_only`` no ``accepted`` comes, so ``result.existing`` is False.
        """
        outputs: dict[int, Output] = {}
        buffers: dict[int, io.BytesIO] = {}  # one copy of each chunk (see read_artifact)
        texts: list[str] = []
        accepted: Accepted | None = None
        finished: Finished | None = None
        async for event in self:
            if isinstance(event, Accepted):
                accepted = event
            elif isinstance(event, OutputReady):
                outputs[event.index] = Output(event.index, event.artifact)
            elif isinstance(event, OutputData):
                buffers.setdefault(event.index, io.BytesIO()).write(event.data)
            elif isinstance(event, TextOutput):
                texts.append(event.text)
            elif isinstance(event, Finished):
                finished = event
        for index, data in buffers.items():
            if index in outputs:
                outputs[index].data = data.getvalue()
        if finished is not None:
            job = finished.final
            if not outputs:  # ``result_only`` with references: no ``output`` events
                outputs = {i: Output(i, artifact) for i, artifact in enumerate(job.outputs)}
        elif accepted is not None:
            job = await self._client.get_job(accepted.job)
        else:
            raise ClientError(grpc.StatusCode.UNKNOWN, "the job stream ended without any event")
        return Result(
            job_name=job.name,
            job=job,
            outputs=[outputs[i] for i in sorted(outputs)],
            texts=texts or [t.text for t in job.text_outputs],
            existing=accepted.existing if accepted is not None else False,
        )


class AsyncClient:
    """A client of the imagetasks.v1 service.

    ``target`` is ``host:port``; ``api_key`` is sent as ``authorization: Bearer <key>``;
    ``tls=True`` (or ``root_certificates``, PEM bytes, or ``credentials``) uses TLS.
    ``channel`` runs the calls on a channel of yours (``close()`` leaves it open).
    ``timeout`` is the default deadline in seconds of every call; a call's own ``timeout``
    overrides it. Without either, the asyncio client sets no deadline and the blocking one
    300 s (``DEFAULT_TIMEOUT``): a blocking call never waits forever. The channel opens on
    first use; ``close()`` (or a ``with`` block) closes it. Failed calls raise
    :class:`ClientError`.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        metadata: Iterable[tuple[str, str]] = (),
        options: Iterable[tuple[str, Any]] = (),
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        meta = list(metadata)
        if api_key:
            meta.append(("authorization", f"Bearer {api_key}"))
        self._metadata = tuple(meta)
        if credentials is None and (tls or root_certificates is not None):
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        self._credentials = credentials
        self._options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            *options,
        ]
        self._channel = channel
        self._own_channel = channel is None
        self._stub_set: Stubs | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel, unless it was handed in (``channel=``)."""
        if self._channel is not None and self._own_channel:
            await self._channel.close()
            self._channel = None
            self._stub_set = None

    # ---- plumbing -------------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float | None:
        """The call's own timeout, else the client's, else the flavour's default."""
        for value in (timeout, self.timeout):
            if value is not None:
                return value
        return DEFAULT_TIMEOUT

    def _stubs(self) -> Stubs:
        if self._stub_set is None:
            if self._channel is None:
                self._channel = open_channel(self.target, self._credentials, self._options)
            self._stub_set = stubs_on(self._channel)
        return self._stub_set

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        with guarded():
            return await method(request, metadata=self._metadata, timeout=self._deadline(timeout))

    def _open_upload(
        self, request: GenerativeRequest | TransformRequest, inputs: ExitStack
    ) -> tuple[Any, AsyncIterator[Any]]:
        """The call of ``request``, and the request stream to feed it. The inputs are opened
        at once (a missing file fails before any call) and closed by ``inputs``."""
        sources = [inputs.enter_context(closing(InputSource(f, v))) for f, v in request.inputs()]
        requests = _requests(request, sources)
        call = open_stream(
            self._stubs().uploads[request.RPC],
            requests,
            metadata=self._metadata,
            timeout=self._deadline(request.timeout),
        )
        return call, requests

    async def _info_then_chunks(
        self, call: Any, out: Destination | None, requests: Any = None
    ) -> tuple[Any, bytes | None]:
        """A light call's answer: one ``info`` message, then the bytes (into ``out``)."""
        sink = OutputSink(out) if out is not None else None
        info: Any = None
        buffer = io.BytesIO()  # one copy of each chunk (see read_artifact)
        try:
            with guarded(call):
                if requests is not None:
                    await send_requests(call, requests)
                async for response in call:
                    if response.WhichOneof("payload") == "info":
                        info = response.info
                    elif sink is not None:
                        await sink_write(sink, response.chunk)
                    else:
                        buffer.write(response.chunk)
            if info is None:
                raise ClientError(grpc.StatusCode.UNKNOWN, "the response carried no info message")
            if sink is not None:
                await sink_commit(sink)
        except BaseException:
            if sink is not None:
                sink.abort()
            raise
        return info, None if sink is not None else buffer.getvalue()

    # ---- calls that take a request object ---------------------------------------------------

    def start(self, request: GenerativeRequest) -> JobStream:
        """A generative call (GenerationService) as a :class:`JobStream`."""
        return JobStream(self, request)

    async def transform(self, request: TransformRequest) -> ImageResult:
        """A light call (TransformService): the image, or its info once written to ``out``."""
        with ExitStack() as inputs:
            call, requests = self._open_upload(request, inputs)
            info, data = await self._info_then_chunks(call, request.out, requests)
        return ImageResult(ImageInfo.from_proto(info), data)

    async def get_variant(self, request: GetVariant) -> VariantResult:
        """A resized / re-encoded copy of an artifact (ArtifactService.GetVariant)."""
        call = self._stubs().artifacts.GetVariant(
            request.message(), metadata=self._metadata, timeout=self._deadline(request.timeout)
        )
        info, data = await self._info_then_chunks(call, request.out)
        return VariantResult(VariantInfo.from_proto(info), data)

    async def list_page(self, request: ListJobs) -> JobPage:
        """One page of jobs, newest first (JobService.ListJobs)."""
        response: job_service_pb2.ListJobsResponse = await self._unary(
            self._stubs().jobs.ListJobs, request.message(), request.timeout
        )
        return JobPage(list(response.jobs), response.next_page_token)

    async def iter_pages(self, request: ListJobs) -> AsyncIterator[job_pb2.Job]:
        """Every matching job, newest first, page after page from ``request.page_token``."""
        token = request.page_token
        while True:
            response: job_service_pb2.ListJobsResponse = await self._unary(
                self._stubs().jobs.ListJobs, request.message(token), request.timeout
            )
            for job in response.jobs:
                yield job
            token = response.next_page_token
            if not token:
                return

    # ---- the calls, by name: each takes its request dataclass's arguments -------------------

    image_to_image = RequestMethod(ImageToImage, start)
    image_with_mask = RequestMethod(ImageWithMask, start)
    upscale = RequestMethod(ImageUpscale, start)
    image_to_text = RequestMethod(ImageToText, start)
    crop = RequestMethod(CropImage, transform)
    convert = RequestMethod(ConvertImage, transform)
    variant = RequestMethod(GetVariant, get_variant)
    list_jobs = RequestMethod(ListJobs, list_page)
    iter_jobs = RequestMethod(ListJobs, iter_pages)
    run_workflow = RequestMethod(RunWorkflow, start)

    # ---- artifacts (ArtifactService) -------------------------------------------------------

    async def get_artifact(self, name: str, *, timeout: float | None = None) -> common_pb2.Artifact:
        """An artifact's metadata."""
        request = artifact_service_pb2.GetArtifactRequest(name=artifact_name(name))
        response: artifact_service_pb2.GetArtifactResponse = await self._unary(
            self._stubs().artifacts.GetArtifact, request, timeout
        )
        return response.artifact

    async def stream_artifact(
        self, name: str, *, offset: int = 0, limit: int = 0, timeout: float | None = None
    ) -> AsyncIterator[memoryview]:
        """An artifact's bytes in chunks, from ``offset``, at most ``limit`` (0: all).

        Each chunk is a read-only ``memoryview`` of the message it came in (no copy): write
        it, hash it or join it as bytes; ``bytes(chunk)`` makes a copy that stands alone."""
        request = artifact_service_pb2.ReadArtifactRequest(
            name=artifact_name(name), read_offset=offset, read_limit=limit
        )
        call = self._stubs().read_artifact(
            request, metadata=self._metadata, timeout=self._deadline(timeout)
        )
        with guarded(call):
            async for chunk in call:
                yield chunk.data

    async def read_artifact(
        self, name: str, *, offset: int = 0, limit: int = 0, timeout: float | None = None
    ) -> bytes:
        """An artifact's bytes (in memory), from ``offset``, at most ``limit`` (0: all)."""
        # A BytesIO grows its own bytes object in place (realloc) and hands that object out:
        # one copy of each chunk, where a bytearray then bytes() copies everything twice.
        buffer = io.BytesIO()
        async for data in self.stream_artifact(name, offset=offset, limit=limit, timeout=timeout):
            buffer.write(data)
        return buffer.getvalue()

    async def save_artifact(
        self, name: str, out: Destination, *, timeout: float | None = None
    ) -> int:
        """Writes an artifact to ``out`` as it arrives; returns the number of bytes."""
        sink = OutputSink(out)
        try:
            async for data in self.stream_artifact(name, timeout=timeout):
                await sink_write(sink, data)
            await sink_commit(sink)
        except BaseException:
            sink.abort()
            raise
        return sink.size

    # ---- workflows (WorkflowService) -------------------------------------------------------

    async def workflows(
        self, *, timeout: float | None = None
    ) -> list[workflow_service_pb2.Workflow]:
        """Every workflow the server has: parameters, inputs, outputs, who can run it now."""
        response: workflow_service_pb2.ListWorkflowsResponse = await self._unary(
            self._stubs().workflows.ListWorkflows,
            workflow_service_pb2.ListWorkflowsRequest(),
            timeout,
        )
        return list(response.workflows)

    async def get_workflow(
        self, name: str, *, timeout: float | None = None
    ) -> workflow_service_pb2.Workflow:
        """One workflow by name (``text_to_image`` or ``workflows/text_to_image``)."""
        request = workflow_service_pb2.GetWorkflowRequest(
            name=name if name.startswith("workflows/") else f"workflows/{name}"
        )
        response: workflow_service_pb2.GetWorkflowResponse = await self._unary(
            self._stubs().workflows.GetWorkflow, request, timeout
        )
        return response.workflow

    # ---- jobs (JobService) -----------------------------------------------------------------

    async def get_job(self, name: str, *, timeout: float | None = None) -> job_pb2.Job:
        """One job by name (``jobs/{id}`` or ``{id}``)."""
        request = job_service_pb2.GetJobRequest(name=job_name(name))
        response: job_service_pb2.GetJobResponse = await self._unary(
            self._stubs().jobs.GetJob, request, timeout
        )
        return response.job

    async def watch_job(self, name: str, *, timeout: float | None = None) -> AsyncIterator[Event]:
        """A job's events: its history replayed, then live events until it ends. Output
        bytes are never sent here (read them with :meth:`read_artifact`)."""
        request = job_service_pb2.WatchJobRequest(name=job_name(name))
        call = self._stubs().jobs.WatchJob(
            request, metadata=self._metadata, timeout=self._deadline(timeout)
        )
        with guarded(call):
            async for response in call:
                event = event_from_proto(response.event)
                if event is not None:
                    yield event

    async def cancel_job(self, name: str, *, timeout: float | None = None) -> job_pb2.Job:
        """Cancels a queued or running job; returns it (a no-op on an ended job)."""
        request = job_service_pb2.CancelJobRequest(name=job_name(name))
        response: job_service_pb2.CancelJobResponse = await self._unary(
            self._stubs().jobs.CancelJob, request, timeout
        )
        return response.job
