"""``ClientError``: a failed call (or a failed job) with its rich ``google.rpc.Status`` decoded."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2, status_pb2

__all__ = ["ClientError", "FieldViolation", "code_name", "guarded"]

_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_CODES_BY_NUMBER: dict[int, Any] = {code.value[0]: code for code in grpc.StatusCode}


def code_name(code: Any) -> str:
    """``INVALID_ARGUMENT`` for ``grpc.StatusCode.INVALID_ARGUMENT`` (or its number, 3)."""
    if isinstance(code, int):
        code = _CODES_BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    return str(code.name)


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad request field (``BadRequest.FieldViolation``): ``params.denoise``, why."""

    field: str
    description: str


class ClientError(Exception):
    """A call that failed, or a job that ended FAILED or CANCELLED.

    ``code`` is a ``grpc.StatusCode``; ``reason``, ``domain`` and ``metadata`` come from the
    status' ``ErrorInfo``, ``field_violations`` from ``BadRequest``, ``retry_delay`` (seconds)
    from ``RetryInfo``. ``str(err)`` is one readable line, e.g.
    ``INVALID_ARGUMENT: invalid parameters [INVALID_PARAMS] (params.denoise: must be ...)``.
    """

    def __init__(
        self,
        code: Any,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
        retry_delay: float | None = None,
        request_id: str = "",
    ) -> None:
        self.code: Any = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: tuple[FieldViolation, ...] = tuple(field_violations)
        self.retry_delay = retry_delay
        self.request_id = request_id
        super().__init__(self.one_line())

    @property
    def code_name(self) -> str:
        """The code's canonical name, e.g. ``NOT_FOUND``."""
        return code_name(self.code)

    def one_line(self) -> str:
        text = f"{self.code_name}: {self.message or '(no message)'}"
        if self.reason:
            text += f" [{self.reason}]"
        if self.field_violations:
            fields = "; ".join(f"{v.field}: {v.description}" for v in self.field_violations)
            text += f" ({fields})"
        if self.retry_delay is not None:
            text += f" retry in {self.retry_delay:g}s"
        return " ".join(text.split())  # one line, whatever the server put in the message

    def __str__(self) -> str:
        return self.one_line()

    def __repr__(self) -> str:
        return f"ClientError({self.one_line()!r})"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description."""
        return {
            "code": self.code_name,
            "message": self.message,
            "reason": self.reason,
            "domain": self.domain,
            "metadata": dict(self.metadata),
            "field_violations": [
                {"field": v.field, "description": v.description} for v in self.field_violations
            ],
            "retry_delay_s": self.retry_delay,
            "request_id": self.request_id,
        }

    @classmethod
    def from_status(cls, status: status_pb2.Status, *, request_id: str = "") -> ClientError:
        """From a ``google.rpc.Status`` (a failed job's ``error``, or a call's rich status)."""
        reason = domain = ""
        metadata: dict[str, str] = {}
        violations: list[FieldViolation] = []
        retry: float | None = None
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info_retry = error_details_pb2.RetryInfo()
                detail.Unpack(info_retry)
                retry = info_retry.retry_delay.ToNanoseconds() / 1e9
        return cls(
            _CODES_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN),
            status.message,
            reason=reason,
            domain=domain,
            metadata=metadata,
            field_violations=violations,
            retry_delay=retry,
            request_id=request_id,
        )

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> ClientError:
        """From a failed gRPC call; the rich status is read from the trailing metadata."""
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        trailers: dict[str, Any] = {}
        if hasattr(err, "trailing_metadata"):
            # types-grpcio types the items as objects with .key/.value; both the sync and the
            # aio calls hand out (key, value) pairs.
            pairs = cast("Iterable[tuple[str, Any]]", err.trailing_metadata() or ())
            trailers = dict(pairs)
        request_id = str(trailers.get("x-request-id", ""))
        raw = trailers.get(_STATUS_DETAILS_KEY)
        if isinstance(raw, bytes):
            try:
                status = status_pb2.Status.FromString(raw)
            except Exception:  # a garbled status: fall back to code and details
                status = None
            if status is not None and status.code == code.value[0]:
                return cls.from_status(status, request_id=request_id)
        return cls(code, details or "", request_id=request_id)


@contextmanager
def guarded(call: Any = None) -> Iterator[None]:
    """A failed gRPC call inside raises :class:`ClientError`; leaving ``call`` (a streaming
    call) unfinished, on an error or a consumer that stopped early, cancels it."""
    try:
        yield
    except grpc.RpcError as err:
        raise ClientError.from_rpc_error(err) from None
    finally:
        if call is not None and not call.done():
            call.cancel()
