"""Logging with a request id on every line, as text or JSON."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

__all__ = ["configure_logging", "job_id_var", "request_id_var"]

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
"""The id of the call being served; set by the API layer, read by every log line."""

job_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("job_id", default="")
"""The job a log line is about: set by the job manager while it drives a job (and by the
servicers once a call has a job), so provider and webhook logs carry it too."""


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        job = job_id_var.get()
        record.job_id = job
        record.job_tag = f" job={job}" if job else ""
        return True


class _Formatter(logging.Formatter):
    """The stdlib's formatter with its time stamp made once per second: ``formatTime``'s
    ``localtime`` and ``strftime`` were a quarter of a log line's CPU (two lines per job)."""

    def __init__(self, fmt: str | None = None) -> None:
        super().__init__(fmt)
        self._uses_time = super().usesTime()  # a search of the format string per record else
        self._second = -1
        self._stamp = ""

    def usesTime(self) -> bool:
        return self._uses_time

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        # Records are formatted under their handler's lock: these two fields change together.
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        msec_format = self.default_msec_format
        return self._stamp if msec_format is None else msec_format % (self._stamp, record.msecs)


class _JsonFormatter(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if job := getattr(record, "job_id", ""):
            entry["job_id"] = job
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, *, json_lines: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(
        _JsonFormatter()
        if json_lines
        else _Formatter(
            "%(asctime)s %(levelname)s %(name)s [%(request_id)s%(job_tag)s] %(message)s"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Lines carry none of these: each record would look up its caller's frame, its thread
    # and its process (a syscall) for nothing (the logging HOWTO's "Optimization").
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
