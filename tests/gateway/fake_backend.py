"""A small, deterministic gRPC backend for the gateway's own tests.

It serves JobService, ArtifactService and GenerationService from memory, following the
contract (ordering, rich statuses), and records what it received, so the tests can check how the
gateway maps HTTP onto calls without a job manager or a ComfyUI agent. The real service is
exercised by the other gateway tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from imagetasks.v1 import (
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    common_pb2,
    generation_service_pb2,
    generation_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from PIL import Image

DOMAIN = "aiserver.imagetasks.v1"


def png(colour: tuple[int, int, int], size: tuple[int, int] = (16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _pack(msg: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed


def rich(
    code: int,
    reason: str,
    message: str,
    *,
    fields: tuple[tuple[str, str], ...] = (),
    retry_s: int | None = None,
) -> Any:
    details = [_pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))]
    if fields:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                        for f, d in fields
                    ]
                )
            )
        )
    if retry_s is not None:
        details.append(
            _pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=retry_s)))
        )
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=details))


@dataclass
class Received:
    """One upload as the backend saw it."""

    method: str
    params: Any
    files: dict[str, bytes] = field(default_factory=dict)
    file_names: dict[str, str] = field(default_factory=dict)
    chunk_sizes: list[int] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class State:
    jobs: dict[str, job_pb2.Job] = field(default_factory=dict)
    events: dict[str, list[job_pb2.JobEvent]] = field(default_factory=dict)
    artifacts: dict[str, tuple[Any, bytes]] = field(default_factory=dict)
    uploads: list[Received] = field(default_factory=list)
    """Finished uploads."""
    receiving: list[Received] = field(default_factory=list)
    """Uploads as they arrive (params in, chunks still coming)."""
    metadata: list[dict[str, str]] = field(default_factory=list)
    counter: int = 0
    linger_s: float = 0.0
    """A generation stream stays open this long after its last event, before its status."""
    generation_streams: list[str] = field(default_factory=list)
    """How each generation stream ended: ``completed`` or ``cancelled`` (by the client)."""

    def add_artifact(self, data: bytes, file_name: str, job: str) -> Any:
        sha = hashlib.sha256(data).hexdigest()
        name = f"artifacts/2025/01/02/{sha}.png"
        art = common_pb2.Artifact(
            name=name,
            url="/" + name,
            file_name=file_name,
            mime_type="image/png",
            width=16,
            height=12,
            size_bytes=len(data),
            sha256=sha,
            provider="comfyui:fake",
            job=job,
        )
        art.create_time.FromSeconds(1_735_776_000)
        self.artifacts[name] = (art, data)
        return art

    def add_job(
        self,
        *,
        task: int,
        ref_id: str = "",
        state: int = job_pb2.Job.STATE_SUCCEEDED,
        outputs: list[bytes] = (),  # type: ignore[assignment]
        texts: list[str] = (),  # type: ignore[assignment]
        error: Any = None,
    ) -> job_pb2.Job:
        self.counter += 1
        job_id = f"J{self.counter:04d}"
        name = f"jobs/{job_id}"
        job = job_pb2.Job(name=name, task=task, state=state, ref_id=ref_id or f"ref-{job_id}")
        for i, data in enumerate(outputs):
            job.outputs.append(self.add_artifact(data, f"out_{i}.png", name))
        for i, text in enumerate(texts):
            job.text_outputs.append(job_pb2.TextOutput(index=i, text=text))
        if error is not None:
            job.error.CopyFrom(error)
        self.jobs[job_id] = job
        seq = 0

        def event(**kind: Any) -> job_pb2.JobEvent:
            nonlocal seq
            seq += 1
            return job_pb2.JobEvent(job=name, sequence=seq, **kind)

        events = [
            event(accepted=job_pb2.JobAccepted(task=task, ref_id=job.ref_id)),
            event(progress=job_pb2.JobProgress(stage=job_pb2.JobProgress.STAGE_RUNNING, step=1)),
            event(progress=job_pb2.JobProgress(stage=job_pb2.JobProgress.STAGE_RUNNING, step=2)),
        ]
        events += [
            event(output=job_pb2.OutputReady(index=i, artifact=a))
            for i, a in enumerate(job.outputs)
        ]
        events += [event(text_output=t) for t in job.text_outputs]
        if state in (
            job_pb2.Job.STATE_SUCCEEDED,
            job_pb2.Job.STATE_FAILED,
            job_pb2.Job.STATE_CANCELLED,
        ):
            events.append(event(finished=job_pb2.JobFinished(job=job)))
        self.events[job_id] = events
        return job


def _metadata(context: Any) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def _job_id(name: str) -> str:
    return name.removeprefix("jobs/")


class Jobs(job_service_pb2_grpc.JobServiceServicer):
    def __init__(self, state: State) -> None:
        self.state = state

    async def _job(self, name: str, context: Any) -> job_pb2.Job:
        job = self.state.jobs.get(_job_id(name))
        if job is None:
            await context.abort_with_status(
                rich(code_pb2.NOT_FOUND, "JOB_NOT_FOUND", f"job {name!r} not found")
            )
        assert job is not None
        return job

    async def GetJob(self, request: Any, context: Any) -> Any:
        self.state.metadata.append(_metadata(context))
        return job_service_pb2.GetJobResponse(job=await self._job(request.name, context))

    async def ListJobs(self, request: Any, context: Any) -> Any:
        self.state.metadata.append(_metadata(context))
        if request.tag == "busy":
            await context.abort_with_status(
                rich(code_pb2.RESOURCE_EXHAUSTED, "TOO_MANY_REQUESTS", "slow down", retry_s=3)
            )
        if request.page_size > 1000:
            await context.abort_with_status(
                rich(
                    code_pb2.INVALID_ARGUMENT,
                    "INVALID_PAGE_SIZE",
                    "must be 0..1000",
                    fields=(("page_size", "must be 0..1000"),),
                )
            )
        jobs = [
            j
            for j in reversed(list(self.state.jobs.values()))
            if (not request.ref_id or j.ref_id == request.ref_id)
            and (not request.states or j.state in request.states)
        ]
        return job_service_pb2.ListJobsResponse(jobs=jobs[: request.page_size or 50])

    async def WatchJob(self, request: Any, context: Any) -> AsyncIterator[Any]:
        job = await self._job(request.name, context)
        for event in self.state.events[_job_id(request.name)]:
            yield job_service_pb2.WatchJobResponse(event=event)
        if job.state == job_pb2.Job.STATE_RUNNING:
            await asyncio.Event().wait()  # a job that never ends: the watch stays open

    async def CancelJob(self, request: Any, context: Any) -> Any:
        job = await self._job(request.name, context)
        if job.state in (job_pb2.Job.STATE_QUEUED, job_pb2.Job.STATE_RUNNING):
            job.state = job_pb2.Job.STATE_CANCELLED
        return job_service_pb2.CancelJobResponse(job=job)


class Artifacts(artifact_service_pb2_grpc.ArtifactServiceServicer):
    def __init__(self, state: State) -> None:
        self.state = state
        self.reads: list[tuple[int, int]] = []

    async def _get(self, name: str, context: Any) -> tuple[Any, bytes]:
        found = self.state.artifacts.get(name)
        if found is None:
            await context.abort_with_status(
                rich(code_pb2.NOT_FOUND, "ARTIFACT_NOT_FOUND", f"{name} not found")
            )
        assert found is not None
        return found

    async def GetArtifact(self, request: Any, context: Any) -> Any:
        art, _ = await self._get(request.name, context)
        return artifact_service_pb2.GetArtifactResponse(artifact=art)

    async def ReadArtifact(self, request: Any, context: Any) -> AsyncIterator[Any]:
        _, data = await self._get(request.name, context)
        self.reads.append((request.read_offset, request.read_limit))
        if request.read_offset > len(data):
            await context.abort_with_status(
                rich(code_pb2.OUT_OF_RANGE, "OUT_OF_RANGE", "read_offset is past the end")
            )
        end = len(data) if not request.read_limit else request.read_offset + request.read_limit
        for start in range(request.read_offset, min(end, len(data)), 50):
            stop = min(start + 50, end)
            yield artifact_service_pb2.ReadArtifactResponse(data=data[start:stop], offset=start)

    async def GetVariant(self, request: Any, context: Any) -> AsyncIterator[Any]:
        art, _ = await self._get(request.name, context)
        if request.spec != "width=8":
            await context.abort_with_status(
                rich(
                    code_pb2.INVALID_ARGUMENT,
                    "INVALID_VARIANT_SPEC",
                    "bad spec",
                    fields=(("spec", "bad spec"),),
                )
            )
        data = png((1, 2, 3), (8, 6))
        yield artifact_service_pb2.GetVariantResponse(
            info=artifact_service_pb2.VariantInfo(
                spec="width=8,format=webp",
                etag=hashlib.sha256(data).hexdigest()[:20],
                url=f"/variants/width=8/{art.name.removeprefix('artifacts/')}",
                image=common_pb2.ImageInfo(
                    mime_type="image/png",
                    width=8,
                    height=6,
                    size_bytes=len(data),
                    file_name="variant.png",
                ),
            )
        )
        for start in range(0, len(data), 40):
            yield artifact_service_pb2.GetVariantResponse(chunk=data[start : start + 40])


class Generation(generation_service_pb2_grpc.GenerationServiceServicer):
    def __init__(self, state: State) -> None:
        self.state = state

    async def _run(self, method: str, task: int, requests: Any, context: Any) -> Any:
        received: Received | None = None
        async for msg in requests:
            kind = msg.WhichOneof("payload")
            if received is None:
                if kind != "params":
                    await context.abort_with_status(
                        rich(code_pb2.INVALID_ARGUMENT, "PARAMS_NOT_FIRST", "params first")
                    )
                received = Received(method, msg.params, metadata=_metadata(context))
                self.state.receiving.append(received)
                continue
            chunk = msg.chunk
            received.chunk_sizes.append(len(chunk.data))
            received.files[chunk.field] = received.files.get(chunk.field, b"") + chunk.data
            if chunk.file_name:
                received.file_names.setdefault(chunk.field, chunk.file_name)
        assert received is not None
        self.state.uploads.append(received)
        if "image" not in received.files:
            await context.abort_with_status(
                rich(
                    code_pb2.INVALID_ARGUMENT,
                    "MISSING_INPUT",
                    "missing input: image",
                    fields=(("image", "required"),),
                )
            )
        params = received.params
        prompt = getattr(params, "positive_prompt", "")
        if prompt == "fail":
            error = status_pb2.Status(
                code=code_pb2.UNAVAILABLE,
                message="the agent went away",
                details=[_pack(error_details_pb2.ErrorInfo(reason="AGENT_LOST", domain=DOMAIN))],
            )
            job = self.state.add_job(
                task=task,
                ref_id=params.options.ref_id,
                state=job_pb2.Job.STATE_FAILED,
                error=error,
            )
        elif task == common_pb2.TASK_IMAGE_TO_TEXT:
            job = self.state.add_job(
                task=task, ref_id=params.options.ref_id, texts=["a cat on a mat"]
            )
        else:
            job = self.state.add_job(
                task=task,
                ref_id=params.options.ref_id,
                outputs=[png((200, 10, 10)), png((10, 200, 10))],
            )
        events = self.state.events[_job_id(job.name)]
        if params.options.mode == common_pb2.RESPONSE_MODE_ASYNC:
            return events[:1]
        result_only = params.options.mode == common_pb2.RESPONSE_MODE_RESULT
        out = []
        for event in events:
            kind = event.WhichOneof("kind")
            if result_only and kind not in ("output", "finished"):
                continue
            if (
                result_only
                and kind == "output"
                and params.options.delivery == common_pb2.OUTPUT_DELIVERY_REFERENCES
            ):
                continue
            out.append(event)
            if (
                event.WhichOneof("kind") == "output"
                and params.options.delivery != common_pb2.OUTPUT_DELIVERY_REFERENCES
            ):
                data = self.state.artifacts[event.output.artifact.name][1]
                out.append(
                    job_pb2.JobEvent(
                        job=job.name,
                        sequence=event.sequence,
                        output_chunk=job_pb2.OutputChunk(
                            index=event.output.index, data=data, last=True
                        ),
                    )
                )
        return out

    async def _linger(self) -> None:
        try:
            await asyncio.sleep(self.state.linger_s)
        except asyncio.CancelledError:
            self.state.generation_streams.append("cancelled")
            raise
        self.state.generation_streams.append("completed")

    async def ImageToImage(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        for event in await self._run(
            "ImageToImage", common_pb2.TASK_IMAGE_TO_IMAGE, request_iterator, context
        ):
            yield generation_service_pb2.ImageToImageResponse(event=event)
        await self._linger()

    async def ImageWithMask(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        for event in await self._run(
            "ImageWithMask", common_pb2.TASK_IMAGE_WITH_MASK, request_iterator, context
        ):
            yield generation_service_pb2.ImageWithMaskResponse(event=event)
        await self._linger()

    async def ImageUpscale(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        for event in await self._run(
            "ImageUpscale", common_pb2.TASK_IMAGE_UPSCALE, request_iterator, context
        ):
            yield generation_service_pb2.ImageUpscaleResponse(event=event)
        await self._linger()

    async def ImageToText(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        for event in await self._run(
            "ImageToText", common_pb2.TASK_IMAGE_TO_TEXT, request_iterator, context
        ):
            yield generation_service_pb2.ImageToTextResponse(event=event)
        await self._linger()


class Workflows(workflow_service_pb2_grpc.WorkflowServiceServicer):
    """RunWorkflow reads the whole upload, then knows no workflow (as a server without any)."""

    async def RunWorkflow(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        async for _ in request_iterator:
            pass
        await context.abort(grpc.StatusCode.NOT_FOUND, "the fake backend has no workflows")
        yield workflow_service_pb2.RunWorkflowResponse()  # never reached


class FakeBackend:
    def __init__(self) -> None:
        self.state = State()
        self.artifacts = Artifacts(self.state)
        self.port = 0
        self._server: Any = None

    async def start(self) -> int:
        server = grpc.aio.server()
        job_service_pb2_grpc.add_JobServiceServicer_to_server(Jobs(self.state), server)
        artifact_service_pb2_grpc.add_ArtifactServiceServicer_to_server(self.artifacts, server)
        generation_service_pb2_grpc.add_GenerationServiceServicer_to_server(
            Generation(self.state), server
        )
        workflow_service_pb2_grpc.add_WorkflowServiceServicer_to_server(Workflows(), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0.5)
