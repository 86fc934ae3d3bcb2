"""Text values (query parameters, form fields) onto protobuf messages, by descriptor.

Names match case-insensitively against a field's proto name (``positive_prompt``), its JSON
name (``positivePrompt``) and the proto name without underscores (``PositivePrompt``). A dotted
name walks into message fields (``options.ref_id``); a plain name that is not a field of the
message is looked up one level down, in its singular message fields, so that AI Server's flat
``RefId``/``Tag``/``ReplyTo`` reach ``options.ref_id`` and friends.

Values are read as protobuf's JSON mapping spells scalars in strings (numbers in decimal, 64-bit
integers as strings, bytes in base64, enums by name or number, ``true``/``false``), plus what
AI Server's clients send: any case for booleans and enum names, ``1``/``0``/``yes``/``no``, enum
names without their type prefix (``webp`` for ``IMAGE_FORMAT_WEBP``, ``red`` for
``MASK_CHANNEL_RED``) and the common aliases ``jpg`` and ``tif``.

The policy (the README's HTTP section says the same to callers), all refusals 400 naming the
field:

* Numbers are ASCII: an optional ``-`` or ``+``, digits, and for floating-point fields one
  ``.`` and an exponent; no spaces, no ``_`` separators, no other scripts' digits (``٣``), no
  ``nan``/``inf`` (``INVALID_VALUE``).
* An empty value is refused for every non-string field (``INVALID_VALUE``): leave the field
  out to mean its default. A string field may be empty.
* A field given twice (in any spelling, in the query and the form alike) is refused
  (``DUPLICATE_FIELD``) unless it is a list (a ``repeated`` field), which takes every value.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor, json_format
from google.protobuf.message import Message

__all__ = [
    "FieldError",
    "FieldErrors",
    "apply_fields",
    "assign",
    "enum_of",
    "enum_value",
    "field_key",
    "is_map",
    "is_repeated",
    "msg_type",
    "parse_bool",
    "resolve",
    "short_enum_names",
]

FD = descriptor.FieldDescriptor

_INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
_INTEGER = re.compile(r"[-+]?[0-9]+", re.ASCII)
_FLOAT = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?", re.ASCII)
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_ENUM_ALIASES = {"jpg": "jpeg", "tif": "tiff"}


@dataclass(slots=True)
class FieldError(Exception):
    """A value that cannot be put into a field; ``name`` is the name the caller used."""

    name: str
    reason: str
    message: str

    def __post_init__(self) -> None:
        Exception.__init__(self, self.message)


class FieldErrors(Exception):
    """Every bad value of one request."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        super().__init__("; ".join(e.message for e in errors))
        self.errors = list(errors)


def apply_fields(
    msg: Message, items: Iterable[tuple[str, str]], *, strict: bool, flat: bool = True
) -> list[str]:
    """Set ``msg``'s fields from named text values; returns the names that match no field
    (``strict``: those are errors). Raises FieldErrors with every bad value."""
    desc = msg.DESCRIPTOR
    grouped: dict[tuple[str, ...], tuple[str, list[FD], list[str]]] = {}
    ignored: list[str] = []
    errors: list[FieldError] = []
    for name, value in items:
        path = resolve(desc, name, flat=flat)
        if path is None:
            if strict:
                errors.append(FieldError(name, "UNKNOWN_FIELD", f"{name}: no such field"))
            else:
                ignored.append(name)
            continue
        key = tuple(f.full_name for f in path)
        grouped.setdefault(key, (name, path, []))[2].append(value)
    for name, path, values in grouped.values():
        if len(values) > 1 and not is_repeated(path[-1]):
            errors.append(
                FieldError(
                    name, "DUPLICATE_FIELD", f"{name}: given {len(values)} times; send it once"
                )
            )
            continue
        try:
            assign(msg, path, values, name)
        except FieldError as exc:
            errors.append(exc)
    if errors:
        raise FieldErrors(errors)
    return ignored


def field_key(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def _lookup(desc: descriptor.Descriptor, name: str) -> FD | None:
    key = field_key(name)
    for f in desc.fields:
        if key in (field_key(f.name), field_key(f.json_name)):
            return f
    return None


def resolve(desc: Any, name: str, *, flat: bool = True) -> list[FD] | None:
    """The path of fields ``name`` designates in ``desc``, or None."""
    parts = name.split(".")
    path: list[FD] = []
    current: descriptor.Descriptor | None = desc
    for part in parts:
        if current is None:
            return None
        f = _lookup(current, part)
        if f is None:
            break
        path.append(f)
        current = f.message_type if f.type == FD.TYPE_MESSAGE else None
    else:
        return path
    if not flat or len(parts) != 1:
        return None
    # One level down, through singular message fields; a unique match only.
    found = [
        [outer, inner]
        for outer in desc.fields
        if outer.type == FD.TYPE_MESSAGE
        and not is_repeated(outer)
        and not is_map(outer)
        and not msg_type(outer).full_name.startswith("google.protobuf.")
        for inner in [_lookup(msg_type(outer), name)]
        if inner is not None
    ]
    return found[0] if len(found) == 1 else None


def is_repeated(f: FD) -> bool:
    return bool(f.is_repeated)


def msg_type(f: FD) -> descriptor.Descriptor:
    """The message type of a message field."""
    if f.message_type is None:
        raise TypeError(f"{f.full_name} is not a message field")
    return f.message_type


def enum_of(f: FD) -> descriptor.EnumDescriptor:
    """The enum type of an enum field."""
    if f.enum_type is None:
        raise TypeError(f"{f.full_name} is not an enum field")
    return f.enum_type


def is_map(f: FD) -> bool:
    return f.type == FD.TYPE_MESSAGE and bool(msg_type(f).GetOptions().map_entry)


def assign(msg: Message, path: Sequence[FD], values: Sequence[str], name: str) -> None:
    """Set the field at ``path`` of ``msg`` from text ``values`` (repeated fields take all)."""
    target: Any = msg
    for f in path[:-1]:
        if is_repeated(f):
            raise FieldError(name, "INVALID_FIELD", f"{name}: cannot set inside a list")
        target = getattr(target, f.name)
    leaf = path[-1]
    if is_map(leaf):
        raise FieldError(name, "INVALID_FIELD", f"{name}: map fields cannot be set here")
    if is_repeated(leaf):
        items = [v for value in values for v in _split(leaf, value)]
        container = getattr(target, leaf.name)
        if leaf.type == FD.TYPE_MESSAGE:
            for item in items:
                _parse_message_into(container.add(), item, name)
        else:
            container.extend(
                x for x in (_scalar(leaf, item, name) for item in items) if x is not None
            )
        return
    value = values[-1]
    if leaf.type == FD.TYPE_MESSAGE:
        _parse_message_into(getattr(target, leaf.name), value, name, parent=target, field=leaf)
        return
    converted = _scalar(leaf, value, name)
    if converted is not None:
        setattr(target, leaf.name, converted)


def _split(f: FD, value: str) -> list[str]:
    # ServiceStack sends lists comma-separated; strings and bytes may hold commas themselves.
    if f.type in (FD.TYPE_STRING, FD.TYPE_BYTES, FD.TYPE_MESSAGE):
        return [value]
    return [v.strip() for v in value.split(",") if v.strip()]


def _parse_message_into(
    target: Message, value: str, name: str, *, parent: Any = None, field: FD | None = None
) -> None:
    if not value.strip():
        return
    try:
        if (
            parent is not None
            and field is not None
            and msg_type(field).full_name.startswith("google.protobuf.")
        ):
            # Well-known types have string forms: Timestamp, Duration, FieldMask, wrappers.
            try:
                json_format.ParseDict({field.name: value}, parent)
                return
            except json_format.ParseError:
                pass
        json_format.ParseDict(json.loads(value), target)
    except (json_format.ParseError, ValueError) as exc:
        raise FieldError(name, "INVALID_VALUE", f"{name}: {exc}") from None


def _scalar(f: FD, raw: str, name: str) -> Any:
    t = f.type
    if t == FD.TYPE_STRING:
        return raw
    if not raw.strip():
        raise FieldError(name, "INVALID_VALUE", f"{name}: empty; leave the field out instead")
    text = raw.strip()
    if t == FD.TYPE_BOOL:
        return parse_bool(text, name)
    if t in _INT_RANGES:
        lo, hi = _INT_RANGES[t]
        if not _INTEGER.fullmatch(raw):
            raise FieldError(name, "INVALID_VALUE", f"{name}: expected an integer, got {raw!r}")
        number = int(raw, 10)
        if not lo <= number <= hi:
            raise FieldError(name, "INVALID_VALUE", f"{name}: {number} is out of range")
        return number
    if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        if not _FLOAT.fullmatch(raw):
            raise FieldError(name, "INVALID_VALUE", f"{name}: expected a number, got {raw!r}")
        value = float(raw)
        if value in (float("inf"), float("-inf")):
            raise FieldError(name, "INVALID_VALUE", f"{name}: {raw!r} is out of range")
        return value
    if t == FD.TYPE_BYTES:
        try:
            padded = text + "=" * (-len(text) % 4)
            return base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError):
            raise FieldError(name, "INVALID_VALUE", f"{name}: expected base64") from None
    if t == FD.TYPE_ENUM:
        return enum_value(enum_of(f), text, name)
    raise FieldError(name, "INVALID_FIELD", f"{name}: unsupported field type")


def parse_bool(raw: str, name: str) -> bool | None:
    """A boolean as AI Server's clients spell it; None for an empty value."""
    low = raw.strip().lower()
    if not low:
        return None
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise FieldError(name, "INVALID_VALUE", f"{name}: expected true or false, got {raw!r}")


def enum_value(enum: descriptor.EnumDescriptor, text: str, name: str) -> int:
    """An enum value by full name, by short name (prefix dropped) or by number."""
    key = text.strip().lower()
    key = _ENUM_ALIASES.get(key, key)
    prefix = _enum_prefix(enum)
    for v in enum.values:
        full = v.name.lower()
        if key in (full, full.removeprefix(prefix)):
            return int(v.number)
    try:
        number = int(key, 10)
    except ValueError:
        pass
    else:
        if number in enum.values_by_number:
            return number
    allowed = ", ".join(short_enum_names(enum))
    raise FieldError(name, "INVALID_VALUE", f"{name}: unknown value {text!r}; expected {allowed}")


def _enum_prefix(enum: descriptor.EnumDescriptor) -> str:
    """The common ``TYPE_NAME_`` prefix of the values, lower case (``image_format_``)."""
    names = [v.name.lower() for v in enum.values]
    if not names:
        return ""
    prefix = names[0]
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    cut = prefix.rfind("_")
    return prefix[: cut + 1] if cut >= 0 else ""


def short_enum_names(enum: descriptor.EnumDescriptor) -> list[str]:
    """The values' names without the prefix, lower case, the zero (unspecified) one left out."""
    prefix = _enum_prefix(enum)
    return [v.name.lower().removeprefix(prefix) for v in enum.values if v.number != 0]
