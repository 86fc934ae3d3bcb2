"""The log formatters: the time stamp made once per second reads as the stdlib's."""

from __future__ import annotations

import json
import logging

from aiserver.logs import _Formatter, _JsonFormatter

_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def _record(created: float, message: str = "job %s done") -> logging.LogRecord:
    record = logging.LogRecord("aiserver.jobs", logging.INFO, "", 0, message, ("j1",), None)
    record.created = created
    record.msecs = (created - int(created)) * 1000
    return record


def test_text_lines_match_the_stdlib_across_seconds() -> None:
    ours, stdlib = _Formatter(_FORMAT), logging.Formatter(_FORMAT)
    # Within one second, across a boundary, back to an earlier second, a day later.
    for created in (1_765_000_000.001, 1_765_000_000.999, 1_765_000_001.5, 1_765_000_000.25,
                    1_765_086_400.0):  # fmt: skip
        record = _record(created)
        assert ours.format(record) == stdlib.format(record)


def test_a_format_without_time_has_none() -> None:
    record = _record(1_765_000_000.5)
    assert _Formatter("%(levelname)s %(message)s").format(record) == "INFO job j1 done"
    assert not hasattr(record, "asctime")


def test_an_explicit_date_format_is_the_stdlibs() -> None:
    record = _record(1_765_000_000.5)
    ours = _Formatter(_FORMAT).formatTime(record, "%H:%M")
    assert ours == logging.Formatter(_FORMAT).formatTime(record, "%H:%M")


def test_json_time_matches_the_stdlib() -> None:
    formatter = _JsonFormatter()
    for created in (1_765_000_000.001, 1_765_000_002.75):
        record = _record(created)
        entry = json.loads(formatter.format(record))
        assert entry["time"] == logging.Formatter().formatTime(record)
        assert entry["message"] == "job j1 done"
