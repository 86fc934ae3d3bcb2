"""Workflow parameters and inputs from text (``--param steps=20``, ``image=@in.png``).

The command line (and any caller holding text) gives every value as a string; each is
converted to the type the workflow declares (from GetWorkflow), so ``--param prompt=123`` stays
a string while ``--param steps=20`` becomes a number. A value that does not parse is sent as
text and the server names it in its field violation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from imagetasks.v1 import workflow_service_pb2 as wpb

__all__ = ["parse_assignments", "parse_inputs", "typed_parameters"]


def parse_assignments(items: Iterable[str], what: str = "parameter") -> dict[str, str]:
    """``["steps=20", "prompt=a b=c"]`` -> ``{"steps": "20", "prompt": "a b=c"}``."""
    found: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{what} {item!r}: expected NAME=VALUE")
        found[name.strip()] = value
    return found


def parse_inputs(items: Iterable[str]) -> dict[str, Path]:
    """``["image=@in.png"]`` -> ``{"image": Path("in.png")}`` (``@`` optional, as in curl)."""
    return {
        name: Path(value.removeprefix("@"))
        for name, value in parse_assignments(items, "input").items()
    }


def typed_parameters(
    declared: Sequence[wpb.WorkflowParameter], given: dict[str, str]
) -> dict[str, Any]:
    """Text values as the declared types; unknown names are passed on for the server to
    refuse."""
    types = {p.name: p.type for p in declared}
    return {name: _typed(types.get(name), text) for name, text in given.items()}


def _typed(kind: int | None, text: str) -> Any:
    if kind in (wpb.PARAMETER_TYPE_INTEGER, wpb.PARAMETER_TYPE_NUMBER):
        try:
            number = float(text)
        except ValueError:
            return text
        return int(number) if kind == wpb.PARAMETER_TYPE_INTEGER and number.is_integer() else number
    if kind == wpb.PARAMETER_TYPE_BOOLEAN:
        low = text.strip().lower()
        return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(
            low, text
        )
    return text
