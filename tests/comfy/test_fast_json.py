"""JSON to and from an agent and in the job store's columns: orjson, with the stdlib for what
orjson gets wrong or refuses."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math

import pytest

from aiserver import fast_json
from aiserver.jobs.store import rows
from aiserver.providers.comfy import messages as msg


def test_reads_what_python_json_on_the_agent_writes() -> None:
    # ComfyUI's json.dumps writes NaN and Infinity; orjson refuses them.
    frame = json.dumps(
        {"type": "executed", "data": {"prompt_id": "p", "node": "9", "output": {"v": math.nan}}}
    )
    assert "NaN" in frame
    decoded = msg.decode(frame)
    assert isinstance(decoded, msg.Executed)
    assert decoded.output is not None and math.isnan(decoded.output["v"])
    assert fast_json.loads(b'{"a": Infinity}') == {"a": math.inf}


def test_not_json_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        fast_json.loads(b"<html>")
    assert msg.decode("not json") == msg.Unknown("", "not json")


def test_writes_what_orjson_refuses_as_before() -> None:
    big = {"seed": 2**70 + 1, "nested": {1: "non-string key"}}
    assert json.loads(fast_json.dumps(big)) == {
        "seed": 2**70 + 1,
        "nested": {"1": "non-string key"},
    }


def test_writes_the_same_document() -> None:
    body = {"prompt": {"1": {"class_type": "LoadImage", "inputs": {"image": "é.png"}}}, "n": 1.5}
    assert json.loads(fast_json.dumps(body)) == body


_BEYOND_64_BITS = [2**70 + 1, -(2**63) - 1, 2**64, -(2**64), 10**30 + 7]


@pytest.mark.parametrize("big", _BEYOND_64_BITS)
def test_reads_integers_beyond_64_bits_exactly(big: int) -> None:
    # orjson reads them as a float (2**70 + 1 -> 1.1805916207174113e21): another seed.
    for text in (json.dumps({"seed": big}), f'{{"seed":{big},"s":"é"}}'):
        for data in (text, text.encode()):
            value = fast_json.loads(data)["seed"]
            assert type(value) is int and value == big
    written = fast_json.dumps({"seed": big})  # through the stdlib: orjson refuses them
    assert fast_json.loads(written) == {"seed": big} and fast_json.loads(written.decode())


@pytest.mark.parametrize("big", _BEYOND_64_BITS)
def test_a_rows_column_keeps_integers_beyond_64_bits(big: int) -> None:
    # Written now (orjson refuses, the stdlib writes) and written by the stdlib before orjson.
    for text in (rows.dumps({"seed": big}), json.dumps({"seed": big, "nan": math.nan})):
        value = rows.loads(text)["seed"]
        assert type(value) is int and value == big


def test_64_bit_integers_and_long_digit_runs_read_as_before() -> None:
    # orjson reads every integer in [-2**63, 2**64) exactly (a seed: 0 .. 2**63 - 1).
    doc = {
        "a": 2**63 - 1,
        "b": -(2**63),
        "c": 2**64 - 1,
        "d": 0.12345678901234567890123,
        "e": "1" * 40,
        "f": -(10**18),
    }
    for text in (json.dumps(doc), json.dumps(doc).encode()):
        read = fast_json.loads(text)
        assert read == doc and [type(v) for v in read.values()] == [type(v) for v in doc.values()]


def test_what_the_stdlib_cannot_write_fails_as_before() -> None:
    @dataclasses.dataclass
    class Point:
        x: int

    for value in (
        {"at": datetime.datetime(2026, 1, 1)},
        {"p": Point(1)},
        {"d": datetime.date.today()},
    ):
        with pytest.raises(TypeError):
            json.dumps(value)
        with pytest.raises(TypeError):
            fast_json.dumps(value)
        with pytest.raises(TypeError):
            rows.dumps(value)


@pytest.mark.parametrize(
    "text", ["-" * 40, "00000000-0000-0000-0000-000000000000", "1-2-3-4-5-6-7-8-9-0-1-2"]
)
def test_dash_runs_in_text_stay_on_orjson(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only 20 digits in a row, or "-" and 19, may be an integer orjson misreads: a markdown
    # rule or a zero UUID in a prompt is neither, and must not cost the stdlib's parse.
    document = json.dumps({"text": text, "seed": 2**63 - 1, "n": -12345})

    def stdlib(*_: object, **__: object) -> None:
        raise AssertionError("went to the stdlib")

    monkeypatch.setattr(fast_json.json, "loads", stdlib)
    assert fast_json.loads(document) == {"text": text, "seed": 2**63 - 1, "n": -12345}
