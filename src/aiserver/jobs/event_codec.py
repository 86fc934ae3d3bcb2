"""Job events as stored rows (``job_events``): a kind name and a JSON payload.

A watcher on another process reads these back (docs/scale-out.md, "Events"). ``Finished``
carries no payload: the final job is the stored record, read when the row is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiserver.jobs.codec import decode_outputs, decode_retries, encode_outputs, encode_retries
from aiserver.jobs.model import (
    Accepted,
    EventKind,
    OutputStored,
    Progress,
    Retrying,
    Stage,
    TextProduced,
)
from aiserver.tasks import TaskKind

__all__ = ["FINISHED", "PROGRESS", "decode_event", "encode_event"]

PROGRESS = "progress"
FINISHED = "finished"


def encode_event(kind: EventKind) -> tuple[str, dict[str, Any]]:
    """The row's ``kind`` and ``payload`` of one event."""
    if isinstance(kind, Accepted):
        return "accepted", {
            "task": kind.task.value,
            "ref_id": kind.ref_id,
            "queue_position": kind.queue_position,
        }
    if isinstance(kind, Progress):
        return PROGRESS, {
            "stage": kind.stage.value,
            "fraction": kind.fraction,
            "queue_position": kind.queue_position,
            "node": kind.node,
            "node_type": kind.node_type,
            "step": kind.step,
            "max_steps": kind.max_steps,
            "provider": kind.provider,
            "waiting": kind.waiting,
        }
    if isinstance(kind, OutputStored):
        return "output", {"index": kind.index, "artifact": encode_outputs([kind.artifact])[0]}
    if isinstance(kind, TextProduced):
        return "text", {"index": kind.index, "text": kind.text, "node": kind.node}
    if isinstance(kind, Retrying):
        return "retrying", encode_retries([kind])[0]
    return FINISHED, {}


def decode_event(kind: str, payload: Mapping[str, Any]) -> EventKind | None:
    """The event of a stored row; ``None`` for ``finished`` (built from the record) and for
    kinds this version does not know (a newer process wrote them)."""
    p = payload
    if kind == "accepted":
        return Accepted(TaskKind(p["task"]), p["ref_id"], p["queue_position"])
    if kind == PROGRESS:
        return Progress(
            Stage(p["stage"]),
            fraction=p["fraction"],
            queue_position=p["queue_position"],
            node=p["node"],
            node_type=p["node_type"],
            step=p["step"],
            max_steps=p["max_steps"],
            provider=p["provider"],
            waiting=p.get("waiting", ""),  # rows stored before the field existed lack it
        )
    if kind == "output":
        return OutputStored(p["index"], decode_outputs([p["artifact"]])[0])
    if kind == "text":
        return TextProduced(p["index"], p["text"], p["node"])
    if kind == "retrying":
        return decode_retries([p])[0]
    return None
