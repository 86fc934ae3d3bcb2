"""Parts of an HTTP request -> a request message, where the JSON mapping alone would accept
too much or explain too little: a JSON body must be an object (not ``null``, a number, an
array), its errors are one line without Python's internals, and a field the path sets may not
be given again in the query or the form."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from aiserver.gateway.errors import GatewayError, invalid_fields
from aiserver.gateway.fields import FieldError, resolve

__all__ = ["parse_json_body", "refuse_path_fields"]


def refuse_path_fields(
    msg: Message, items: Sequence[tuple[str, str]], variables: dict[str, str]
) -> None:
    """A field the path sets may not be given again (query or form): 400 DUPLICATE_FIELD."""
    if not variables:
        return
    errors = []
    for name, _ in items:
        path = resolve(msg.DESCRIPTOR, name, flat=False)
        if path is not None and ".".join(f.name for f in path) in variables:
            errors.append(FieldError(name, "DUPLICATE_FIELD", f"{name}: already set by the path"))
    if errors:
        raise invalid_fields(errors)


def parse_json_body(raw: bytes, msg: Message, body: str) -> None:
    """The JSON body into ``msg`` (all of it for ``body: "*"``, else into that field)."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GatewayError(400, "INVALID_JSON", f"the body is not valid JSON: {exc}") from None
    if body == "*" and not isinstance(value, dict):
        raise GatewayError(
            400,
            "INVALID_JSON",
            f"the body must be a JSON object ({msg.DESCRIPTOR.name}), not {_json_kind(value)}",
        )
    try:
        if body == "*":
            json_format.ParseDict(value, msg)
        else:
            json_format.ParseDict({msg.DESCRIPTOR.fields_by_name[body].json_name: value}, msg)
    except json_format.ParseError as exc:
        raise GatewayError(400, "INVALID_JSON", _first_line(str(exc))) from None
    except (TypeError, ValueError, AttributeError):  # protobuf's parser on odd shapes
        raise GatewayError(
            400, "INVALID_JSON", f"the body does not fit {msg.DESCRIPTOR.name}"
        ) from None


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string"}.get(
        type(value), "an array"
    )


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "invalid JSON"
