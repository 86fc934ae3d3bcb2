"""ServiceError builders shared by the imaging modules."""

from __future__ import annotations

from collections.abc import Iterable

from aiserver.errors import ErrorKind, FieldViolation, ServiceError

__all__ = ["field_error", "fields_error"]


def field_error(
    kind: ErrorKind, field: str, reason: str, message: str, **metadata: object
) -> ServiceError:
    """One violated field; ``metadata`` values are stringified for ``ErrorInfo``."""
    return fields_error(kind, reason, message, [(field, message)], **metadata)


def fields_error(
    kind: ErrorKind,
    reason: str,
    message: str,
    violations: Iterable[tuple[str, str]],
    **metadata: object,
) -> ServiceError:
    """Several violated fields sharing one reason."""
    items = tuple(FieldViolation(f, d) for f, d in violations)
    meta = {k: str(v) for k, v in metadata.items()}
    if items:
        meta.setdefault("field", items[0].field)
    return ServiceError(kind, reason, message, violations=items, metadata=meta)
