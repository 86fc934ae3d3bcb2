"""Request checks from the contract: the ``buf.validate`` annotations in the protos.

The limits live once, in the protos (the OpenAPI document carries them too); protovalidate
enforces them here. Its validator compiles a message type's rules (CEL included) on first use
and caches them, so one module-level instance serves every call. Violations become the usual
INVALID_ARGUMENT with an ErrorInfo reason and a BadRequest violation per field; the reason is
the one callers got before the limits moved into the contract (see :data:`_REASONS`).

What no annotation can say stays in code: limits from the server's configuration (prompt
length, batch size, variant side), cross-checks against the image (crop bounds) and names
that must resolve (models, presets).
"""

from __future__ import annotations

from collections.abc import Mapping

import protovalidate
from google.protobuf.message import Message

from aiserver.errors import ErrorKind, FieldViolation, ServiceError

__all__ = ["check_request", "violations_of"]

_VALIDATOR = protovalidate.Validator()

_GENERATIVE = (
    "ImageToImageParams",
    "ImageWithMaskParams",
    "ImageUpscaleParams",
    "ImageToTextParams",
)
_JOB_NAMES = ("GetJobRequest", "WatchJobRequest", "CancelJobRequest")

# The reason of a violation: by message, then by the violated field's path (the longest
# matching prefix wins; "" is the message's default) or "path#rule_id" for one rule.
_REASONS: Mapping[str, Mapping[str, str]] = {
    **{
        f"imagetasks.v1.{name}": {"": "INVALID_PARAMETERS", "options.reply_to": "INVALID_REPLY_TO"}
        for name in _GENERATIVE
    },
    "imagetasks.v1.CropImageParams": {
        "": "INVALID_CROP",
        "x": "CROP_OUT_OF_BOUNDS",
        "y": "CROP_OUT_OF_BOUNDS",
        "quality": "INVALID_QUALITY",
        "output_format": "UNSUPPORTED_FORMAT",
    },
    "imagetasks.v1.ConvertImageParams": {
        "": "INVALID_PARAMETERS",
        "quality": "INVALID_QUALITY",
        "output_format": "UNSUPPORTED_FORMAT",
        "output_format#required": "MISSING_FORMAT",
    },
    **{f"imagetasks.v1.{name}": {"": "INVALID_NAME"} for name in _JOB_NAMES},
    "imagetasks.v1.ListJobsRequest": {
        "": "INVALID_ARGUMENT",
        "page_size": "INVALID_PAGE_SIZE",
        "states": "UNKNOWN_STATE",
        "task": "UNKNOWN_TASK",
    },
    "imagetasks.v1.GetArtifactRequest": {"": "INVALID_ARTIFACT_NAME"},
    "imagetasks.v1.ReadArtifactRequest": {"": "INVALID_RANGE", "name": "INVALID_ARTIFACT_NAME"},
    "imagetasks.v1.GetVariantRequest": {
        "": "INVALID_VARIANT_SPEC",
        "name": "INVALID_ARTIFACT_NAME",
    },
}


# Message-level (CEL) rules have no field of their own: the field they are reported on.
_RULE_FIELDS: Mapping[str, str] = {
    "variant.spec_or_fields": "spec",
    "variant.spec_and_preset": "preset",
}


_VALID: dict[tuple[str, bytes], None] = {}
"""Small messages found valid, by type and deterministic encoding: a job's params are mostly
the same few messages, and protovalidate walks every rule of the type each time (6.7 µs for
ImageUpscaleParams here, against 0.7 µs to encode and look up). No rule of the contract reads
the clock, so the encoding alone decides. Emptied when full."""
_VALID_MAX = 4096
_VALID_MAX_BYTES = 256


def violations_of(message: Message) -> list[tuple[str, str, str]]:
    """(field path, rule id, description) of each rule ``message`` breaks; empty when valid."""
    key = None
    if message.ByteSize() <= _VALID_MAX_BYTES:  # larger ones are not worth encoding
        key = (message.DESCRIPTOR.full_name, message.SerializeToString(deterministic=True))
    if key is not None and key in _VALID:
        return []
    found = []
    for v in _VALIDATOR.collect_violations(message):
        proto = v.proto
        elements = proto.field.elements if proto.field is not None else []
        path = ".".join(e.field_name for e in elements)
        found.append((path or _RULE_FIELDS.get(proto.rule_id, ""), proto.rule_id, proto.message))
    if not found and key is not None:
        if len(_VALID) >= _VALID_MAX:
            _VALID.clear()
        _VALID[key] = None
    return found


def _reason(message: Message, path: str, rule_id: str) -> str:
    table = _REASONS.get(message.DESCRIPTOR.full_name, {})
    if f"{path}#{rule_id}" in table:
        return table[f"{path}#{rule_id}"]
    best = ""
    for key in table:
        if "#" not in key and (path == key or path.startswith(key + ".")) and len(key) > len(best):
            best = key
    return table.get(best, "INVALID_ARGUMENT")


def check_request(message: Message, prefix: str = "") -> None:
    """INVALID_ARGUMENT when ``message`` breaks a rule of the contract.

    ``prefix`` places the message in the request (``params.`` for an upload's parameters),
    so field paths read as they always have (``params.quality``)."""
    found = violations_of(message)
    if not found:
        return
    path, rule_id, _text = found[0]
    violations = tuple(FieldViolation(f"{prefix}{p}", text) for p, _rule, text in found)
    summary = "; ".join(f"{v.field} {v.description}" for v in violations)
    fields = ",".join(dict.fromkeys(v.field for v in violations))
    raise ServiceError(
        ErrorKind.INVALID_ARGUMENT,
        _reason(message, path, rule_id),
        f"invalid request: {summary}",
        violations=violations,
        metadata={"fields" if "," in fields else "field": fields},
    )
