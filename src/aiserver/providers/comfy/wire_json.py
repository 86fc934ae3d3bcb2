"""JSON to and from an agent: every job's prompt, its answers and each websocket frame.

orjson parses and writes these 4-10 times faster than the stdlib (measured here: a prompt body
0.7 against 10 µs, six websocket frames 3 against 20 µs), and a job has a prompt, two answers
and ~10 frames. What orjson refuses and ``json`` takes goes through ``json``, so what an agent
sends reads as before (``NaN``/``Infinity``: Python's ``json`` on the agent writes them), and
integers beyond 64 bits or non-string keys are written as before. Written differently: no
spaces, non-ASCII as UTF-8 rather than ``\\u`` escapes (the same document), and a float
``NaN``/``Infinity`` as ``null`` (ComfyUI's own inputs have no use for them).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["dumps", "loads"]


def loads(data: str | bytes) -> Any:
    """A JSON document; ``ValueError`` when it is not one."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)  # what orjson refuses (NaN...), or the stdlib's own error


def dumps(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: a big integer, a non-string key
        return json.dumps(value, separators=(",", ":")).encode()
