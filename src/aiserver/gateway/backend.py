"""The gateway's settings and its side of the gRPC channel: generic calls built from descriptors,
the metadata forwarded with each call, and request-derived facts (base URL, request id)."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from google.protobuf import descriptor, descriptor_pool

from aiserver.gateway.routes import message_class
from aiserver.gateway.uploads import ClientUploads, UploadLimits

if TYPE_CHECKING:
    from aiserver.config import Settings

__all__ = ["REQUEST_ID", "Backend", "GatewaySettings", "LocalCalls"]

REQUEST_ID = web.RequestKey("aiserver.gateway.request_id", str)
"""Key of the request id in an aiohttp request's mapping."""

_FORWARDED_HEADERS = ("authorization",)
SHIM_TOKEN_HEADER = "x-aiserver-shim"
"""The metadata key ``aiserver.api.guard`` knows its in-process shim by."""


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """How the HTTP shim behaves. Limits default to the service's own defaults."""

    public_base_url: str = ""
    """Absolute base of the URLs handed out (``outputs[].url``, ``statusUrl``); empty: taken
    from each request's scheme and Host."""
    trust_forwarded: bool = False
    """Take the base URL from ``X-Forwarded-Proto``/``X-Forwarded-Host`` (behind a proxy)."""
    max_upload_bytes: int = 64 * 1024 * 1024
    """Most file bytes one request may upload (413 past it)."""
    max_field_bytes: int = 64 * 1024
    """Largest single text field of a form."""
    max_form_bytes: int = 1024 * 1024
    """Most bytes of all text fields of a form together."""
    max_fields: int = 256
    max_files: int = 8
    """Most file parts of a form (AI Server's tasks take two at most: image and mask); one
    more is 413 ``TOO_MANY_FILES``."""
    chunk_bytes: int = 1024 * 1024
    """Size of the FileChunk messages sent upstream."""
    max_message_bytes: int = 4 * 1024 * 1024 + 64 * 1024
    """Largest gRPC message received; also the largest JSON request body."""
    unary_timeout_s: float = 30.0
    """Deadline of unary calls (GetJob, ListJobs, ...)."""
    sync_timeout_s: float | None = None
    """Deadline of a ``Sync=true`` generation; None: as long as the job takes (the server's
    own timeouts apply). Passing it cancels the job, as a gRPC deadline does."""
    keepalive_s: float = 15.0
    """An SSE comment is sent after this long without events."""
    spool_dir: Path | None = None
    """Where files sent before any text field are buffered; None: the system temp dir."""
    shutdown_grace_s: float = 5.0
    """How long in-flight requests may take to finish when the gateway stops."""
    body_idle_timeout_s: float = 30.0
    """A request body that sends nothing for this long ends with 408; an answer (download,
    stream, JSON) whose client takes nothing for this long is closed; 0: no limit."""
    body_timeout_s: float = 600.0
    """A request body still arriving after this long ends with 408; 0: no limit."""
    header_timeout_s: float = 15.0
    """A connection's request head must arrive within this long (also the keep-alive
    timeout between requests); 0: no limit."""
    max_uploads_per_client: int = 0
    """Uploads one client address may have open at once (429 + Retry-After); 0: no limit."""
    shim_token: str = field(default="", repr=False)
    """Sent as ``x-aiserver-shim`` metadata: the in-process service knows its own shim by it
    and leaves the per-address upload cap to it (the shim caps each HTTP client instead)."""

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> GatewaySettings:
        """The gateway settings that match a service's settings (limits, base URL)."""
        base = cls(
            public_base_url=settings.public_base_url,
            max_upload_bytes=settings.max_upload_bytes,
            chunk_bytes=settings.chunk_bytes,
            max_message_bytes=settings.max_message_bytes,
            shutdown_grace_s=settings.shutdown_grace_s,
            body_idle_timeout_s=settings.upload_idle_timeout_s,
            body_timeout_s=settings.upload_timeout_s,
            header_timeout_s=settings.http_header_timeout_s,
            max_uploads_per_client=settings.max_uploads_per_client,
        )
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown gateway settings: {', '.join(sorted(unknown))}")
        return replace(base, **overrides)

    @property
    def upload_limits(self) -> UploadLimits:
        return UploadLimits(
            max_upload_bytes=self.max_upload_bytes,
            max_field_bytes=self.max_field_bytes,
            max_form_bytes=self.max_form_bytes,
            max_fields=self.max_fields,
            max_files=self.max_files,
            chunk_bytes=self.chunk_bytes,
            max_message_bytes=self.max_message_bytes,
            spool_dir=self.spool_dir,
            idle_timeout_s=self.body_idle_timeout_s,
            total_timeout_s=self.body_timeout_s,
        )


def valid_request_id(value: str) -> bool:
    return 0 < len(value) <= 64 and value.isprintable() and value.isascii()


def request_id(request: web.BaseRequest) -> str:
    try:  # (asked three times per request: ``Mapping.get`` would be two calls each time)
        return request[REQUEST_ID]
    except KeyError:
        pass
    given = request.headers.get("X-Request-Id", "")
    rid = given if valid_request_id(given) else os.urandom(8).hex()  # uuid4: 10x the CPU
    request[REQUEST_ID] = rid
    return rid


class LocalCalls(Protocol):
    """Streaming methods the in-process service serves without the network, through its own
    interceptor and handlers (``aiserver.api.local_calls``): ``None`` for the others."""

    def unary_stream(
        self,
        path: str,
        request_serializer: Callable[[Any], bytes],
        response_deserializer: Callable[[bytes], Any],
    ) -> Any | None: ...

    def stream_stream(
        self,
        path: str,
        request_serializer: Callable[[Any], bytes],
        response_deserializer: Callable[[bytes], Any],
    ) -> Any | None: ...


class Backend:
    """Generic calls on one channel, by method descriptor; with ``local``, the methods it
    serves are called in process instead (the same handlers, interceptor and messages)."""

    def __init__(
        self,
        channel: Any,
        settings: GatewaySettings,
        pool: descriptor_pool.DescriptorPool | None = None,
        local: LocalCalls | None = None,
    ) -> None:
        self.local = local
        self.channel = channel
        self.settings = settings
        self.limits = settings.upload_limits
        self.uploads = ClientUploads(settings.max_uploads_per_client)
        """Uploads being read, per client address (the per-client cap)."""
        self._pool = pool or descriptor_pool.Default()
        self._callables: dict[object, Any] = {}
        self.long_lived: weakref.WeakSet[Any] = weakref.WeakSet()
        """Open watch streams: cancelled first when the gateway stops."""

    def method(self, full_name: str) -> descriptor.MethodDescriptor:
        return self._pool.FindMethodByName(full_name)

    def callable(
        self,
        method: descriptor.MethodDescriptor,
        deserializer: Callable[[bytes], Any] | None = None,
    ) -> Any:
        """The grpc.aio multi-callable for ``method`` (built once); ``deserializer`` reads
        the answers instead of the response class's ``FromString`` (a wire-form reader)."""
        key = method.full_name if deserializer is None else (method.full_name, deserializer)
        found = self._callables.get(key)
        if found is not None:
            return found
        path = f"/{method.containing_service.full_name}/{method.name}"
        req_cls = message_class(method.input_type)
        read = deserializer or message_class(method.output_type).FromString
        if self.local is not None and method.server_streaming:
            local = self.local.stream_stream if method.client_streaming else self.local.unary_stream
            made = local(path, req_cls.SerializeToString, read)
            if made is not None:
                self._callables[key] = made
                return made
        factory = {
            (False, False): self.channel.unary_unary,
            (False, True): self.channel.unary_stream,
            (True, False): self.channel.stream_unary,
            (True, True): self.channel.stream_stream,
        }[(bool(method.client_streaming), bool(method.server_streaming))]
        made = factory(
            path,
            request_serializer=req_cls.SerializeToString,
            response_deserializer=read,
        )
        self._callables[key] = made
        return made

    def metadata(self, request: web.BaseRequest) -> tuple[tuple[str, str], ...]:
        """``authorization`` and ``x-request-id`` as gRPC metadata."""
        md = [("x-request-id", request_id(request))]
        if self.settings.shim_token:
            md.append((SHIM_TOKEN_HEADER, self.settings.shim_token))
        for name in _FORWARDED_HEADERS:
            value = request.headers.get(name)
            if value:
                md.append((name, value))
        return tuple(md)

    def base_url(self, request: web.BaseRequest) -> str:
        if self.settings.public_base_url:
            return self.settings.public_base_url.rstrip("/")
        scheme, host = request.scheme, request.host
        if self.settings.trust_forwarded:
            scheme = request.headers.get("X-Forwarded-Proto", scheme).split(",")[0].strip()
            host = request.headers.get("X-Forwarded-Host", host).split(",")[0].strip()
        return f"{scheme}://{host}"

    def absolute(self, request: web.BaseRequest, url: str) -> str:
        if not url or url.startswith(("http://", "https://")):
            return url
        return self.base_url(request) + ("" if url.startswith("/") else "/") + url
