"""gRPC statuses -> HTTP errors in AI Server's shape, in one place.

The body is ServiceStack's ``ResponseStatus``::

    {"responseStatus": {"errorCode": "...", "message": "...",
                        "errors": [{"fieldName": "...", "errorCode": "...", "message": "..."}],
                        "meta": {"grpcCode": "...", "domain": "...", ...ErrorInfo.metadata}}}

``errorCode`` is ``ErrorInfo.reason`` when the status carries one (else the gRPC code's name);
``errors`` are the ``BadRequest`` field violations. The HTTP status follows the mapping
documented in ``google/rpc/code.proto``, except for RESOURCE_EXHAUSTED: it is 429 ("come back
later") only when waiting can help, which the server says with ``RetryInfo`` (rate limits,
too many jobs or streams); without it the request itself is too big (an upload, an image's
pixels or frames, an output) and it is 413, since retrying it later cannot succeed.
An upload the server ended for stalling (DEADLINE_EXCEEDED ``UPLOAD_STALLED`` /
``UPLOAD_TOO_SLOW``) is 408, as the shim's own body deadlines answer: the client was slow, not
the server. ``RetryInfo`` becomes ``Retry-After``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2

__all__ = [
    "HTTP_STATUS",
    "FieldName",
    "GatewayError",
    "Violation",
    "from_rpc_error",
    "from_status_proto",
    "invalid_fields",
    "status_details",
]

HTTP_STATUS: Mapping[int, int] = {
    code_pb2.OK: 200,
    code_pb2.CANCELLED: 499,
    code_pb2.UNKNOWN: 500,
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.DEADLINE_EXCEEDED: 504,
    code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409,
    code_pb2.PERMISSION_DENIED: 403,
    code_pb2.UNAUTHENTICATED: 401,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.FAILED_PRECONDITION: 400,
    code_pb2.ABORTED: 409,
    code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNIMPLEMENTED: 501,
    code_pb2.INTERNAL: 500,
    code_pb2.UNAVAILABLE: 503,
    code_pb2.DATA_LOSS: 500,
}

_CLIENT_TOO_SLOW = frozenset({"UPLOAD_STALLED", "UPLOAD_TOO_SLOW"})

FieldName = Callable[[str], str]
"""Maps a violation's field path (``params.width``) to the name shown to the caller."""


@dataclass(frozen=True, slots=True)
class Violation:
    field_name: str
    error_code: str
    message: str


@dataclass(slots=True)
class GatewayError(Exception):
    """An HTTP error with an AI Server ``responseStatus`` body."""

    status: int
    error_code: str
    message: str
    errors: Sequence[Violation] = ()
    headers: dict[str, str] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        Exception.__init__(self, f"{self.status} {self.error_code}: {self.message}")

    def response_status(self) -> dict[str, Any]:
        body: dict[str, Any] = {"errorCode": self.error_code, "message": self.message}
        body["errors"] = [
            {"fieldName": v.field_name, "errorCode": v.error_code, "message": v.message}
            for v in self.errors
        ]
        if self.meta:
            body["meta"] = dict(self.meta)
        return body

    def body(self) -> dict[str, Any]:
        return {"responseStatus": self.response_status()}


def status_details(details: Iterable[Any]) -> dict[str, Any]:
    """ErrorInfo, BadRequest and RetryInfo among ``google.rpc.Status.details``, by type name."""
    found: dict[str, Any] = {}
    for packed in details:
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
        ):
            if packed.Is(cls.DESCRIPTOR):
                msg = cls()
                packed.Unpack(msg)
                found.setdefault(cls.DESCRIPTOR.name, msg)
    return found


def _code_name(code: int) -> str:
    try:
        return str(code_pb2.Code.Name(code))
    except ValueError:
        return "UNKNOWN"


def from_status_proto(
    status: status_pb2.Status, *, field_name: FieldName = lambda f: f
) -> GatewayError:
    return _build(status.code, status.message, status.details, field_name)


def from_rpc_error(
    err: grpc.aio.AioRpcError, *, field_name: FieldName = lambda f: f
) -> GatewayError:
    """The HTTP error for a failed call, from its rich status when it has one."""
    code = int(err.code().value[0])
    raw = None
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            raw = value
    if raw:
        try:
            status = status_pb2.Status.FromString(raw)
        except Exception:  # a malformed detail blob: fall back to the plain status
            status = None
        if status is not None and status.code == code:
            return from_status_proto(status, field_name=field_name)
    return _build(code, err.details() or "", (), field_name)


def _build(code: int, message: str, details: Iterable[Any], field_name: FieldName) -> GatewayError:
    found = status_details(details)
    info = found.get("ErrorInfo")
    reason = info.reason if info is not None and info.reason else _code_name(code)
    http = HTTP_STATUS.get(code, 500)
    retry = found.get("RetryInfo")
    if code == code_pb2.RESOURCE_EXHAUSTED and retry is None:
        http = 413
    elif code == code_pb2.DEADLINE_EXCEEDED and reason in _CLIENT_TOO_SLOW:
        http = 408
    violations: list[Violation] = []
    bad = found.get("BadRequest")
    if bad is not None:
        violations = [
            Violation(field_name(v.field), reason, v.description) for v in bad.field_violations
        ]
    headers: dict[str, str] = {}
    if retry is not None:
        delay = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
        headers["Retry-After"] = str(max(0, math.ceil(delay)))
    if http == 401:
        headers["WWW-Authenticate"] = "Bearer"
    meta = {"grpcCode": _code_name(code)}
    if info is not None:
        if info.domain:
            meta["domain"] = info.domain
        meta.update({k: str(v) for k, v in info.metadata.items() if k not in meta})
    return GatewayError(http, reason, message, violations, headers, meta)


def invalid_fields(errors: Iterable[Any], *, code: str = "INVALID_PARAMETERS") -> GatewayError:
    """A 400 for values the gateway could not put into the request (``fields.FieldError``)."""
    found = list(errors)
    return GatewayError(
        400,
        code,
        "; ".join(e.message for e in found),
        [Violation(e.name, e.reason, e.message) for e in found],
    )
