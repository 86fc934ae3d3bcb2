"""JSON to and from an agent: orjson, with the stdlib for what orjson refuses."""

from __future__ import annotations

import json
import math

import pytest

from aiserver.providers.comfy import messages as msg
from aiserver.providers.comfy import wire_json


def test_reads_what_python_json_on_the_agent_writes() -> None:
    # ComfyUI's json.dumps writes NaN and Infinity; orjson refuses them.
    frame = json.dumps(
        {"type": "executed", "data": {"prompt_id": "p", "node": "9", "output": {"v": math.nan}}}
    )
    assert "NaN" in frame
    decoded = msg.decode(frame)
    assert isinstance(decoded, msg.Executed)
    assert decoded.output is not None and math.isnan(decoded.output["v"])
    assert wire_json.loads(b'{"a": Infinity}') == {"a": math.inf}


def test_not_json_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        wire_json.loads(b"<html>")
    assert msg.decode("not json") == msg.Unknown("", "not json")


def test_writes_what_orjson_refuses_as_before() -> None:
    big = {"seed": 2**70, "nested": {1: "non-string key"}}
    assert json.loads(wire_json.dumps(big)) == {"seed": 2**70, "nested": {"1": "non-string key"}}


def test_writes_the_same_document() -> None:
    body = {"prompt": {"1": {"class_type": "LoadImage", "inputs": {"image": "é.png"}}}, "n": 1.5}
    assert json.loads(wire_json.dumps(body)) == body
