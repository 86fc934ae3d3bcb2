"""``AsyncClient``: every call of the imagetasks.v1 contract, on a grpc.aio channel."""

# ``timeout`` here is a gRPC deadline: it travels to the server, which stops the work when it
# passes (a SYNC job is cancelled), unlike a local ``asyncio.timeout``.
# ruff: noqa: ASYNC109

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import grpc
from imagetasks.v1 import (
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    common_pb2,
    generation_service_pb2,
    generation_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    tasks_pb2,
    transform_service_pb2,
    transform_service_pb2_grpc,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)

from aiserver.client.errors import ClientError
from aiserver.client.inputs import CHUNK_SIZE, Destination, Input, InputSource, OutputSink
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
    image_format,
)

__all__ = ["DEFAULT_TARGET", "AsyncClient", "JobStream"]

DEFAULT_TARGET = "localhost:50051"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

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
    if task is None or task == "":
        return common_pb2.TASK_UNSPECIFIED
    if isinstance(task, int):
        return common_pb2.Task.ValueType(task)
    key = task.replace("_", "").replace("-", "").lower().removeprefix("task")
    if key not in _TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(_TASKS)})")
    return _TASKS[key]


def state_value(state: str | int) -> job_pb2.Job.State.ValueType:
    if isinstance(state, int):
        return job_pb2.Job.State.ValueType(state)
    key = state.strip().lower().removeprefix("state_")
    if key not in _STATES:
        raise ValueError(f"unknown job state {state!r} (known: {', '.join(_STATES)})")
    return _STATES[key]


def _options(ref_id: str, tag: str, reply_to: str, wait: bool, refs: bool) -> Any:
    return common_pb2.JobOptions(
        ref_id=ref_id,
        tag=tag,
        reply_to=reply_to,
        mode=common_pb2.RESPONSE_MODE_SYNC if wait else common_pb2.RESPONSE_MODE_ASYNC,
        delivery=(
            common_pb2.OUTPUT_DELIVERY_REFERENCES if refs else common_pb2.OUTPUT_DELIVERY_BYTES
        ),
    )


def _optional(**values: Any) -> dict[str, Any]:
    """Only the optional fields that were given (proto3 ``optional``: unset means default)."""
    return {key: value for key, value in values.items() if value is not None}


async def _upload(
    call: Any, request_type: Any, params: Any, sources: Sequence[InputSource]
) -> None:
    """Params first, then each input in chunks, then half-close.

    Stops quietly when the server ends the call early (a rejected upload): its status is
    read from the response side. (Handing grpc.aio a request iterator instead hides that
    status behind a local INTERNAL error.)
    """

    async def write(message: Any) -> bool:
        if call.done():
            return False
        try:
            await call.write(message)
        except Exception:
            if call.done():
                return False
            raise
        return True

    if not await write(request_type(params=params)):
        return
    for source in sources:
        first = True
        async for data in source.chunks(CHUNK_SIZE):
            chunk = common_pb2.FileChunk(
                field=source.field, data=data, file_name=source.file_name if first else ""
            )
            first = False
            if not await write(request_type(chunk=chunk)):
                return
    if not call.done():
        await call.done_writing()


class JobStream:
    """A generative call: iterate it for its events, or ``await stream.run()`` for a
    :class:`Result`. The call starts when iteration starts; a stream can be consumed once.

    Events are :class:`Accepted`, :class:`Progress`, :class:`OutputReady`, :class:`OutputData`,
    :class:`TextOutput`, :class:`Retrying` and :class:`Finished`. Leaving the iteration early
    cancels the call, and with it a job that was waited for (``wait=True``).
    """

    def __init__(
        self,
        client: AsyncClient,
        method: str,
        request_type: Any,
        params: Any,
        inputs: Sequence[tuple[str, Input]],
        *,
        timeout: float | None,
        service: str = "generation",
    ) -> None:
        self._client = client
        self._service = service
        self._method = method
        self._request_type = request_type
        self._params = params
        self._inputs = inputs
        self._timeout = timeout
        self._consumed = False
        self.job_name = ""
        """The job's name, ``jobs/{id}``, once the ``accepted`` event has arrived."""

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        if self._consumed:
            raise RuntimeError("a JobStream can be consumed only once; call the method again")
        self._consumed = True
        sources: list[InputSource] = []
        try:
            for field, value in self._inputs:
                sources.append(InputSource(field, value))
            stub = (
                self._client._workflow_service()
                if self._service == "workflows"
                else self._client._generation()
            )
            call = getattr(stub, self._method)(
                metadata=self._client._metadata, timeout=self._client._deadline(self._timeout)
            )
            try:
                await _upload(call, self._request_type, self._params, sources)
                async for response in call:
                    event = event_from_proto(response.event)
                    if event is None:
                        continue
                    if isinstance(event, Accepted):
                        self.job_name = event.job
                    yield event
            except grpc.RpcError as err:
                raise ClientError.from_rpc_error(err) from None
            finally:
                if not call.done():
                    call.cancel()
        finally:
            for source in sources:
                source.close()

    async def run(self) -> Result:
        """Consume the stream and collect its outputs (bytes in memory), texts and final job.

        With ``wait=False`` the job is fetched once it is accepted. A job that failed is
        still a :class:`Result` (see ``result.error`` and ``result.raise_for_state()``).
        """
        outputs: dict[int, Output] = {}
        buffers: dict[int, bytearray] = {}
        texts: list[str] = []
        accepted: Accepted | None = None
        finished: Finished | None = None
        async for event in self:
            if isinstance(event, Accepted):
                accepted = event
            elif isinstance(event, OutputReady):
                outputs[event.index] = Output(event.index, event.artifact)
            elif isinstance(event, OutputData):
                buffers.setdefault(event.index, bytearray()).extend(event.data)
            elif isinstance(event, TextOutput):
                texts.append(event.text)
            elif isinstance(event, Finished):
                finished = event
        for index, data in buffers.items():
            if index in outputs:
                outputs[index].data = bytes(data)
        if finished is not None:
            job = finished.final
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
    """An asyncio client of the imagetasks.v1 service.

    ``target`` is ``host:port``; ``api_key`` is sent as ``authorization: Bearer <key>``;
    ``tls=True`` (or ``root_certificates``, PEM bytes, or ``credentials``) uses TLS.
    ``timeout`` is the default deadline in seconds of every call (None: none). The channel
    opens on first use, inside the running event loop; ``await client.close()`` (or
    ``async with``) closes it. Failed calls raise :class:`ClientError`.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        credentials: Any = None,
        timeout: float | None = None,
        metadata: Iterable[tuple[str, str]] = (),
        options: Iterable[tuple[str, Any]] = (),
        channel: Any = None,
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
        self._channel: Any = channel
        self._own_channel = channel is None
        self._stubs: dict[str, Any] = {}

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._channel is not None and self._own_channel:
            await self._channel.close()
        self._channel = None
        self._stubs.clear()

    # ---- plumbing -------------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout

    def _stub(self, name: str, factory: Any) -> Any:
        if self._channel is None:
            if self._credentials is not None:
                self._channel = grpc.aio.secure_channel(
                    self.target, self._credentials, options=self._options
                )
            else:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
        if name not in self._stubs:
            self._stubs[name] = factory(self._channel)
        return self._stubs[name]

    def _generation(self) -> Any:
        return self._stub("generation", generation_service_pb2_grpc.GenerationServiceStub)

    def _transform(self) -> Any:
        return self._stub("transform", transform_service_pb2_grpc.TransformServiceStub)

    def _workflow_service(self) -> Any:
        return self._stub("workflows", workflow_service_pb2_grpc.WorkflowServiceStub)

    def _jobs(self) -> Any:
        return self._stub("jobs", job_service_pb2_grpc.JobServiceStub)

    def _artifacts(self) -> Any:
        return self._stub("artifacts", artifact_service_pb2_grpc.ArtifactServiceStub)

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, metadata=self._metadata, timeout=self._deadline(timeout))
        except grpc.RpcError as err:
            raise ClientError.from_rpc_error(err) from None

    # ---- workflows (WorkflowService) ----------------------------------------------------------

    async def workflows(
        self, *, timeout: float | None = None
    ) -> list[workflow_service_pb2.Workflow]:
        """Every workflow the server has: parameters, inputs, outputs, who can run it now."""
        response: workflow_service_pb2.ListWorkflowsResponse = await self._unary(
            self._workflow_service().ListWorkflows,
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
            self._workflow_service().GetWorkflow, request, timeout
        )
        return response.workflow

    def run_workflow(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        files: Mapping[str, Input] | None = None,
        *,
        output_format: str | int | None = None,
        quality: int | None = None,
        ref_id: str = "",
        tag: str = "",
        reply_to: str = "",
        wait: bool = True,
        references_only: bool = False,
        timeout: float | None = None,
    ) -> JobStream:
        """Run workflow ``name`` with ``params`` (JSON values, checked by the server against
        the workflow's parameters) and ``files`` (input name -> path, bytes or file)."""
        options = _options(ref_id, tag, reply_to, wait, references_only)
        if output_format is not None:
            options.output_format = image_format(output_format)
        if quality is not None:
            options.quality = quality
        request = workflow_service_pb2.RunWorkflowParams(
            workflow=name.removeprefix("workflows/"), options=options
        )
        request.parameters.update(dict(params or {}))
        return JobStream(
            self,
            "RunWorkflow",
            workflow_service_pb2.RunWorkflowRequest,
            request,
            list((files or {}).items()),
            timeout=timeout,
            service="workflows",
        )

    # ---- generative tasks (GenerationService) ----------------------------------------------

    def image_to_image(
        self,
        image: Input,
        *,
        prompt: str,
        negative_prompt: str | None = None,
        model: str = "",
        denoise: float | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        sampler: str = "",
        scheduler: str = "",
        ref_id: str = "",
        tag: str = "",
        reply_to: str = "",
        wait: bool = True,
        references_only: bool = False,
        timeout: float | None = None,
    ) -> JobStream:
        """A new image from ``image`` and ``prompt`` (ImageToImage)."""
        params = tasks_pb2.ImageToImageParams(
            positive_prompt=prompt,
            model=model,
            sampler=sampler,
            scheduler=scheduler,
            options=_options(ref_id, tag, reply_to, wait, references_only),
            **_optional(
                negative_prompt=negative_prompt,
                denoise=denoise,
                batch_size=batch_size,
                seed=seed,
                steps=steps,
                cfg_scale=cfg_scale,
            ),
        )
        return JobStream(
            self,
            "ImageToImage",
            generation_service_pb2.ImageToImageRequest,
            params,
            [("image", image)],
            timeout=timeout,
        )

    def image_with_mask(
        self,
        image: Input,
        mask: Input,
        *,
        prompt: str,
        negative_prompt: str | None = None,
        model: str = "",
        denoise: float | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        sampler: str = "",
        scheduler: str = "",
        mask_channel: str = "red",
        ref_id: str = "",
        tag: str = "",
        reply_to: str = "",
        wait: bool = True,
        references_only: bool = False,
        timeout: float | None = None,
    ) -> JobStream:
        """Inpainting: ``prompt`` applies inside ``mask`` (``mask_channel``: red, green,
        blue or alpha) only (ImageWithMask)."""
        if mask_channel not in _MASK_CHANNELS:
            raise ValueError(f"mask_channel must be one of {', '.join(_MASK_CHANNELS)}")
        params = tasks_pb2.ImageWithMaskParams(
            positive_prompt=prompt,
            model=model,
            sampler=sampler,
            scheduler=scheduler,
            mask_channel=_MASK_CHANNELS[mask_channel],
            options=_options(ref_id, tag, reply_to, wait, references_only),
            **_optional(
                negative_prompt=negative_prompt,
                denoise=denoise,
                batch_size=batch_size,
                seed=seed,
                steps=steps,
                cfg_scale=cfg_scale,
            ),
        )
        return JobStream(
            self,
            "ImageWithMask",
            generation_service_pb2.ImageWithMaskRequest,
            params,
            [("image", image), ("mask", mask)],
            timeout=timeout,
        )

    def upscale(
        self,
        image: Input,
        *,
        model: str = "",
        seed: int | None = None,
        ref_id: str = "",
        tag: str = "",
        reply_to: str = "",
        wait: bool = True,
        references_only: bool = False,
        timeout: float | None = None,
    ) -> JobStream:
        """A 2x upscale of ``image`` (ImageUpscale)."""
        params = tasks_pb2.ImageUpscaleParams(
            model=model,
            options=_options(ref_id, tag, reply_to, wait, references_only),
            **_optional(seed=seed),
        )
        return JobStream(
            self,
            "ImageUpscale",
            generation_service_pb2.ImageUpscaleRequest,
            params,
            [("image", image)],
            timeout=timeout,
        )

    def image_to_text(
        self,
        image: Input,
        *,
        model: str = "",
        prompt: str = "",
        ref_id: str = "",
        tag: str = "",
        reply_to: str = "",
        wait: bool = True,
        timeout: float | None = None,
    ) -> JobStream:
        """A caption of ``image`` (ImageToText); ``prompt`` is the model's task, e.g.
        ``detailed_caption``."""
        params = tasks_pb2.ImageToTextParams(
            model=model, prompt=prompt, options=_options(ref_id, tag, reply_to, wait, False)
        )
        return JobStream(
            self,
            "ImageToText",
            generation_service_pb2.ImageToTextRequest,
            params,
            [("image", image)],
            timeout=timeout,
        )

    # ---- light tasks (TransformService) ----------------------------------------------------

    async def crop(
        self,
        image: Input,
        *,
        x: int,
        y: int,
        width: int,
        height: int,
        format: str | int | None = None,
        quality: int | None = None,
        out: Destination | None = None,
        timeout: float | None = None,
    ) -> ImageResult:
        """``image`` cropped to a rectangle, in ``format`` (default: the input's). With
        ``out`` the bytes are written there as they arrive and ``result.data`` is None."""
        params = tasks_pb2.CropImageParams(
            x=x,
            y=y,
            width=width,
            height=height,
            output_format=image_format(format),
            **_optional(quality=quality),
        )
        return await self._transform_call(
            "CropImage", transform_service_pb2.CropImageRequest, params, image, out, timeout
        )

    async def convert(
        self,
        image: Input,
        *,
        format: str | int,
        quality: int | None = None,
        out: Destination | None = None,
        timeout: float | None = None,
    ) -> ImageResult:
        """``image`` in another ``format`` (``webp``, ``png``, ``jpg``...). With ``out`` the
        bytes are written there as they arrive and ``result.data`` is None."""
        params = tasks_pb2.ConvertImageParams(
            output_format=image_format(format), **_optional(quality=quality)
        )
        return await self._transform_call(
            "ConvertImage", transform_service_pb2.ConvertImageRequest, params, image, out, timeout
        )

    async def _transform_call(
        self,
        method: str,
        request_type: Any,
        params: Any,
        image: Input,
        out: Destination | None,
        timeout: float | None,
    ) -> ImageResult:
        sink = OutputSink(out) if out is not None else None
        source = InputSource("image", image)
        try:
            call = getattr(self._transform(), method)(
                metadata=self._metadata, timeout=self._deadline(timeout)
            )
            info, data = await self._info_then_chunks(
                call, sink, upload=(request_type, params, [source])
            )
        except BaseException:
            if sink is not None:
                sink.abort()
            raise
        finally:
            source.close()
        return ImageResult(ImageInfo.from_proto(info), data)

    async def _info_then_chunks(
        self,
        call: Any,
        sink: OutputSink | None,
        *,
        upload: tuple[Any, Any, Sequence[InputSource]] | None = None,
    ) -> tuple[Any, bytes | None]:
        info: Any = None
        buffer = bytearray()
        try:
            if upload is not None:
                await _upload(call, *upload)
            async for response in call:
                if response.WhichOneof("payload") == "info":
                    info = response.info
                elif sink is not None:
                    await sink.write(response.chunk)
                else:
                    buffer += response.chunk
        except grpc.RpcError as err:
            raise ClientError.from_rpc_error(err) from None
        finally:
            if not call.done():
                call.cancel()
        if info is None:
            raise ClientError(grpc.StatusCode.UNKNOWN, "the response carried no info message")
        if sink is not None:
            await sink.commit()
            return info, None
        return info, bytes(buffer)

    # ---- artifacts (ArtifactService) -------------------------------------------------------

    async def variant(
        self,
        artifact: str,
        *,
        spec: str = "",
        width: int = 0,
        height: int = 0,
        fit: str = "",
        format: str | int | None = None,
        quality: int | None = None,
        preset: str = "",
        out: Destination | None = None,
        timeout: float | None = None,
    ) -> VariantResult:
        """A resized / re-encoded copy of an artifact: ``spec`` (``width=256,format=jpg``),
        the separate fields, or a ``preset``. With ``out`` the bytes are written there."""
        if fit not in _FITS:
            raise ValueError(f"fit must be one of {', '.join(VARIANT_FITS)}")
        request = artifact_service_pb2.GetVariantRequest(
            name=artifact_name(artifact),
            spec=spec,
            width=width,
            height=height,
            fit=_FITS[fit],
            format=image_format(format),
            preset=preset,
            **_optional(quality=quality),
        )
        sink = OutputSink(out) if out is not None else None
        try:
            call = self._artifacts().GetVariant(
                request, metadata=self._metadata, timeout=self._deadline(timeout)
            )
            info, data = await self._info_then_chunks(call, sink)
        except BaseException:
            if sink is not None:
                sink.abort()
            raise
        return VariantResult(VariantInfo.from_proto(info), data)

    async def get_artifact(self, name: str, *, timeout: float | None = None) -> common_pb2.Artifact:
        """An artifact's metadata."""
        request = artifact_service_pb2.GetArtifactRequest(name=artifact_name(name))
        response: artifact_service_pb2.GetArtifactResponse = await self._unary(
            self._artifacts().GetArtifact, request, timeout
        )
        return response.artifact

    async def stream_artifact(
        self, name: str, *, offset: int = 0, limit: int = 0, timeout: float | None = None
    ) -> AsyncIterator[bytes]:
        """An artifact's bytes in chunks, from ``offset``, at most ``limit`` (0: all)."""
        request = artifact_service_pb2.ReadArtifactRequest(
            name=artifact_name(name), read_offset=offset, read_limit=limit
        )
        call = self._artifacts().ReadArtifact(
            request, metadata=self._metadata, timeout=self._deadline(timeout)
        )
        try:
            async for response in call:
                yield response.data
        except grpc.RpcError as err:
            raise ClientError.from_rpc_error(err) from None
        finally:
            if not call.done():
                call.cancel()

    async def read_artifact(
        self, name: str, *, offset: int = 0, limit: int = 0, timeout: float | None = None
    ) -> bytes:
        """An artifact's bytes (in memory), from ``offset``, at most ``limit`` (0: all)."""
        buffer = bytearray()
        async for data in self.stream_artifact(name, offset=offset, limit=limit, timeout=timeout):
            buffer += data
        return bytes(buffer)

    async def save_artifact(
        self, name: str, out: Destination, *, timeout: float | None = None
    ) -> int:
        """Writes an artifact to ``out`` as it arrives; returns the number of bytes."""
        sink = OutputSink(out)
        try:
            async for data in self.stream_artifact(name, timeout=timeout):
                await sink.write(data)
            await sink.commit()
        except BaseException:
            sink.abort()
            raise
        return sink.size

    # ---- jobs (JobService) -----------------------------------------------------------------

    async def get_job(self, name: str, *, timeout: float | None = None) -> job_pb2.Job:
        """One job by name (``jobs/{id}`` or ``{id}``)."""
        request = job_service_pb2.GetJobRequest(name=job_name(name))
        response: job_service_pb2.GetJobResponse = await self._unary(
            self._jobs().GetJob, request, timeout
        )
        return response.job

    async def list_jobs(
        self,
        *,
        states: Iterable[str | int] = (),
        task: str | int | None = None,
        tag: str = "",
        ref_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        all_owners: bool = False,
        timeout: float | None = None,
    ) -> JobPage:
        """One page of jobs, newest first. ``states``: ``queued``, ``running``,
        ``succeeded``, ``failed``, ``cancelled``; ``task``: ``ImageToImage``, ``upscale``..."""
        request = job_service_pb2.ListJobsRequest(
            page_size=page_size,
            page_token=page_token,
            states=[state_value(s) for s in states],
            task=task_value(task),
            tag=tag,
            ref_id=ref_id,
            all_owners=all_owners,
        )
        response: job_service_pb2.ListJobsResponse = await self._unary(
            self._jobs().ListJobs, request, timeout
        )
        return JobPage(list(response.jobs), response.next_page_token)

    async def iter_jobs(
        self,
        *,
        states: Iterable[str | int] = (),
        task: str | int | None = None,
        tag: str = "",
        ref_id: str = "",
        page_size: int = 0,
        all_owners: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[job_pb2.Job]:
        """Every matching job, newest first, page after page."""
        wanted = list(states)
        token = ""
        while True:
            page = await self.list_jobs(
                states=wanted,
                task=task,
                tag=tag,
                ref_id=ref_id,
                page_size=page_size,
                page_token=token,
                all_owners=all_owners,
                timeout=timeout,
            )
            for job in page.jobs:
                yield job
            token = page.next_page_token
            if not token:
                return

    async def watch_job(self, name: str, *, timeout: float | None = None) -> AsyncIterator[Event]:
        """A job's events: its history replayed, then live events until it ends. Output
        bytes are never sent here (read them with :meth:`read_artifact`)."""
        request = job_service_pb2.WatchJobRequest(name=job_name(name))
        call = self._jobs().WatchJob(
            request, metadata=self._metadata, timeout=self._deadline(timeout)
        )
        try:
            async for response in call:
                event = event_from_proto(response.event)
                if event is not None:
                    yield event
        except grpc.RpcError as err:
            raise ClientError.from_rpc_error(err) from None
        finally:
            if not call.done():
                call.cancel()

    async def cancel_job(self, name: str, *, timeout: float | None = None) -> job_pb2.Job:
        """Cancels a queued or running job; returns it (a no-op on an ended job)."""
        request = job_service_pb2.CancelJobRequest(name=job_name(name))
        response: job_service_pb2.CancelJobResponse = await self._unary(
            self._jobs().CancelJob, request, timeout
        )
        return response.job
