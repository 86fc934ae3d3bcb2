"""The JSON Schema of bindings (``binding.schema.json``, beside the built-in workflows),
checked at load time."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from aiserver.providers.comfy.json_lines import JsonPath

__all__ = ["SCHEMA_FILE", "check_binding_schema"]

SCHEMA_FILE = "binding.schema.json"


@functools.cache
def _validator(schema_path: Path) -> Draft202012Validator:
    return Draft202012Validator(json.loads(schema_path.read_text(encoding="utf-8")))


def check_binding_schema(data: Any, schema_path: Path) -> tuple[JsonPath, str] | None:
    """The most relevant violation of the schema at ``schema_path`` (its path and message),
    or None."""
    error = best_match(_validator(schema_path).iter_errors(data))
    if error is None:
        return None
    return tuple(error.absolute_path), error.message
