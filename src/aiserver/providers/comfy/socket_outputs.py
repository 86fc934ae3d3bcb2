"""Images taken from the websocket: nothing written to the agent's disk, no ``/view`` per job.

When the agent has ``SaveImageWebsocket`` and its binary frames name their prompt (the channel
asks for preview metadata), :func:`over_socket` turns each file-saving image output
(``SaveImage``) of the graph into a ``SaveImageWebsocket`` under the same node id: the agent
sends every image as a binary frame (``ws_trace_saveimagewebsocket_metadata.json``: ``[u32 4]
[u32 len][JSON naming prompt_id and node_id][PNG]``, and a ``progress`` whose ``max`` is the
batch size) and keeps no file, in ``output/`` or ``temp/``.

The node keeps two inputs it does not declare (ComfyUI ignores them, but every input is part of
a node's cache key): ``filename_prefix``, which names the job for operators reading the agent's
queue or history, and ``aiserver_run``, the prompt id, so the node is never served from the
cache (where it would send nothing), as its own ``IS_CHANGED`` (the time) already ensures.

A run that missed frames (its socket dropped while the node ran; the prompt ended while no
coordinator watched it) has no file to fall back on: it queues the same graph again with a new
prompt id (:func:`again`). ComfyUI serves every upstream node from its cache when the cache
still holds them, so only the sender runs again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from aiserver.providers.comfy import messages as msg
from aiserver.providers.comfy.workflows import BuiltPrompt

__all__ = ["RECOVERS", "SAVE_OVER_SOCKET", "SocketImages", "again", "over_socket"]

SAVE_OVER_SOCKET = "SaveImageWebsocket"
RUN_INPUT = "aiserver_run"
RECOVERS = "aiserver_recovers"
"""Set on the sender of a prompt queued again for its frames: the prompt id it recovers."""
_FILE_SAVERS = frozenset({"SaveImage"})


def over_socket(built: BuiltPrompt, prompt_id: str) -> BuiltPrompt:
    """``built`` with each file-saving image output sent over the websocket instead."""
    graph = built.graph
    socket: set[str] = set()
    for output in built.outputs:
        node = graph.get(output.node)
        if output.kind != "images" or not isinstance(node, dict):
            continue
        if node.get("class_type") not in _FILE_SAVERS:
            continue
        inputs = node.get("inputs") or {}
        # The graph is the run's own copy (Workflow.build): replaced in place.
        graph[output.node] = {
            "class_type": SAVE_OVER_SOCKET,
            "inputs": {**inputs, RUN_INPUT: prompt_id},
        }
        socket.add(output.node)
    if not socket:
        return built
    return dataclasses.replace(built, socket_outputs=frozenset(socket))


def again(
    graph: Mapping[str, Any], senders: frozenset[str], prompt_id: str, recovers: str
) -> dict[str, Any]:
    """``graph`` to queue again as ``prompt_id``: only its senders differ (never cached)."""
    out = dict(graph)
    for node in senders:
        entry = out.get(node)
        if isinstance(entry, dict):
            inputs = {**(entry.get("inputs") or {}), RUN_INPUT: prompt_id, RECOVERS: recovers}
            out[node] = {**entry, "inputs": inputs}
    return out


def senders_in(graph: Mapping[str, Any], outputs: frozenset[str]) -> frozenset[str]:
    """The bound outputs that ``graph`` (as queued, e.g. read back from history) sends over
    the websocket."""
    return frozenset(
        node
        for node in outputs
        if isinstance(graph.get(node), dict) and graph[node].get("class_type") == SAVE_OVER_SOCKET
    )


class SocketImages:
    """The image frames of one prompt's socket outputs, and whether all of them came."""

    def __init__(self, nodes: frozenset[str]) -> None:
        self.nodes = nodes
        self._frames: dict[str, list[msg.Preview]] = {node: [] for node in nodes}
        self._expected: dict[str, int] = {}

    def add(self, frame: msg.Preview) -> None:
        self._frames[frame.node].append(frame)

    def expect(self, node: str, count: int) -> None:
        """A ``progress`` of the node: ``max`` is how many images it sends."""
        if count > 0:
            self._expected[node] = max(count, self._expected.get(node, 0))

    def node_complete(self, node: str) -> bool:
        frames = self._frames.get(node)
        return bool(frames) and len(frames or ()) >= self._expected.get(node, 0)

    def complete(self) -> bool:
        return all(self.node_complete(node) for node in self.nodes)

    def frames(self, node: str) -> list[msg.Preview]:
        return list(self._frames.get(node, ()))
