"""What the service writes into the prompts it queues, read back by the stand-ins that tests
and benches run: the job a prompt is for, and the prompt a repeat recovers."""

from __future__ import annotations

from typing import Any

from aiserver.providers.comfy.socket_outputs import RECOVERS, SAVE_OVER_SOCKET

__all__ = ["job_label", "repeated"]

_SAVERS = ("SaveImage", SAVE_OVER_SOCKET)


def job_label(prompt: dict[str, Any]) -> str:
    """The last part of the output node's filename prefix: the service's job id (outputs over
    the websocket keep it on ``SaveImageWebsocket``, which ignores it), or a direct client's
    label."""
    for node in prompt.values():
        if isinstance(node, dict) and node.get("class_type") in _SAVERS:
            return str(node.get("inputs", {}).get("filename_prefix", "")).rsplit("/", 1)[-1]
    return ""


def repeated(prompt: dict[str, Any]) -> str:
    """The prompt id a prompt repeats for its image frames (``aiserver_recovers`` on its
    sender), else ""."""
    for node in prompt.values():
        if isinstance(node, dict) and node.get("class_type") == SAVE_OVER_SOCKET:
            return str(node.get("inputs", {}).get(RECOVERS, ""))
    return ""
