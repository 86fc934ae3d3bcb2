"""JSON-ready forms of the parts of a job record that are not plain columns.

The store keeps these as JSON text; keys are short but readable so a database can be inspected
by hand. Decoders ignore unknown keys so an older server can read rows a newer one wrote.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from aiserver.errors import ErrorKind, FieldViolation, ServiceError
from aiserver.jobs.model import ArtifactRef, InputRef, Retrying, WebhookDelivery

__all__ = [
    "decode_error",
    "decode_inputs",
    "decode_outputs",
    "decode_retries",
    "decode_webhook",
    "encode_error",
    "encode_inputs",
    "encode_outputs",
    "encode_retries",
    "encode_webhook",
    "from_micros",
    "to_micros",
]


def to_micros(when: datetime) -> int:
    """Microseconds since the epoch: exact, and orders correctly as an SQLite integer."""
    delta = when - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(micros: int) -> datetime:
    seconds, rest = divmod(micros, 1_000_000)
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=rest)


def encode_error(error: ServiceError | None) -> dict[str, Any] | None:
    if error is None:
        return None
    return {
        "kind": error.kind.value,
        "reason": error.reason,
        "message": error.message,
        "violations": [{"field": v.field, "description": v.description} for v in error.violations],
        "metadata": dict(error.metadata),
        "retry_after_s": error.retry_after_s,
    }


def decode_error(data: Mapping[str, Any] | None) -> ServiceError | None:
    if data is None:
        return None
    return ServiceError(
        ErrorKind(data["kind"]),
        data["reason"],
        data["message"],
        violations=tuple(
            FieldViolation(v["field"], v["description"]) for v in data.get("violations", ())
        ),
        metadata=dict(data.get("metadata", {})),
        retry_after_s=data.get("retry_after_s"),
    )


def encode_inputs(inputs: Sequence[InputRef]) -> list[dict[str, Any]]:
    return [_encode_input(i) for i in inputs]


def _encode_input(i: InputRef) -> dict[str, Any]:
    encoded = {
        "field": i.field,
        "file_name": i.file_name,
        "sha256": i.sha256,
        "size_bytes": i.size_bytes,
        "mime_type": i.mime_type,
        "width": i.width,
        "height": i.height,
    }
    if i.stored:  # only then: rows written before the flag existed read the same
        encoded["stored"] = True
    return encoded


def decode_inputs(data: Sequence[Mapping[str, Any]]) -> list[InputRef]:
    return [
        InputRef(
            field=d["field"],
            file_name=d["file_name"],
            sha256=d["sha256"],
            size_bytes=d["size_bytes"],
            mime_type=d["mime_type"],
            width=d["width"],
            height=d["height"],
            stored=d.get("stored", False),
        )
        for d in data
    ]


def encode_outputs(outputs: Sequence[ArtifactRef]) -> list[dict[str, Any]]:
    return [
        {
            "name": o.name,
            "url": o.url,
            "file_name": o.file_name,
            "mime_type": o.mime_type,
            "width": o.width,
            "height": o.height,
            "size_bytes": o.size_bytes,
            "sha256": o.sha256,
            "seed": o.seed,
            "provider": o.provider,
            "created_us": to_micros(o.created),
            "job_id": o.job_id,
        }
        for o in outputs
    ]


def decode_outputs(data: Sequence[Mapping[str, Any]]) -> list[ArtifactRef]:
    return [
        ArtifactRef(
            name=d["name"],
            url=d["url"],
            file_name=d["file_name"],
            mime_type=d["mime_type"],
            width=d["width"],
            height=d["height"],
            size_bytes=d["size_bytes"],
            sha256=d["sha256"],
            seed=d.get("seed"),
            provider=d.get("provider", ""),
            created=from_micros(d["created_us"]),
            job_id=d["job_id"],
        )
        for d in data
    ]


def encode_retries(retries: Sequence[Retrying]) -> list[dict[str, Any]]:
    return [{"attempt": r.attempt, "reason": r.reason, "agent": r.agent} for r in retries]


def decode_retries(data: Sequence[Mapping[str, Any]]) -> list[Retrying]:
    return [Retrying(d["attempt"], d["reason"], d.get("agent", "")) for d in data]


def encode_webhook(delivery: WebhookDelivery) -> dict[str, Any]:
    return {
        "state": delivery.state,
        "attempts": delivery.attempts,
        "http_status": delivery.http_status,
        "error": delivery.error,
        "ended_us": to_micros(delivery.ended),
    }


def decode_webhook(data: Mapping[str, Any] | None) -> WebhookDelivery | None:
    if data is None:
        return None
    return WebhookDelivery(
        state=data["state"],
        attempts=data["attempts"],
        http_status=data.get("http_status"),
        error=data.get("error", ""),
        ended=from_micros(data["ended_us"]),
    )
