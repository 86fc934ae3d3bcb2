"""The JSON Schema of bindings (``workflows/binding.schema.json``), checked at load time."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from aiserver.providers.comfy.json_lines import JsonPath

__all__ = ["binding_schema", "check_binding_schema", "schema_path"]


def schema_path() -> Path:
    """``workflows/binding.schema.json`` in the repository (next to the built-in bindings)."""
    return Path(__file__).resolve().parents[4] / "workflows" / "binding.schema.json"


@functools.cache
def binding_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(schema_path().read_text(encoding="utf-8"))
    return schema


@functools.cache
def _validator() -> Draft202012Validator:
    return Draft202012Validator(binding_schema())


def check_binding_schema(data: Any) -> tuple[JsonPath, str] | None:
    """The most relevant schema violation (its path and message), or None."""
    error = best_match(_validator().iter_errors(data))
    if error is None:
        return None
    return tuple(error.absolute_path), error.message
