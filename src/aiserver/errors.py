"""Domain errors: what went wrong, in terms any transport can map.

Domain code raises :class:`ServiceError`; only ``aiserver.api.status`` turns it into a
``google.rpc.Status``. Nothing here imports grpc.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["DOMAIN", "ErrorKind", "FieldViolation", "ServiceError", "invalid_argument"]

#: ``ErrorInfo.domain`` of every error this service raises.
DOMAIN = "aiserver.imagetasks.v1"


class ErrorKind(enum.Enum):
    """Canonical error classes; names match ``google.rpc.Code``."""

    CANCELLED = "CANCELLED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field: ``field`` is a dotted path into the request (``params.width``)."""

    field: str
    description: str


@dataclass(slots=True)
class ServiceError(Exception):
    """An error with a canonical kind, a machine-readable reason and field details."""

    kind: ErrorKind
    reason: str
    """UPPER_SNAKE_CASE, stable: clients switch on it (``ErrorInfo.reason``)."""
    message: str
    violations: Sequence[FieldViolation] = field(default_factory=tuple)
    metadata: Mapping[str, str] = field(default_factory=dict)
    retry_after_s: float | None = None
    """Set for RESOURCE_EXHAUSTED/UNAVAILABLE when a retry can succeed later."""

    def __post_init__(self) -> None:
        Exception.__init__(self, self.message)

    def __str__(self) -> str:
        return f"{self.kind.value} {self.reason}: {self.message}"


def invalid_argument(field_path: str, reason: str, message: str) -> ServiceError:
    """The usual validation error: one field, one reason."""
    return ServiceError(
        ErrorKind.INVALID_ARGUMENT,
        reason,
        message,
        violations=(FieldViolation(field_path, message),),
        metadata={"field": field_path},
    )
