"""AI Server's REST surface, as calls of the gRPC contract.

* ``POST /api/{Task}`` (and ServiceStack's ``/json/reply/{Task}``) for every upload RPC of the
  contract: the generative ones (their responses carry a ``JobEvent``) and the light ones
  (their responses are ``info`` then ``chunk``s). Generative tasks also get
  ``/api/Queue{Task}``. Multipart only: every task takes an image.

  - Generative, ``Sync=true``: the call runs with RESPONSE_MODE_RESULT and
    OUTPUT_DELIVERY_REFERENCES, a stream of ``finished`` alone (the answer is made of the
    final job; the bytes are fetched from ``/artifacts/...`` by the client, not streamed
    twice) and answers ``{jobId, refId, jobState, status, outputs: [{fileName,
    url}], textOutputs: [{text}], results: [{fileName, url, provider}]}`` with absolute URLs.
    A job that failed answers the HTTP status of its error with ``responseStatus``.
  - Generative, otherwise (or ``Queue...``): RESPONSE_MODE_ASYNC, answering at once with
    ``{jobId, refId, jobState, status, statusUrl}``.
  - Light (CropImage, ConvertImage): the image bytes, streamed as they come, with the
    Content-Type the server reports.

  Form fields match the params message case-insensitively (``PositivePrompt``,
  ``positivePrompt``, ``positive_prompt``; ``RefId``/``Tag``/``ReplyTo`` reach ``options``);
  ``Sync`` is AI Server's; fields the contract does not know are ignored, as ServiceStack
  ignores them. Query parameters are read too (before the form's). A ``ReplyTo`` header is
  taken when the form has none.
* ``GET /api/GetArtifactGenerationStatus`` / ``GetTextGenerationStatus`` with ``jobId`` or
  ``refId`` (JobService.GetJob / ListJobs).
* ``GET /artifacts/{path}`` (ArtifactService.GetArtifact + ReadArtifact: ETag, 304, Range,
  ``?download=true``) and ``GET /variants/{spec}/{path}`` (ArtifactService.GetVariant).
* ``GET /api/jobs/{id}/events``: JobService.WatchJob as Server-Sent Events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import grpc
from aiohttp import web
from google.protobuf import descriptor
from google.protobuf.message import Message
from imagetasks.v1 import common_pb2, job_pb2

from aiserver import fast_json
from aiserver.client._chunks import read_chunk
from aiserver.gateway.backend import Backend
from aiserver.gateway.connections import BodyDeadline
from aiserver.gateway.errors import (
    GatewayError,
    Violation,
    from_rpc_error,
    from_status_proto,
    invalid_fields,
)
from aiserver.gateway.fields import FieldError, FieldErrors, apply_fields, field_key, parse_bool
from aiserver.gateway.routes import Upload, message_class, upload_of
from aiserver.gateway.streams import event_field, first_message, stream_response, wants_sse
from aiserver.gateway.uploads import (
    FormFields,
    chunk_factory,
    media_type,
    send_multipart,
    write,
)

__all__ = [
    "BuildParams",
    "Compat",
    "CompatTask",
    "TaskParams",
    "compat_field_name",
    "compat_tasks",
    "require_multipart",
]

logger = logging.getLogger(__name__)

JOB_STATES = {
    job_pb2.Job.STATE_UNSPECIFIED: "Unknown",
    job_pb2.Job.STATE_QUEUED: "Queued",
    job_pb2.Job.STATE_RUNNING: "Started",
    job_pb2.Job.STATE_SUCCEEDED: "Completed",
    job_pb2.Job.STATE_FAILED: "Failed",
    job_pb2.Job.STATE_CANCELLED: "Cancelled",
}
_TEXT_TASKS = frozenset({common_pb2.TASK_IMAGE_TO_TEXT})
_STATUS_ROUTES = {
    "getartifactgenerationstatus": False,
    "gettextgenerationstatus": True,
}
_IMMUTABLE = "public, max-age=31536000, immutable"
_WHOLE_VARIANT_BYTES = 1024 * 1024
"""Variants up to this size (those the service holds in memory) are read whole, then sent."""
_GET_JOB = "imagetasks.v1.JobService.GetJob"
_LIST_JOBS = "imagetasks.v1.JobService.ListJobs"
_WATCH_JOB = "imagetasks.v1.JobService.WatchJob"
_GET_ARTIFACT = "imagetasks.v1.ArtifactService.GetArtifact"
_READ_ARTIFACT = "imagetasks.v1.ArtifactService.ReadArtifact"
_GET_VARIANT = "imagetasks.v1.ArtifactService.GetVariant"
_EOF = grpc.aio.EOF


@dataclass(frozen=True, slots=True)
class CompatTask:
    """One ``/api/{name}`` route: an upload RPC of the contract."""

    name: str
    method: descriptor.MethodDescriptor
    upload: Upload
    generative: bool
    """The response carries a JobEvent (a job); otherwise it is ``info`` + ``chunk``s."""
    queued: bool = False
    """The ``Queue{Task}`` variant: never waits."""


WORKFLOW_SERVICE = "imagetasks.v1.WorkflowService"


def _upload_tasks(
    files: Iterable[descriptor.FileDescriptor],
) -> Iterator[tuple[descriptor.ServiceDescriptor, CompatTask]]:
    """Every upload RPC whose answer is a job's events or ``info`` + ``chunk``s."""
    for file in files:
        for service in file.services_by_name.values():
            for method in service.methods:
                upload = upload_of(method) if method.client_streaming else None
                if upload is None or not method.server_streaming:
                    continue
                out = method.output_type.fields_by_name
                generative = event_field(method.output_type) is not None
                if not generative and not ("info" in out and "chunk" in out):
                    continue
                yield service, CompatTask(method.name, method, upload, generative)


def compat_tasks(files: Iterable[descriptor.FileDescriptor]) -> dict[str, CompatTask]:
    """The AI Server task routes, by lower-case name, derived from the upload RPCs.
    WorkflowService has none: its parameters are a Struct, which a flat form cannot carry;
    ``gateway.workflows`` serves ``/api/workflows/{name}`` with a typed form per workflow."""
    tasks: dict[str, CompatTask] = {}
    for service, task in _upload_tasks(files):
        if service.full_name == WORKFLOW_SERVICE:
            continue
        tasks[task.name.lower()] = task
        if task.generative:
            queued = f"Queue{task.name}"
            tasks[queued.lower()] = dataclasses.replace(task, name=queued, queued=True)
    return tasks


def workflow_task(files: Iterable[descriptor.FileDescriptor]) -> CompatTask | None:
    """RunWorkflow as an upload task, when the contract has WorkflowService."""
    for service, task in _upload_tasks(files):
        if service.full_name == WORKFLOW_SERVICE:
            return task
    return None


def compat_field_name(path: str) -> str:
    """A violation's proto path as AI Server names the field: ``params.width`` -> ``Width``,
    ``params.options.ref_id`` -> ``RefId``; input names (``image``) stay."""
    if not path.startswith("params."):
        return path
    rest = path.removeprefix("params.").removeprefix("options.")
    return ".".join("".join(w[:1].upper() + w[1:] for w in p.split("_")) for p in rest.split("."))


def content_disposition(kind: str, file_name: str) -> str:
    plain_already = file_name.isascii() and file_name.isprintable()
    if plain_already and '"' not in file_name and "\\" not in file_name:
        return f'{kind}; filename="{file_name or "file"}"'  # the usual name: no per-char walk
    plain = "".join(c for c in file_name if c.isascii() and c.isprintable() and c not in '"\\')
    value = f'{kind}; filename="{plain or "file"}"'
    if plain != file_name:
        value += f"; filename*=UTF-8''{quote(file_name, safe='')}"
    return value


def signed_access(request: web.BaseRequest) -> dict[str, Any]:
    """``expires`` and ``signature`` of a signed URL, as request fields (empty when absent)."""
    raw = request.query.get("expires", "")
    signature = request.query.get("signature", "")
    if not raw and not signature:
        return {}
    if raw and not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise GatewayError(
            400,
            "INVALID_PARAMETERS",
            "expires must be a Unix time in seconds",
            [Violation("expires", "INVALID_PARAMETERS", "not a Unix time in seconds")],
        )
    return {"expires": int(raw or 0), "signature": signature}


def cache_control(request: web.BaseRequest, signed: dict[str, Any]) -> str:
    """Immutable content; but a response to a key must not sit in shared caches, and one to a
    signed URL must not outlive the URL."""
    if signed:
        left = max(0, int(signed["expires"] - time.time()))
        return f"public, max-age={min(left, 31536000)}, immutable"
    if request.headers.get("Authorization"):
        return "private, max-age=31536000, immutable"
    return _IMMUTABLE


def etag_matches(header: str, etag: str) -> bool:
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """A single byte range as (first, last) inclusive; None to serve the whole (no range, a
    syntactically invalid one, or several). Raises GatewayError 416 when it cannot be met."""
    m = _RANGE.fullmatch(header.strip())
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise _unsatisfiable(size)
        return max(0, size - suffix), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None  # invalid: ignored, the whole is served
    if start >= size:
        raise _unsatisfiable(size)
    return start, min(end, size - 1)


def _unsatisfiable(size: int) -> GatewayError:
    return GatewayError(
        416,
        "RANGE_NOT_SATISFIABLE",
        f"the range is outside the artifact's {size} bytes",
        headers={"Content-Range": f"bytes */{size}"},
    )


def require_multipart(request: web.BaseRequest, what: str) -> None:
    """415 unless the body is a multipart form; ``what``: the route's sentence about it."""
    if media_type(request) != "multipart/form-data":
        raise GatewayError(
            415, "UNSUPPORTED_MEDIA_TYPE", f"{what}, not {request.content_type or 'no body'}"
        )


class TaskParams:
    """Builds a task's params message from form fields; remembers ``Sync``."""

    def __init__(self, task: CompatTask, request: web.BaseRequest) -> None:
        self.task = task
        self.sync = False
        self._reply_to = request.headers.get("ReplyTo", "")

    def build(self, items: Iterable[tuple[str, str]]) -> Message:
        task = self.task
        msg: Message = message_class(task.upload.params)()
        rest: list[tuple[str, str]] = []
        errors: list[FieldError] = []
        syncs = 0
        for name, value in items:
            if task.generative and field_key(name) == "sync":
                syncs += 1
                if syncs == 2:
                    errors.append(
                        FieldError(name, "DUPLICATE_FIELD", f"{name}: given twice; send it once")
                    )
                try:
                    self.sync = bool(parse_bool(value, name))
                except FieldError as exc:
                    errors.append(exc)
                continue
            rest.append((name, value))
        try:
            ignored = apply_fields(msg, rest, strict=False)
        except FieldErrors as exc:
            errors.extend(exc.errors)
            ignored = []
        if errors:
            raise invalid_fields(errors)
        if ignored:
            logger.debug("%s: ignored fields %s", task.name, ", ".join(ignored))
        options_field = task.upload.params.fields_by_name.get("options")
        if task.generative and options_field is not None:
            options: Any = getattr(msg, options_field.name)
            if self._reply_to and not options.reply_to:
                options.reply_to = self._reply_to
            sync = self.sync and not task.queued
            # RESULT, not SYNC: the answer is the final job's, and each event the call does
            # not stream saves the gateway a gRPC read (about 0.1 ms) and the server a write.
            options.mode = (
                common_pb2.RESPONSE_MODE_RESULT if sync else common_pb2.RESPONSE_MODE_ASYNC
            )
            options.delivery = common_pb2.OUTPUT_DELIVERY_REFERENCES
            self.sync = sync
        return msg


BuildParams = Callable[[TaskParams, FormFields], Message]
"""(the task's params builder, the form's fields) -> the params message."""


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # orjson (``fast_json``): a job's answer took the stdlib's encoder about 2% of the
    # separate gateway's CPU per job.
    return web.Response(
        status=status,
        body=fast_json.dumps(data),
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


class Compat:
    def __init__(self, backend: Backend, files: Iterable[descriptor.FileDescriptor]) -> None:
        self.backend = backend
        files = list(files)
        self.tasks = compat_tasks(files)
        self.workflow = workflow_task(files)
        """RunWorkflow, served per workflow by ``gateway.workflows``; None without the service."""
        self._draining: set[Any] = set()
        self._get_variant: tuple[Callable[..., Any], Callable[..., Any]] | None = None
        """Answered jobs' streams left to end: their calls, or the tasks reading them to
        their end (strong references: a grpc.aio call collected early is cancelled)."""

    # --- /api/{name} ----------------------------------------------------------------------

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        key = name.lower()
        if key in _STATUS_ROUTES:
            if request.method not in ("GET", "HEAD", "POST"):
                raise _not_allowed("GET, POST")
            return await self.status(request, text=_STATUS_ROUTES[key])
        task = self.tasks.get(key)
        if task is None:
            known = sorted({t.name for t in self.tasks.values()})
            raise GatewayError(
                404,
                "UNKNOWN_TASK",
                f"no task {name!r}; tasks: {', '.join(known)}",
                meta={"task": name},
            )
        if request.method != "POST":
            raise _not_allowed("POST")
        require_multipart(request, f"{task.name} takes multipart/form-data with an image file")
        return await self.run_task(request, task)

    async def run_task(
        self, request: web.Request, task: CompatTask, build: BuildParams | None = None
    ) -> web.StreamResponse:
        """The upload call of ``task`` from a multipart form (the caller has checked the
        media type), answered as AI Server answers. ``build`` makes the params message from
        the form's fields (a workflow's typed parameters); by default the fields are the
        params message's own (:class:`TaskParams`)."""
        backend = self.backend
        method = task.method
        multicallable = backend.callable(method)
        request_cls = message_class(method.input_type)
        params_name = task.upload.params_field.name
        metadata = backend.metadata(request)
        params = TaskParams(task, request)
        make = build or TaskParams.build

        async def open_call(items: list[tuple[str, str]]) -> Any:
            msg = make(params, items)
            timeout = backend.settings.sync_timeout_s if params.sync else None
            call = multicallable(metadata=metadata, timeout=timeout)
            await write(call, request_cls(**{params_name: msg}))
            return call

        with backend.uploads.slot(request):
            call = await send_multipart(
                request,
                open_call=open_call,
                chunk_message=chunk_factory(task.upload, request_cls),
                limits=backend.limits,
                initial=list(request.query.items()),
            )
        answered = False
        try:
            if not task.generative:
                return await self._image(request, call)
            response = await self._generation(request, task, call, sync=params.sync)
            self._drain_later(call)
            answered = True
            return response
        finally:
            if not answered and not call.done():
                call.cancel()

    def _drain_later(self, call: Any) -> None:
        """Let an answered job's stream end by itself. The answer needs nothing after
        ``finished`` (``accepted`` when queued); the call's status comes later, which neither
        this caller nor its connection's next request need wait for. The call is left to end
        rather than cancelled (a cancel is the job's caller leaving), within ``_DRAIN_S``; a
        stopping gateway cancels it with the watch streams.

        A grpc.aio call is only held until its status: grpc already waits for it (from the
        call's start), and nothing follows ``finished``/``accepted`` on the stream, so reading
        to its end would cost one more C-core batch (a read that can only say EOF), a task
        and a timeout per job. An in-process call (the embedded shim) is read to its end."""
        self.backend.long_lived.add(call)
        loop = asyncio.get_running_loop()
        if isinstance(call, grpc.aio.Call):
            timer = loop.call_later(_DRAIN_S, call.cancel)
            self._draining.add(call)

            def ended(done: Any) -> None:
                timer.cancel()
                self._draining.discard(done)

            call.add_done_callback(ended)
            return
        task = loop.create_task(_drain(call))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _generation(
        self, request: web.Request, task: CompatTask, call: Any, *, sync: bool
    ) -> web.StreamResponse:
        msg = await first_message(call, field_name=compat_field_name)
        if msg is None:
            raise _bad_upstream("the generation stream was empty")
        if sync:  # RESPONSE_MODE_RESULT: `finished` is all the stream carries
            while msg.event.WhichOneof("kind") != "finished":
                try:
                    msg = await call.read()
                except grpc.aio.AioRpcError as err:
                    raise from_rpc_error(err, field_name=compat_field_name) from None
                if msg is grpc.aio.EOF:
                    raise _bad_upstream("the generation stream ended before the job did")
            return self._finished(request, msg.event.finished.job)
        event = msg.event
        if event.WhichOneof("kind") != "accepted":
            raise _bad_upstream("the generation stream did not start with accepted")
        accepted = event.accepted
        job_id = event.job.removeprefix("jobs/")
        text = accepted.task in _TEXT_TASKS
        state = "Queued"
        if accepted.existing:
            job = await self._get_job(request, event.job)
            state = JOB_STATES.get(job.state, "Unknown")
        route = "GetTextGenerationStatus" if text else "GetArtifactGenerationStatus"
        base = self.backend.base_url(request)
        queued = {
            "jobId": job_id,
            "refId": accepted.ref_id,
            "jobState": state,
            "status": state,
            "statusUrl": f"{base}/api/{route}?jobId={quote(job_id, safe='')}",
        }
        return _json(queued)

    def _finished(self, request: web.Request, job: Any) -> web.Response:
        """A waited-for job's answer: its JSON, with the HTTP status of its error if any."""
        body = self.job_json(request, job, outputs=True, texts=True)
        status = 200
        if job.HasField("error") and job.error.code != 0:
            failure = from_status_proto(job.error, field_name=compat_field_name)
            status, body["responseStatus"] = failure.status, failure.response_status()
        elif job.state != job_pb2.Job.STATE_SUCCEEDED:
            status = 500
            body["responseStatus"] = GatewayError(
                500, "JOB_NOT_COMPLETED", f"the job ended {body['jobState']}"
            ).response_status()
        return _json(body, status)

    async def _image(self, request: web.Request, call: Any) -> web.StreamResponse:
        first = await first_message(call, field_name=compat_field_name)
        if first is None or first.WhichOneof("payload") != "info":
            raise _bad_upstream("the transform stream did not start with info")
        info = first.info
        headers = {
            "Content-Type": info.mime_type or "application/octet-stream",
            "Content-Disposition": content_disposition("inline", info.file_name or "image"),
            "X-Image-Width": str(info.width),
            "X-Image-Height": str(info.height),
        }
        response = web.StreamResponse(status=200, headers=headers)
        response.content_length = info.size_bytes
        await response.prepare(request)
        try:
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    break
                if msg.WhichOneof("payload") == "chunk":
                    await response.write(msg.chunk)
        except grpc.aio.AioRpcError as err:
            # Too late for a status: cut the connection so the client sees a short body.
            logger.warning("transform stream failed after its headers: %s", err.details())
            response.force_close()
            return response
        await response.write_eof()
        return response

    # --- status ---------------------------------------------------------------------------

    async def status(self, request: web.Request, *, text: bool) -> web.Response:
        values = await _simple_fields(request, self.backend.limits.deadline(request))
        job_id = values.get("jobid", "").strip()
        ref_id = values.get("refid", "").strip()
        if job_id:
            job = await self._get_job(request, job_id)
        elif ref_id:
            job = await self._by_ref(request, ref_id)
        else:
            raise GatewayError(
                400,
                "INVALID_PARAMETERS",
                "give jobId or refId",
                [
                    Violation("JobId", "REQUIRED", "jobId or refId is required"),
                    Violation("RefId", "REQUIRED", "jobId or refId is required"),
                ],
            )
        return _json(self.job_json(request, job, outputs=not text, texts=text))

    async def _get_job(self, request: web.BaseRequest, job_id: str) -> Any:
        name = job_id if job_id.startswith("jobs/") else f"jobs/{job_id}"
        method = self.backend.method(_GET_JOB)
        req = message_class(method.input_type)(name=name)
        resp = await self._unary(request, method, req)
        return resp.job

    async def _by_ref(self, request: web.BaseRequest, ref_id: str) -> Any:
        method = self.backend.method(_LIST_JOBS)
        req = message_class(method.input_type)(ref_id=ref_id, page_size=1)
        resp = await self._unary(request, method, req)
        if not resp.jobs:
            raise GatewayError(
                404, "JOB_NOT_FOUND", f"no job with refId {ref_id!r}", meta={"refId": ref_id}
            )
        return resp.jobs[0]

    async def _unary(self, request: web.BaseRequest, method: Any, req: Message) -> Any:
        try:
            return await self.backend.callable(method)(
                req,
                metadata=self.backend.metadata(request),
                timeout=self.backend.settings.unary_timeout_s,
            )
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, field_name=compat_field_name) from None

    def job_json(
        self, request: web.BaseRequest, job: Any, *, outputs: bool, texts: bool
    ) -> dict[str, Any]:
        state = JOB_STATES.get(job.state, "Unknown")
        body: dict[str, Any] = {
            "jobId": job.name.removeprefix("jobs/"),
            "refId": job.ref_id,
            "jobState": state,
            "status": state,
        }
        if outputs:
            absolute = self.backend.absolute
            body["outputs"] = [
                {"fileName": a.file_name, "url": absolute(request, a.url)} for a in job.outputs
            ]
            body["results"] = [
                {"fileName": a.file_name, "url": absolute(request, a.url), "provider": a.provider}
                for a in job.outputs
            ]
        if texts:
            body["textOutputs"] = [{"text": t.text} for t in job.text_outputs]
            if not outputs:
                body["results"] = [{"text": t.text} for t in job.text_outputs]
        if job.HasField("error") and job.error.code != 0:
            err = from_status_proto(job.error, field_name=compat_field_name)
            body["responseStatus"] = err.response_status()
        return body

    # --- artifacts, variants, events ------------------------------------------------------

    async def artifact(self, request: web.Request) -> web.StreamResponse:
        name = "artifacts/" + request.match_info["path"]
        backend = self.backend
        signed = signed_access(request)
        get = backend.method(_GET_ARTIFACT)
        meta = await self._unary(request, get, message_class(get.input_type)(name=name, **signed))
        art = meta.artifact
        etag = f'"{art.sha256}"'
        headers = {
            "ETag": etag,
            "Cache-Control": cache_control(request, signed),
            "Accept-Ranges": "bytes",
        }
        if art.HasField("create_time"):
            headers["Last-Modified"] = art.create_time.ToDatetime().strftime(
                "%a, %d %b %Y %H:%M:%S GMT"
            )
        if etag_matches(request.headers.get("If-None-Match", ""), etag):
            return web.Response(status=304, headers=headers)
        size = art.size_bytes
        span: tuple[int, int] | None = None
        range_header = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if range_header and (if_range is None or if_range.strip() == etag):
            try:
                span = parse_range(range_header, size)
            except GatewayError as err:
                err.headers.update(headers)
                raise
        download = (request.query.get("download") or "").lower() in ("true", "1", "yes")
        headers["Content-Type"] = art.mime_type or "application/octet-stream"
        headers["Content-Disposition"] = content_disposition(
            "attachment" if download else "inline", art.file_name or name.rsplit("/", 1)[-1]
        )
        status, offset, length = 200, 0, size
        if span is not None:
            status, offset, length = 206, span[0], span[1] - span[0] + 1
            headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{size}"
        if request.method == "HEAD":
            return await _head(request, status, headers, length)
        read = backend.method(_READ_ARTIFACT)
        req = message_class(read.input_type)(
            name=name, read_offset=offset, read_limit=length if span is not None else 0, **signed
        )
        # Each chunk a view of the received message (``read_chunk``), as the Python client
        # reads it: protobuf's parse and ``.data`` copied every MiB twice.
        call = backend.callable(read, read_chunk)(req, metadata=backend.metadata(request))
        return await self._relay_bytes(
            request, call, status, headers, length, "data", read_first=True
        )

    async def variant(self, request: web.Request) -> web.StreamResponse:
        # The warm variant's path (issue 15): each step here runs on every cached answer,
        # so it does only what the answer needs. The call's errors are the ``_errors``
        # middleware's to turn into HTTP (``from_rpc_error``, as ``first_message`` would).
        make, start = self._get_variant or self._variant_callable()
        query = request.query if request.query_string else None
        signed = signed_access(request) if query is not None else {}
        match = request.match_info
        req = make(name="artifacts/" + match["path"], spec=match["spec"], **signed)
        call = start(req, metadata=self.backend.metadata(request))
        try:
            first = await call.read()
            if first is _EOF or first.WhichOneof("payload") != "info":
                raise _bad_upstream("the variant stream did not start with info")
            info = first.info
            etag = f'"{info.etag}"'
            headers = {"ETag": etag, "Cache-Control": cache_control(request, signed)}
            if_none_match = request.headers.get("If-None-Match")
            if if_none_match and etag_matches(if_none_match, etag):
                return web.Response(status=304, headers=headers)
            image = info.image
            download = query is not None and _download(query)
            headers["Content-Type"] = image.mime_type or "application/octet-stream"
            headers["Content-Disposition"] = content_disposition(
                "attachment" if download else "inline", image.file_name or "variant"
            )
            size = image.size_bytes
            if request.method == "HEAD":
                return await _head(request, 200, headers, size)
            if size <= _WHOLE_VARIANT_BYTES:
                # Read whole, sent with its headers in one write (a warm variant: one chunk).
                rest = getattr(call, "read_rest", None)  # the in-process call's: one step
                if rest is not None:
                    parts = [msg.chunk for msg in await rest()]
                else:
                    parts = []
                    while (msg := await call.read()) is not _EOF:
                        parts.append(msg.chunk)
                body = b"".join(parts)
                if len(body) != size:
                    raise _bad_upstream(f"the stream carried {len(body)} bytes, not {size}")
                return web.Response(status=200, headers=headers, body=body)
            return await self._relay_bytes(
                request, call, 200, headers, size, "chunk", read_first=False
            )
        finally:
            if not call.done():
                call.cancel()

    def _variant_callable(self) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """GetVariant's request class and multi-callable, looked up once (the contract's
        descriptors do not change while the gateway runs)."""
        method = self.backend.method(_GET_VARIANT)
        found = (message_class(method.input_type), self.backend.callable(method))
        self._get_variant = found
        return found

    async def _relay_bytes(
        self,
        request: web.Request,
        call: Any,
        status: int,
        headers: dict[str, str],
        length: int,
        field: str,
        *,
        read_first: bool,
    ) -> web.StreamResponse:
        """Stream the bytes in ``field`` of each message. With ``read_first`` the headers go
        only once the first message (or the call's error) is in. A client that stops reading
        loses its connection (``send_watch``); the call ends with the handler."""
        try:
            first = await first_message(call) if read_first else None
            response = web.StreamResponse(status=status, headers=headers)
            response.content_length = length
            await response.prepare(request)
            try:
                if first is not None:
                    await response.write(getattr(first, field))
                while True:
                    msg = await call.read()
                    if msg is grpc.aio.EOF:
                        break
                    data = getattr(msg, field)
                    if data:
                        await response.write(data)
            except grpc.aio.AioRpcError as err:
                logger.warning("byte stream failed after its headers: %s", err.details())
                response.force_close()
                return response
            await response.write_eof()
            return response
        finally:
            if not call.done():
                call.cancel()

    async def events(self, request: web.Request) -> web.StreamResponse:
        backend = self.backend
        method = backend.method(_WATCH_JOB)
        job_id = request.match_info["id"]
        req = message_class(method.input_type)(name=f"jobs/{job_id}")
        call = backend.callable(method)(req, metadata=backend.metadata(request))
        backend.long_lived.add(call)
        return await stream_response(
            request,
            call,
            sse=wants_sse(request, default=True),
            keepalive_s=backend.settings.keepalive_s,
        )


def _download(query: Any) -> bool:
    """``?download=true`` (or 1, yes): the answer as an attachment."""
    return (query.get("download") or "").lower() in ("true", "1", "yes")


async def _head(
    request: web.Request, status: int, headers: dict[str, str], length: int
) -> web.StreamResponse:
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = length
    await response.prepare(request)
    await response.write_eof()
    return response


_DRAIN_S = 5.0
"""An answered job's stream that has not ended this long after its answer is cancelled."""


async def _drain(call: Any) -> None:
    """Read a stream to its end (it ends right after ``accepted``/``finished``), so that the
    call completes instead of being cancelled; its errors no longer matter. A stream that
    does not end within ``_DRAIN_S`` is cancelled."""
    try:
        async with asyncio.timeout(_DRAIN_S):
            while await call.read() is not grpc.aio.EOF:
                pass
    except (grpc.aio.AioRpcError, TimeoutError):
        pass
    finally:
        if not call.done():
            call.cancel()


def _not_allowed(allow: str) -> GatewayError:
    return GatewayError(405, "METHOD_NOT_ALLOWED", f"use {allow}", headers={"Allow": allow})


def _bad_upstream(message: str) -> GatewayError:
    return GatewayError(502, "BAD_UPSTREAM", message)


async def _simple_fields(request: web.Request, deadline: BodyDeadline) -> dict[str, str]:
    """Query, urlencoded/multipart form or a JSON object body, by lower-case name (each
    name once: a duplicate is 400 ``DUPLICATE_FIELD``)."""
    items = list(request.query.items())
    if request.method == "POST" and request.can_read_body:
        if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            form = await deadline.read(request.post())
            items += [(k, v) for k, v in form.items() if isinstance(v, str)]
        elif request.content_type.endswith("json"):
            try:
                body = json.loads(await deadline.read(request.read()) or b"{}")
            except (ValueError, UnicodeDecodeError):
                raise GatewayError(400, "INVALID_JSON", "the body is not JSON") from None
            if not isinstance(body, dict):
                raise GatewayError(400, "INVALID_JSON", "the body must be a JSON object")
            items += [(k, str(v)) for k, v in body.items() if v is not None]
    values: dict[str, str] = {}
    duplicates: list[FieldError] = []
    for name, value in items:
        if name.lower() in values:
            duplicates.append(FieldError(name, "DUPLICATE_FIELD", f"{name}: given twice"))
        values[name.lower()] = value
    if duplicates:
        raise invalid_fields(duplicates)
    return values
