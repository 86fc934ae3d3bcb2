"""The HTTP gateway: an aiohttp application whose every route is a call on a gRPC channel.

Why aiohttp: one well-kept library gives both an asyncio HTTP server that embeds in a running
event loop (``AppRunner`` with ``handle_signals=False``: no signal handlers, no loop of its own)
and a streaming multipart reader (``MultipartReader``/``BodyPartReader.read_chunk``), so
uploads flow from the socket into the gRPC stream without being buffered whole; streamed
responses (image bytes, NDJSON, SSE) are plain ``StreamResponse`` writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from google.protobuf import descriptor, json_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiserver.gateway.backend import Backend, GatewaySettings, LocalCalls, request_id
from aiserver.gateway.compat import Compat, CompatTask
from aiserver.gateway.connections import GatewaySite
from aiserver.gateway.console import add_console_routes
from aiserver.gateway.errors import GatewayError, from_rpc_error, invalid_fields
from aiserver.gateway.fields import FieldError, FieldErrors, apply_fields, assign, resolve
from aiserver.gateway.messages import parse_json_body, refuse_path_fields
from aiserver.gateway.openapi import build_openapi
from aiserver.gateway.routes import (
    RouteMatch,
    RouteTable,
    contract_files,
    load_routes,
    message_class,
)
from aiserver.gateway.send_watch import slow_reader_middleware
from aiserver.gateway.streams import NDJSON, event_field, stream_response, wants_sse
from aiserver.gateway.uploads import (
    chunk_factory,
    media_type,
    send_multipart,
    send_ndjson,
    write,
)
from aiserver.gateway.workflows import WorkflowRoutes

__all__ = ["BACKEND", "OPENAPI", "ROUTES", "TASKS", "Gateway", "MetricsHandler", "build_app"]

logger = logging.getLogger(__name__)

BACKEND = web.AppKey("backend", Backend)
ROUTES = web.AppKey("routes", RouteTable)
TASKS = web.AppKey("compat_tasks", dict[str, CompatTask])
OPENAPI = web.AppKey("openapi", dict[str, Any])
_JSON_TYPES = ("application/json", "")

MetricsHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
"""Serves ``GET /metrics`` (given by the service the gateway runs in)."""


def _json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(data, ensure_ascii=False),
        content_type="application/json",
        headers=headers,
    )


_CLOSE_AFTER = frozenset({408, 413})
"""Statuses after which the rest of the request body is not read: the connection closes."""


def error_response(err: GatewayError) -> web.Response:
    response = _json_response(err.body(), err.status, err.headers)
    if err.status in _CLOSE_AFTER or err.headers.get("Connection") == "close":
        response.force_close()
    return response


_HTTP_CODES = {
    400: "BAD_REQUEST",
    404: "ROUTE_NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "REQUEST_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    request_id(request)
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except GatewayError as err:
        return error_response(err)
    except grpc.aio.AioRpcError as err:
        return error_response(from_rpc_error(err))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow",)}
        return error_response(
            GatewayError(
                exc.status,
                _HTTP_CODES.get(exc.status, f"HTTP_{exc.status}"),
                exc.reason,
                [],
                headers,
            )
        )
    except (asyncio.CancelledError, ConnectionError):
        raise
    except web.RequestPayloadError as exc:  # a body aiohttp cannot decode (bad gzip, chunks)
        error = GatewayError(
            400, "MALFORMED_BODY", f"the request body cannot be read: {_cause(exc)}"
        )
        error.headers["Connection"] = "close"
        return error_response(error)
    except HttpProcessingError as exc:  # aiohttp's parsers: a malformed request, not our fault
        return error_response(
            GatewayError(
                exc.code if 400 <= exc.code < 500 else 400,
                "MALFORMED_REQUEST",
                f"malformed request ({type(exc).__name__})",
            )
        )
    except Exception:
        logger.exception("gateway: %s %s failed", request.method, request.path)
        return error_response(GatewayError(500, "INTERNAL", "internal error; see the gateway log"))


def _cause(exc: BaseException) -> str:
    # aiohttp wraps the parser's error; name it, never quote the bytes.
    inner = exc.__cause__ or (exc.args[0] if exc.args else None)
    if isinstance(inner, BaseException):
        return type(inner).__name__
    return type(exc).__name__


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("X-Request-Id", request_id(request))


async def _fixed_route_methods(request: web.Request) -> list[str]:
    """The methods the gateway's own routes (``/healthz``, ``/openapi.json``, ...) take on
    this path: aiohttp hands a method they do not take to the catch-all, which is this one."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is request.match_info.route.resource:
            continue
        _, methods = await resource.resolve(request)
        allowed |= {m for m in methods if m != "*"}
    return sorted(allowed)


class _V1:
    """The routes of the ``google.api.http`` annotations."""

    def __init__(self, backend: Backend, table: RouteTable) -> None:
        self.backend = backend
        self.table = table

    async def handle(self, request: web.Request) -> web.StreamResponse:
        match, allowed = self.table.find(request.method, request.rel_url.raw_path)
        if match is None:
            if "GET" in allowed:
                allowed = sorted({*allowed, "HEAD"})  # HEAD is served as GET
            if allowed:
                raise GatewayError(
                    405,
                    "METHOD_NOT_ALLOWED",
                    f"{request.method} is not allowed on {request.path}",
                    headers={"Allow": ", ".join(allowed)},
                )
            allowed = await _fixed_route_methods(request)
            if allowed:
                raise GatewayError(
                    405,
                    "METHOD_NOT_ALLOWED",
                    f"{request.method} is not allowed on {request.path}",
                    headers={"Allow": ", ".join(allowed)},
                )
            raise GatewayError(
                404, "ROUTE_NOT_FOUND", f"no route for {request.method} {request.path}"
            )
        method = match.route.method
        backend = self.backend
        multicallable = backend.callable(method)
        metadata = backend.metadata(request)
        if method.client_streaming:
            call = await self._upload(request, match, multicallable, metadata)
        else:
            msg = await self._request_message(request, match)
            if not method.server_streaming:
                try:
                    resp = await multicallable(
                        msg, metadata=metadata, timeout=backend.settings.unary_timeout_s
                    )
                except grpc.aio.AioRpcError as err:
                    raise from_rpc_error(err) from None
                return self._unary_response(resp, match)
            call = multicallable(msg, metadata=metadata)
            # Streams with no end of their own (job events; WatchJobs, WatchAgents) are cut
            # at shutdown instead of holding it up for the whole grace period.
            if event_field(method.output_type) is not None or method.name.startswith("Watch"):
                backend.long_lived.add(call)
        try:
            if method.server_streaming:
                return await stream_response(
                    request,
                    call,
                    sse=wants_sse(request),
                    keepalive_s=backend.settings.keepalive_s,
                )
            try:
                resp = await call
            except grpc.aio.AioRpcError as err:
                raise from_rpc_error(err) from None
            return self._unary_response(resp, match)
        finally:
            if not call.done():
                call.cancel()

    def _unary_response(self, resp: Message, match: RouteMatch) -> web.Response:
        body = match.route.response_body
        if body:
            value = json_format.MessageToDict(resp).get(
                resp.DESCRIPTOR.fields_by_name[body].json_name
            )
            return _json_response(value)
        return _json_response(json_format.MessageToDict(resp))

    async def _request_message(self, request: web.Request, match: RouteMatch) -> Message:
        route = match.route
        msg: Message = message_class(route.method.input_type)()
        if route.body:
            raw = await self.backend.limits.deadline(request).read(request.read())
            if raw.strip():
                ctype = request.content_type
                if ctype not in _JSON_TYPES and not ctype.endswith("+json"):
                    raise GatewayError(
                        415, "UNSUPPORTED_MEDIA_TYPE", f"expected application/json, not {ctype}"
                    )
                parse_json_body(raw, msg, route.body)
        if route.body != "*":
            items = [(k, v) for k, v in request.query.items() if k != route.body]
            refuse_path_fields(msg, items, match.variables)
            try:
                apply_fields(msg, items, strict=True, flat=False)
            except FieldErrors as exc:
                raise invalid_fields(exc.errors) from None
        self._bind(msg, match.variables)
        return msg

    @staticmethod
    def _bind(msg: Message, variables: dict[str, str]) -> None:
        for field_path, value in variables.items():
            path = resolve(msg.DESCRIPTOR, field_path, flat=False)
            if path is None:  # the annotation names a field the message lacks: a contract bug
                raise GatewayError(500, "BAD_ROUTE", f"no field {field_path} for the path")
            try:
                assign(msg, path, [value], field_path)
            except FieldError as exc:
                raise invalid_fields([exc]) from None

    async def _upload(
        self,
        request: web.Request,
        match: RouteMatch,
        multicallable: Any,
        metadata: Sequence[tuple[str, str]],
    ) -> Any:
        route = match.route
        backend = self.backend
        request_cls = message_class(route.method.input_type)
        ctype = media_type(request)
        upload = route.upload
        if ctype == "multipart/form-data" and upload is not None:
            params_cls = message_class(upload.params)

            async def open_call(items: list[tuple[str, str]]) -> Any:
                params: Message = params_cls()
                refuse_path_fields(params, items, match.variables)
                try:
                    apply_fields(params, items, strict=True)
                except FieldErrors as exc:
                    raise invalid_fields(exc.errors) from None
                self._bind(params, match.variables)
                call = multicallable(metadata=metadata)
                await write(call, request_cls(**{upload.params_field.name: params}))
                return call

            with backend.uploads.slot(request):
                return await send_multipart(
                    request,
                    open_call=open_call,
                    chunk_message=chunk_factory(upload, request_cls),
                    limits=backend.limits,
                    initial=list(request.query.items()),
                )
        if ctype in (NDJSON, "application/json", "application/jsonl"):
            with backend.uploads.slot(request):
                return await send_ndjson(
                    request,
                    call=multicallable(metadata=metadata),
                    request_cls=request_cls,
                    limits=backend.limits,
                )
        accepted = "multipart/form-data or " if upload is not None else ""
        raise GatewayError(
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            f"{route.method.name} takes {accepted}{NDJSON}, not {ctype or 'no body'}",
        )


def build_app(
    backend: Backend,
    files: Sequence[descriptor.FileDescriptor] | None = None,
    *,
    metrics: MetricsHandler | None = None,
) -> web.Application:
    """The aiohttp application for ``backend``; ``files``: the contract (default: every
    generated ``imagetasks.v1`` module); ``metrics``: the handler of ``/metrics``, if any."""
    files = list(files) if files is not None else contract_files()
    table = RouteTable(load_routes(files))
    compat = Compat(backend, files)
    v1 = _V1(backend, table)
    document = build_openapi(table, compat.tasks)
    openapi_body = json.dumps(document, ensure_ascii=False)

    workflows = WorkflowRoutes(backend, compat)

    async def openapi(request: web.Request) -> web.Response:
        if compat.workflow is None:
            return web.Response(text=openapi_body, content_type="application/json")
        fresh = await workflows.openapi(request, document)  # follows the workflows folder
        return web.Response(
            text=json.dumps(fresh, ensure_ascii=False), content_type="application/json"
        )

    async def health(request: web.Request) -> web.Response:
        stub = health_pb2_grpc.HealthStub(backend.channel)
        try:
            resp = await stub.Check(
                health_pb2.HealthCheckRequest(service=request.query.get("service", "")),
                timeout=backend.settings.unary_timeout_s,
            )
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        serving = resp.status == health_pb2.HealthCheckResponse.SERVING
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        return _json_response({"status": name}, 200 if serving else 503)

    # Outermost: it also writes the whole (JSON) bodies the inner ones return.
    watch = slow_reader_middleware(backend.settings.body_idle_timeout_s)
    app = web.Application(
        middlewares=[watch, _errors], client_max_size=backend.settings.max_message_bytes
    )
    app[BACKEND] = backend
    app[ROUTES] = table
    app[TASKS] = compat.tasks
    app[OPENAPI] = document
    app.on_response_prepare.append(_on_prepare)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/healthz", health)
    if metrics is not None:
        app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/jobs/{id}/events", compat.events)
    if compat.workflow is not None:
        app.router.add_post("/api/workflows/{workflow}", workflows.run)
    for prefix in ("/api", "/json/reply"):
        app.router.add_route("*", prefix + "/{name}", compat.dispatch)
    app.router.add_get("/artifacts/{path:.+}", compat.artifact)
    app.router.add_get("/variants/{spec}/{path:.+}", compat.variant)
    add_console_routes(app)
    app.router.add_route("*", "/{tail:.*}", v1.handle)
    return app


class _ParserErrorsAreWarnings(logging.Filter):
    """aiohttp logs a request it cannot parse (a line too long, a bad header, a body that is
    not the gzip it claims, while draining it) as an ERROR with a traceback quoting the
    request's bytes. It is the client's mistake, answered with a 400:
    logged as a one-line warning instead, without the bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (HttpProcessingError, web.RequestPayloadError)):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "malformed HTTP request refused: %s", (type(exc).__name__,)
            record.exc_info = record.exc_text = None
        return True


_PARSER_FILTER = _ParserErrorsAreWarnings()


class Gateway:
    """The HTTP shim in front of the gRPC service at ``target``.

    ``await start()`` binds and returns the port (``port=0`` picks a free one); ``await
    stop()`` stops accepting, cancels open watch streams, gives other requests
    ``settings.shutdown_grace_s`` to finish and closes the channel (unless it was given).
    Runs in the caller's event loop; installs no signal handlers. ``local_calls``: given by
    the service the gateway runs in, the methods it serves in process (warm variants).
    """

    def __init__(
        self,
        target: str,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        settings: GatewaySettings | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel: Any = None,
        metrics: MetricsHandler | None = None,
        local_calls: LocalCalls | None = None,
    ) -> None:
        self.target = target
        self._local_calls = local_calls
        self.host = host
        self.port = port
        self.settings = settings or GatewaySettings()
        self._credentials = credentials
        self._given_channel = channel
        self._metrics = metrics
        self._channel: Any = None
        self._runner: web.AppRunner | None = None
        self.app: web.Application | None = None
        self.backend: Backend | None = None

    @property
    def routes(self) -> RouteTable:
        """The routes derived from the annotations (after ``start``)."""
        if self.app is None:
            raise RuntimeError("the gateway is not started")
        return self.app[ROUTES]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _open_channel(self) -> Any:
        options = [
            ("grpc.max_receive_message_length", self.settings.max_message_bytes),
            ("grpc.max_send_message_length", self.settings.max_message_bytes),
        ]
        if self._credentials is not None:
            return grpc.aio.secure_channel(self.target, self._credentials, options=options)
        return grpc.aio.insecure_channel(self.target, options=options)

    async def start(self) -> int:
        if self._runner is not None:
            raise RuntimeError("the gateway is already started")
        logging.getLogger("aiohttp.server").addFilter(_PARSER_FILTER)  # once: filters are a set
        self._channel = self._given_channel or self._open_channel()
        self.backend = Backend(self._channel, self.settings, local=self._local_calls)
        self.app = build_app(self.backend, metrics=self._metrics)
        self.app.on_shutdown.append(self._cancel_watches)
        head_timeout = self.settings.header_timeout_s
        runner = web.AppRunner(
            self.app,
            handle_signals=False,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=self.settings.shutdown_grace_s,
            # Idle keep-alive connections, and heads after the first, wait this long at most.
            keepalive_timeout=head_timeout if head_timeout > 0 else 75.0,
            # After an early answer (413, 408), unread body bytes are drained this long only.
            lingering_time=1.0,
        )
        await runner.setup()
        site = GatewaySite(runner, self.host, self.port, head_timeout_s=head_timeout)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        logger.info("HTTP gateway on %s -> gRPC %s", self.url, self.target)
        return self.port

    async def _cancel_watches(self, _app: web.Application) -> None:
        if self.backend is not None:
            for call in list(self.backend.long_lived):
                call.cancel()

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self._channel is not None and self._given_channel is None:
            await self._channel.close()
        self._channel = None
