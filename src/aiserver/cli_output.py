"""What the client commands of ``aiserver`` print, and the exit codes they end with.

Results go to stdout (or one JSON document with ``--json``); progress and errors go to
stderr, errors as one line: status, reason and field details.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from aiserver.client import ClientError, Event

__all__ = [
    "EXIT_AUTH",
    "EXIT_INTERRUPTED",
    "EXIT_JOB_FAILED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_SERVER",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "PROG",
    "Out",
    "ProgressLine",
    "exit_code_for",
    "job_details",
    "job_line",
    "message_dict",
]

PROG = "aiserver"

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_UNAVAILABLE = 4
EXIT_AUTH = 5
EXIT_SERVER = 6
EXIT_INTERRUPTED = 130

_EXIT_BY_CODE = {
    "INVALID_ARGUMENT": EXIT_REFUSED,
    "NOT_FOUND": EXIT_REFUSED,
    "ALREADY_EXISTS": EXIT_REFUSED,
    "FAILED_PRECONDITION": EXIT_REFUSED,
    "OUT_OF_RANGE": EXIT_REFUSED,
    "RESOURCE_EXHAUSTED": EXIT_REFUSED,
    "UNIMPLEMENTED": EXIT_REFUSED,
    "UNAVAILABLE": EXIT_UNAVAILABLE,
    "DEADLINE_EXCEEDED": EXIT_UNAVAILABLE,
    "ABORTED": EXIT_UNAVAILABLE,
    "UNAUTHENTICATED": EXIT_AUTH,
    "PERMISSION_DENIED": EXIT_AUTH,
}


def exit_code_for(code_name: str) -> int:
    """The exit code for a failed call's status code name (``NOT_FOUND`` -> 3)."""
    return _EXIT_BY_CODE.get(code_name, EXIT_SERVER)


class Out:
    """stdout for results (or JSON), stderr for progress and errors."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.json = bool(args.json)
        self.quiet = bool(args.quiet)

    def result(self, text: str) -> None:
        if not self.json:
            print(text, flush=True)

    def document(self, data: Any) -> None:
        if self.json:
            print(json.dumps(data, indent=2, ensure_ascii=False), flush=True)

    def error(self, err: ClientError) -> int:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        self.document({"error": err.to_dict()})
        return exit_code_for(err.code_name)

    def usage(self, text: str) -> int:
        print(f"{PROG}: error: {text}", file=sys.stderr, flush=True)
        self.document({"error": {"code": "USAGE", "message": text}})
        return EXIT_USAGE


def message_dict(message: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    data: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return data


class ProgressLine:
    """Job progress on ``stream``: one line redrawn in place on a terminal; otherwise plain
    lines, progress only when the stage or node changes or another 10% is done."""

    def __init__(self, stream: TextIO, *, enabled: bool = True, tty: bool | None = None) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = stream.isatty() if tty is None else tty
        self._live = False
        self._last_key: tuple[str, str, int] | None = None
        self._started = time.monotonic()

    def _width(self) -> int:
        return max(20, shutil.get_terminal_size((100, 20)).columns - 1)

    def live(self, text: str) -> None:
        """The progress line (a terminal), or a plain line when worth one."""
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\x1b[2K" + text[: self._width()])
            self.stream.flush()
            self._live = True

    def line(self, text: str) -> None:
        """A line that stays (above the live line on a terminal)."""
        if not self.enabled:
            return
        if self._live:
            self.stream.write("\r\x1b[2K")
            self._live = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._live:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._live = False

    def event(self, event: Event) -> None:
        from aiserver.client import (
            Accepted,
            Finished,
            OutputReady,
            Progress,
            Retrying,
            Stage,
            TextOutput,
        )

        if isinstance(event, Accepted):
            again = " (existing job for this ref id)" if event.existing else ""
            self.line(
                f"accepted {event.job} ({event.task}), queue position {event.queue_position}{again}"
            )
        elif isinstance(event, Progress):
            percent = int(event.fraction * 100)
            if event.stage in (Stage.QUEUED, Stage.PENDING):
                text = f"{event.stage.value}, position {event.queue_position}"
            else:
                text = event.stage.value
                if event.node_type or event.node:
                    text += f" {event.node_type or 'node'}"
                    text += f" (node {event.node})" if event.node else ""
                if event.max_steps:
                    text += f" step {event.step}/{event.max_steps}"
            if self.tty:
                filled = percent // 5
                bar = "#" * filled + "." * (20 - filled)
                self.live(f"[{bar}] {percent:3d}%  {text}  {event.job}")
                return
            key = (event.stage.value, event.node, percent // 10)
            if key != self._last_key or (event.max_steps and event.step == event.max_steps):
                self._last_key = key
                self.line(f"{text}, {percent}%")
        elif isinstance(event, OutputReady):
            a = event.artifact
            self.line(f"output {event.index}: {a.name} ({a.width}x{a.height} {a.mime_type})")
        elif isinstance(event, TextOutput):
            self.line(f"text {event.index}: {event.text}")
        elif isinstance(event, Retrying):
            self.line(f"retrying: attempt {event.attempt} failed ({event.reason})")
        elif isinstance(event, Finished):
            took = time.monotonic() - self._started
            self.line(f"finished: {event.state} after {took:.1f}s")


def job_line(job: Any) -> str:
    from aiserver.client.types import job_state_name, task_name

    created = ""
    if job.HasField("create_time"):
        created = job.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%SZ")
    return "  ".join(
        [
            job.name,
            f"{task_name(job.task):<13}",
            f"{job_state_name(job.state):<9}",
            f"{int(job.progress * 100):3d}%",
            created,
            job.tag,
        ]
    ).rstrip()


def job_details(job: Any) -> list[str]:
    from aiserver.client.types import job_error, job_state_name, task_name

    lines = [
        f"name:     {job.name}",
        f"task:     {task_name(job.task)}",
        f"state:    {job_state_name(job.state)}",
        f"progress: {int(job.progress * 100)}%",
    ]
    if job.ref_id:
        lines.append(f"ref id:   {job.ref_id}")
    if job.tag:
        lines.append(f"tag:      {job.tag}")
    if job.provider:
        agent = f" ({job.agent})" if job.agent else ""
        lines.append(f"provider: {job.provider}{agent}")
    if job.state == job.STATE_QUEUED:
        lines.append(f"queue:    position {job.queue_position}")
    for artifact in job.outputs:
        lines.append(f"output:   {artifact.name} ({artifact.width}x{artifact.height})")
    for text in job.text_outputs:
        lines.append(f"text:     {text.text}")
    err = job_error(job)
    if err is not None:
        lines.append(f"error:    {err}")
    return lines
