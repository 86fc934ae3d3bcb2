"""ComfyUI's websocket frames as typed, frozen messages.

Text frames are JSON ``{"type": ..., "data": {...}}`` (shapes: the ``ws_trace_*.json``
recordings). Binary frames start with a big-endian u32 event type: 1 is a preview image
(``[u32 image type: 1 JPEG, 2 PNG][image]``), 4 a preview with metadata
(``[u32 length][JSON metadata][image]``). Anything else, or anything malformed, decodes to
:class:`Unknown`, never to an exception: an agent's odd frame must not fail a job.

Every message has ``prompt_id`` (``""`` when the frame names none), so a run can ignore other
prompts' messages before it matches on the type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiserver import fast_json

__all__ = [
    "Executed",
    "Executing",
    "ExecutionCached",
    "ExecutionError",
    "ExecutionInterrupted",
    "ExecutionStart",
    "ExecutionSuccess",
    "FeatureFlags",
    "Message",
    "Preview",
    "Progress",
    "ProgressState",
    "Status",
    "Unknown",
    "decode",
    "decode_event",
]


@dataclass(frozen=True, slots=True)
class Status:
    """The queue changed (also sent on connect, with our ``sid``)."""

    queue_remaining: int | None
    sid: str = ""
    prompt_id: str = ""


@dataclass(frozen=True, slots=True)
class FeatureFlags:
    """The server's answer to the client's feature flags."""

    flags: Mapping[str, Any]
    prompt_id: str = ""


@dataclass(frozen=True, slots=True)
class ExecutionStart:
    prompt_id: str


@dataclass(frozen=True, slots=True)
class ExecutionCached:
    """Nodes whose cached outputs are reused: they will not run."""

    prompt_id: str
    nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Executing:
    """A node starts; ``node`` None marks the end of the prompt (history is written)."""

    prompt_id: str
    node: str | None


@dataclass(frozen=True, slots=True)
class Progress:
    """Steps within a node (sampler steps, upscale tiles)."""

    prompt_id: str
    node: str
    value: int
    max: int


@dataclass(frozen=True, slots=True)
class ProgressState:
    """Every node's state so far (newer servers)."""

    prompt_id: str
    states: Mapping[str, str]
    """Node id -> ``running`` or ``finished``."""

    @property
    def finished(self) -> tuple[str, ...]:
        return tuple(node for node, state in self.states.items() if state == "finished")


@dataclass(frozen=True, slots=True)
class Executed:
    """A node's UI output (``{"images": [...]}``, ``{"text": [...]}``)."""

    prompt_id: str
    node: str
    output: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class ExecutionSuccess:
    prompt_id: str


@dataclass(frozen=True, slots=True)
class ExecutionError:
    """A node raised (``ws_trace_exec_error.json``)."""

    prompt_id: str
    node_id: str
    node_type: str
    exception_type: str
    exception_message: str
    traceback: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ExecutionInterrupted:
    prompt_id: str
    node_id: str
    node_type: str


@dataclass(frozen=True, slots=True)
class Preview:
    """A binary preview image (event 1, or 4 with metadata naming the prompt and node)."""

    image: bytes = field(repr=False)
    mime_type: str
    prompt_id: str = ""
    node: str = ""


@dataclass(frozen=True, slots=True)
class Unknown:
    """A frame of a type this client does not know, or one it could not read."""

    type: str
    """The JSON ``type``, ``binary:<event>`` for a binary frame, ``""`` when unreadable."""
    data: Any = field(repr=False)
    prompt_id: str = ""
    binary: bool = False


Message = (
    Status
    | FeatureFlags
    | ExecutionStart
    | ExecutionCached
    | Executing
    | Progress
    | ProgressState
    | Executed
    | ExecutionSuccess
    | ExecutionError
    | ExecutionInterrupted
    | Preview
    | Unknown
)

_IMAGE_TYPES = {1: "image/jpeg", 2: "image/png"}


def decode(frame: str | bytes) -> Message:
    """One websocket frame as a message."""
    if isinstance(frame, bytes):
        return _decode_binary(frame)
    try:
        body = fast_json.loads(frame)
    except ValueError:
        return Unknown("", frame)
    if not isinstance(body, dict):
        return Unknown("", body)
    return decode_event(body.get("type"), body.get("data"))


def decode_event(kind: Any, data: Any) -> Message:
    """A ``type`` and its ``data``, as in a frame or in history's ``[event, data]`` pairs."""
    if not isinstance(data, dict):
        return Unknown(str(kind or ""), data)
    pid = _str(data.get("prompt_id"))
    match kind:
        case "status":
            status = data.get("status")
            info = status.get("exec_info") if isinstance(status, dict) else None
            remaining = info.get("queue_remaining") if isinstance(info, dict) else None
            return Status(
                remaining if isinstance(remaining, int) else None, _str(data.get("sid")), pid
            )
        case "feature_flags":
            return FeatureFlags(data, pid)
        case "execution_start":
            return ExecutionStart(pid)
        case "execution_cached":
            return ExecutionCached(pid, tuple(str(n) for n in _list(data.get("nodes"))))
        case "executing":
            node = data.get("node")
            return Executing(pid, None if node is None else str(node))
        case "progress":
            value, maximum = _int(data.get("value")), _int(data.get("max"))
            return Progress(pid, _str(data.get("node")), value, maximum)
        case "progress_state":
            nodes = data.get("nodes")
            states = {
                str(node): _str(state.get("state"))
                for node, state in (nodes.items() if isinstance(nodes, dict) else ())
                if isinstance(state, dict)
            }
            return ProgressState(pid, states)
        case "executed":
            output = data.get("output")
            return Executed(
                pid, str(data.get("node")), output if isinstance(output, dict) else None
            )
        case "execution_success":
            return ExecutionSuccess(pid)
        case "execution_error":
            return ExecutionError(
                pid,
                _str(data.get("node_id")),
                _str(data.get("node_type")),
                _str(data.get("exception_type")),
                _str(data.get("exception_message")),
                tuple(str(line) for line in _list(data.get("traceback"))),
            )
        case "execution_interrupted":
            return ExecutionInterrupted(pid, _str(data.get("node_id")), _str(data.get("node_type")))
    return Unknown(str(kind or ""), data, pid)


def _decode_binary(frame: bytes) -> Message:
    event = int.from_bytes(frame[:4], "big") if len(frame) >= 8 else 0
    word = int.from_bytes(frame[4:8], "big") if len(frame) >= 8 else 0
    if event == 1 and word in _IMAGE_TYPES:
        return Preview(frame[8:], _IMAGE_TYPES[word])
    if event == 4 and 8 + word <= len(frame):
        try:
            meta = fast_json.loads(frame[8 : 8 + word])
        except ValueError:
            meta = None
        if isinstance(meta, dict):
            return Preview(
                frame[8 + word :],
                _str(meta.get("image_type")) or "application/octet-stream",
                _str(meta.get("prompt_id")),
                _str(meta.get("node_id")),
            )
    return Unknown(f"binary:{event}", frame, binary=True)


def _str(value: Any) -> str:
    return "" if value is None else str(value)


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
