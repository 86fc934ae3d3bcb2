"""Typed workflow parameters: values checked one violation each; JSON paths back to lines."""

from __future__ import annotations

import json

import pytest

from aiserver.errors import ServiceError
from aiserver.providers.comfy.json_lines import line_of, locate
from aiserver.providers.comfy.workflow_params import ParamSpec, check_values

SPECS = (
    ParamSpec("prompt", "string", required=True, max_length=10),
    ParamSpec("steps", "integer", minimum=1, maximum=150),
    ParamSpec("cfg", "number", minimum=0, maximum=30),
    ParamSpec("tiled", "boolean"),
    ParamSpec("sampler", "string", choices=("euler", "heun")),
)


def test_good_values_are_converted_to_their_types() -> None:
    got = check_values(SPECS, {"prompt": "fox", "steps": 20.0, "cfg": 7, "tiled": False})
    assert got == {"prompt": "fox", "steps": 20, "cfg": 7.0, "tiled": False}
    assert type(got["steps"]) is int and type(got["cfg"]) is float
    text = check_values(
        SPECS, {"prompt": "fox", "steps": "3", "tiled": "true", "cfg": "2.5"}, from_text=True
    )
    assert text == {"prompt": "fox", "steps": 3, "tiled": True, "cfg": 2.5}


@pytest.mark.parametrize(
    ("given", "field", "words"),
    [
        ({"prompt": "x", "colour": 1}, "parameters.colour", "unknown parameter"),
        ({}, "parameters.prompt", "required"),
        ({"prompt": "x" * 11}, "parameters.prompt", "longer than 10"),
        ({"prompt": 3}, "parameters.prompt", "must be a string"),
        ({"prompt": "x", "steps": 2.5}, "parameters.steps", "an integer"),
        ({"prompt": "x", "steps": True}, "parameters.steps", "an integer"),
        ({"prompt": "x", "steps": 0}, "parameters.steps", "at least 1"),
        ({"prompt": "x", "cfg": 31}, "parameters.cfg", "at most 30"),
        ({"prompt": "x", "cfg": float("nan")}, "parameters.cfg", "finite"),
        ({"prompt": "x", "tiled": "yes"}, "parameters.tiled", "a boolean"),
        ({"prompt": "x", "sampler": "ddim"}, "parameters.sampler", "one of euler, heun"),
        ({"prompt": "a\x00b"}, "parameters.prompt", "NUL"),
    ],
)
def test_each_bad_value_is_one_violation(given: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(ServiceError) as caught:
        check_values(SPECS, given)
    error = caught.value
    assert error.reason == "INVALID_PARAMETERS"
    assert [v.field for v in error.violations] == [field]
    assert words in error.violations[0].description


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ServiceError) as caught:
        check_values(SPECS, {"steps": "x", "cfg": -1, "nope": 1})
    fields = sorted(v.field for v in caught.value.violations)
    assert fields == ["parameters.cfg", "parameters.nope", "parameters.prompt", "parameters.steps"]


def test_json_paths_map_to_their_lines() -> None:
    data = {"a": 1, "params": {"steps": {"type": "int", "targets": [{"node": "1"}, {"x": 2}]}}}
    text = json.dumps(data, indent=2)
    offsets = locate(text)
    lines = text.splitlines()

    def line(*path: str | int) -> str:
        return lines[line_of(text, offsets, path) - 1].strip()

    assert line("a") == '"a": 1,'
    assert line("params", "steps", "type") == '"type": "int",'
    assert line("params", "steps", "targets", 1, "x") == '"x": 2'
    assert line("params", "steps", "missing") == '"steps": {'  # the nearest located parent
    assert line_of(text, offsets, ()) == 1
    compact = '{"k": ["a", {"b": [1, 2]}], "s": "q\\"uote"}'
    assert set(locate(compact)) >= {("k",), ("k", 1, "b", 1), ("s",)}
