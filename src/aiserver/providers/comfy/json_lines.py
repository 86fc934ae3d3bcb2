"""Where each value of a JSON document starts, so errors about a path can name its line.

``json`` gives no positions for parsed values; this walks the text once more (after it parsed)
and records the offset of every key and array item by path.
"""

from __future__ import annotations

import json
from collections.abc import Callable

__all__ = ["JsonPath", "line_of", "locate"]

JsonPath = tuple[str | int, ...]
_SPACE = " \t\r\n"
# The stdlib's string scanner (json.decoder.scanstring), untyped in typeshed.
_scanstring: Callable[[str, int], tuple[str, int]] = getattr(json.decoder, "scanstring")  # noqa: B009


def locate(text: str) -> dict[JsonPath, int]:
    """The offset of each path's key (objects) or first character (arrays, the root)."""
    found: dict[JsonPath, int] = {}
    decoder = json.JSONDecoder()

    def skip(i: int) -> int:
        while i < len(text) and text[i] in _SPACE:
            i += 1
        return i

    def value(i: int, path: JsonPath) -> int:
        i = skip(i)
        found.setdefault(path, i)
        head = text[i]
        if head == "{":
            i = skip(i + 1)
            if text[i] == "}":
                return i + 1
            while True:
                i = skip(i)
                start = i
                key, i = _scanstring(text, i + 1)
                found[(*path, key)] = start
                i = skip(i) + 1  # the colon
                i = skip(value(i, (*path, key)))
                if text[i] == ",":
                    i += 1
                    continue
                return i + 1
        if head == "[":
            i = skip(i + 1)
            if text[i] == "]":
                return i + 1
            index = 0
            while True:
                i = skip(value(i, (*path, index)))
                index += 1
                if text[i] == ",":
                    i += 1
                    continue
                return i + 1
        _, end = decoder.raw_decode(text, i)
        return int(end)

    value(0, ())
    return found


def line_of(text: str, offsets: dict[JsonPath, int], path: JsonPath) -> int:
    """The 1-based line of ``path``, or of its nearest located ancestor."""
    while path and path not in offsets:
        path = path[:-1]
    return text.count("\n", 0, offsets.get(path, 0)) + 1
