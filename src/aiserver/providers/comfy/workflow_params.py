"""The typed parameters of a workflow, and the check of a run's values against them.

A binding declares each parameter's type, range or choices, whether it is required and its
default; :func:`check_values` turns what a caller sent (a ``google.protobuf.Struct`` as a dict,
or form fields as text) into the values placed in the graph, with one field violation per
wrong value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiserver.errors import ErrorKind, FieldViolation, ServiceError

__all__ = ["PARAM_TYPES", "ParamSpec", "check_values", "infer_type"]

PARAM_TYPES = ("string", "integer", "number", "boolean")
MAX_TEXT = 10_000
"""Longest string parameter accepted when the binding names no ``max_length``."""


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """What a caller may send for one parameter."""

    name: str
    type: str
    description: str = ""
    title: str = ""
    required: bool = False
    default: Any = None
    has_default: bool = False
    random: bool = False
    minimum: float | None = None
    maximum: float | None = None
    max_length: int | None = None
    choices: tuple[Any, ...] = ()


def infer_type(value: Any) -> str:
    """The parameter type of a JSON value (a default, or the graph's own value)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string"


def check_values(
    specs: Sequence[ParamSpec],
    given: Mapping[str, Any],
    *,
    prefix: str = "parameters",
    from_text: bool = False,
    max_text: int = MAX_TEXT,
) -> dict[str, Any]:
    """The values to run with (only those given); raise INVALID_ARGUMENT listing every problem.

    ``from_text``: values are form fields (strings), converted to each parameter's type.
    ``max_text``: the longest string of a parameter whose binding names no ``max_length``.
    """
    by_name = {s.name: s for s in specs}
    bad: list[FieldViolation] = []
    out: dict[str, Any] = {}
    for name in given:
        if name not in by_name:
            known = ", ".join(sorted(by_name)) or "none"
            bad.append(FieldViolation(f"{prefix}.{name}", f"unknown parameter (known: {known})"))
    for spec in specs:
        if spec.name not in given or given[spec.name] is None:
            if spec.required:
                bad.append(FieldViolation(f"{prefix}.{spec.name}", "required"))
            continue
        value, problem = _convert(spec, given[spec.name], from_text, max_text)
        if problem:
            bad.append(FieldViolation(f"{prefix}.{spec.name}", problem))
        else:
            out[spec.name] = value
    if bad:
        summary = "; ".join(f"{v.field} {v.description}" for v in bad)
        raise ServiceError(
            ErrorKind.INVALID_ARGUMENT,
            "INVALID_PARAMETERS",
            f"invalid parameters: {summary}",
            violations=tuple(bad),
            metadata={"fields": ",".join(v.field for v in bad)[:1000]},
        )
    return out


def _convert(spec: ParamSpec, raw: Any, from_text: bool, max_text: int) -> tuple[Any, str]:
    value = _from_text(spec.type, raw) if from_text and isinstance(raw, str) else raw
    if spec.type == "boolean":
        if not isinstance(value, bool):
            return None, "must be a boolean"
    elif spec.type in ("integer", "number"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None, f"must be {'an integer' if spec.type == 'integer' else 'a number'}"
        if not math.isfinite(value):
            return None, "must be a finite number"
        if spec.type == "integer":
            if not float(value).is_integer():
                return None, "must be an integer"
            value = int(value)
        else:
            value = float(value)
        if spec.minimum is not None and value < spec.minimum:
            return None, f"must be at least {_num(spec.minimum)}"
        if spec.maximum is not None and value > spec.maximum:
            return None, f"must be at most {_num(spec.maximum)}"
    else:
        if not isinstance(value, str):
            return None, "must be a string"
        limit = spec.max_length or max_text
        if len(value) > limit:
            return None, f"longer than {limit} characters"
        if "\x00" in value:
            return None, "contains a NUL character"
    if spec.choices and value not in spec.choices:
        return None, "must be one of " + ", ".join(str(c) for c in spec.choices)
    return value, ""


def _from_text(kind: str, text: str) -> Any:
    # Form fields are text; a value that does not parse stays text and fails the type check.
    if kind == "boolean":
        lowered = text.strip().lower()
        return {"true": True, "1": True, "false": False, "0": False}.get(lowered, text)
    if kind in ("integer", "number"):
        try:
            number = float(text)
        except ValueError:
            return text
        return int(number) if kind == "integer" and number.is_integer() else number
    return text


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
