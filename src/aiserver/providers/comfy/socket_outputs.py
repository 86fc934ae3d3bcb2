"""Images taken from the websocket: no file in the agent's ``output/``, no ``/view`` per job.

When the agent has ``SaveImageWebsocket`` and its binary frames name their prompt (the channel
asks for preview metadata), :func:`over_socket` rewrites each file-saving image output
(``SaveImage``) of the graph into two nodes fed by the same images:

- ``SaveImageWebsocket`` under a node id of its own: the agent sends every image as a binary
  frame (``ws_trace_saveimagewebsocket_metadata.json``: ``[u32 4][u32 len][JSON naming
  prompt_id and node_id][PNG]``, and a ``progress`` whose ``max`` is the batch size) and keeps
  no file. It gets one extra input, ``aiserver_run`` (the prompt id): ComfyUI ignores inputs a
  node does not declare but puts every input in its cache key, so this node is never served
  from the cache, where it would send nothing.
- ``PreviewImage`` under the bound output's id: a temporary file (ComfyUI empties ``temp/``
  when it starts), named in ``executed`` and in ``/history``. A run that missed frames (a
  dropped socket while the node ran, a re-attach after a restart when they had gone out)
  downloads that file with ``/view`` instead: the prompt is never queued again.
"""

from __future__ import annotations

import dataclasses

from aiserver.providers.comfy import messages as msg
from aiserver.providers.comfy.workflows import BuiltPrompt

__all__ = ["SAVE_OVER_SOCKET", "SOCKET_NODE_SUFFIX", "SocketImages", "over_socket"]

SAVE_OVER_SOCKET = "SaveImageWebsocket"
SOCKET_NODE_SUFFIX = "_ws"
"""The sender's node id is the bound output's id with this suffix (``9`` -> ``9_ws``)."""
_FILE_SAVERS = frozenset({"SaveImage"})


def over_socket(built: BuiltPrompt, prompt_id: str) -> BuiltPrompt:
    """``built`` with each file-saving image output also sent over the websocket."""
    graph = dict(built.graph)
    socket: dict[str, str] = {}
    for output in built.outputs:
        node = graph.get(output.node)
        if output.kind != "images" or not isinstance(node, dict):
            continue
        if node.get("class_type") not in _FILE_SAVERS:
            continue
        inputs = dict(node.get("inputs") or {})
        images = inputs.get("images")
        # PreviewImage ignores filename_prefix; kept, it tells operators (and the bench)
        # which job a prompt in the agent's queue or history belongs to.
        graph[output.node] = {"class_type": "PreviewImage", "inputs": inputs}
        sender = f"{output.node}{SOCKET_NODE_SUFFIX}"
        graph[sender] = {
            "class_type": SAVE_OVER_SOCKET,
            "inputs": {"images": images, "aiserver_run": prompt_id},
        }
        socket[sender] = output.node
    return dataclasses.replace(
        built,
        graph=graph,
        nodes_to_run=built.nodes_to_run | frozenset(socket),
        socket_outputs=socket,
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

    def frames(self, node: str) -> list[msg.Preview]:
        return list(self._frames.get(node, ()))
