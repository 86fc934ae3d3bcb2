"""JSON Schema keywords from the contract's ``buf.validate`` field rules.

The limits are written once, as annotations in the protos; the server enforces them
(:mod:`aiserver.api.validation`) and the OpenAPI document carries them from here, so a request
that the document calls valid passes the server's checks and a generated client can check
before sending. Rules JSON Schema cannot say (message-level CEL) stay in the descriptions.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from buf.validate import validate_pb2
from google.protobuf import descriptor

__all__ = [
    "INT64_PATTERN",
    "UINT64_PATTERN",
    "decimal_at_most",
    "excluded_enum_values",
    "field_rules",
    "is_required",
    "item_keywords",
    "pattern_keywords",
    "rule_keywords",
    "strip_pattern_prefix",
]

FD = descriptor.FieldDescriptor

_NUMERIC = ("int32", "sint32", "sfixed32", "uint32", "fixed32", "float", "double")
# 64-bit integers travel as JSON strings (protobuf's JSON mapping): their rules become a
# pattern of the decimal numbers in range.
_LONG = ("int64", "sint64", "sfixed64", "uint64", "fixed64")


def field_rules(f: FD) -> validate_pb2.FieldRules | None:
    options = f.GetOptions()
    if not options.HasExtension(validate_pb2.field):
        return None
    return options.Extensions[validate_pb2.field]


def excluded_enum_values(f: FD) -> set[int]:
    """Enum numbers ``f`` (or its items) may not take: the zero value when required, and
    ``not_in``."""
    rules = field_rules(f)
    if rules is None:
        return set()
    enum = rules.repeated.items.enum if rules.WhichOneof("type") == "repeated" else rules.enum
    return set(enum.not_in) | ({0} if rules.required else set())


def is_required(f: FD) -> bool:
    rules = field_rules(f)
    return rules is not None and rules.required


def rule_keywords(f: FD) -> dict[str, Any]:
    """The keywords of ``f``'s rules for its (scalar or item) schema; empty when it has none."""
    rules = field_rules(f)
    if rules is None:
        return {}
    if rules.WhichOneof("type") == "repeated":
        return {}  # see item_keywords
    return _keywords(rules)


def item_keywords(f: FD) -> dict[str, Any]:
    """The keywords for the items of a repeated field."""
    rules = field_rules(f)
    if rules is None or rules.WhichOneof("type") != "repeated":
        return {}
    return _keywords(rules.repeated.items)


def _keywords(rules: validate_pb2.FieldRules) -> dict[str, Any]:
    kind = rules.WhichOneof("type")
    if kind == "string":
        return _string(rules.string)
    if kind == "float" and rules.float.HasField("gt"):
        # JSON numbers just above the bound can round to it as 32-bit floats: say the first
        # float past it instead.
        out = _numeric(rules.float)
        del out["exclusiveMinimum"]
        return {**out, "minimum": _next_float32(rules.float.gt)}
    if kind in _NUMERIC:
        return _numeric(getattr(rules, kind))
    if kind in _LONG:
        return _long(getattr(rules, kind))
    return {}  # enums: the schema lists the defined values already


# Python's `$` also matches before a final newline; ECMA's and RE2's (the server's) only at
# the very end. Readers of the document are often Python (hypothesis, schemathesis, jsonschema
# validators), so an end-anchored pattern also forbids a final newline, as a pattern that means
# the same in all three (`\z` is not ECMA, lookarounds are not RE2).
_FINAL_NEWLINE = "\\n$"


def _ends_anchored(pattern: str) -> bool:
    return pattern.endswith("$") and not pattern.endswith("\\$")


def pattern_keywords(pattern: str, banned: str = "") -> dict[str, Any]:
    """``pattern`` as JSON Schema keywords that mean for Python what it means for ECMA and
    RE2; ``banned``: a pattern of what the string may not contain."""
    out: dict[str, Any] = {"pattern": pattern} if pattern else {}
    not_ = [p for p in (banned, _FINAL_NEWLINE if _ends_anchored(pattern) else "") if p]
    if not_:
        out["not"] = {"pattern": "|".join(not_)}
    return out


def _string(s: validate_pb2.StringRules) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if s.HasField("min_len"):
        out["minLength"] = s.min_len
    if s.HasField("max_len"):
        out["maxLength"] = s.max_len
    banned = ""
    if s.HasField("not_contains"):
        banned = "".join(
            re.escape(c) if c.isprintable() else f"\\u{ord(c):04x}" for c in s.not_contains
        )
    return out | pattern_keywords(s.pattern if s.HasField("pattern") else "", banned)


def _numeric(n: Any) -> dict[str, Any]:
    # OpenAPI 3.0: exclusiveMinimum/Maximum are flags on minimum/maximum.
    out: dict[str, Any] = {}
    if n.HasField("gte"):
        out["minimum"] = n.gte
    elif n.HasField("gt"):
        out["minimum"], out["exclusiveMinimum"] = n.gt, True
    if n.HasField("lte"):
        out["maximum"] = n.lte
    elif n.HasField("lt"):
        out["maximum"], out["exclusiveMaximum"] = n.lt, True
    return out


def _next_float32(value: float) -> float:
    return float(np.nextafter(np.float32(value), np.float32(np.inf)))


def decimal_at_most(limit: int) -> str:
    """A regex group for the decimal numbers 0..``limit`` (leading zeros allowed)."""
    digits = str(limit)
    options = [f"[0-9]{{1,{len(digits) - 1}}}"] if len(digits) > 1 else []
    for i, d in enumerate(digits):
        if d != "0":
            rest = len(digits) - i - 1
            below = "0" if d == "1" else f"[0-{int(d) - 1}]"
            options.append(digits[:i] + below + (f"[0-9]{{{rest}}}" if rest else ""))
    options.append(digits)
    return "(" + "|".join(options) + ")"


INT64_PATTERN = f"^-?0*{decimal_at_most(2**63 - 1)}$"
UINT64_PATTERN = f"^0*{decimal_at_most(2**64 - 1)}$"
NON_NEGATIVE_INT64_PATTERN = f"^0*{decimal_at_most(2**63 - 1)}$"


def _long(n: Any) -> dict[str, Any]:
    low = n.gte if n.HasField("gte") else (n.gt + 1 if n.HasField("gt") else None)
    non_negative = low is not None and low >= 0
    return pattern_keywords(NON_NEGATIVE_INT64_PATTERN if non_negative else INT64_PATTERN)


def strip_pattern_prefix(pattern: str, prefix: str) -> str | None:
    """The pattern of what a path variable binds (``{name=jobs/*}`` binds the id): ``pattern``
    without its literal ``prefix`` after ``^``; None when it does not start so."""
    if prefix and pattern.startswith("^" + prefix):
        return "^" + pattern[len(prefix) + 1 :]
    return None
