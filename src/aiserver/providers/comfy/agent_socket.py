"""One open ``/ws`` connection to an agent, read as decoded messages."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from aiserver.providers.comfy.messages import Message, decode

__all__ = ["AgentSocket", "SocketLost"]


class SocketLost(Exception):
    """The websocket dropped (the agent went away, or the network did)."""


class AgentSocket:
    """One websocket to an agent, read as decoded messages."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws

    async def recv(self) -> Message:
        """The next frame; :class:`SocketLost` when the connection dropped."""
        try:
            frame = await self._ws.recv()
        except ConnectionClosed as exc:
            raise SocketLost(str(exc)) from exc
        return decode(frame)

    async def send_json(self, kind: str, data: Any) -> None:
        """A ``{"type", "data"}`` frame (``feature_flags`` is the one a client sends)."""
        try:
            await self._ws.send(json.dumps({"type": kind, "data": data}))
        except ConnectionClosed as exc:
            raise SocketLost(str(exc)) from exc

    async def close(self) -> None:
        """Close without waiting on the agent (errors ignored: the socket is done with)."""
        with contextlib.suppress(Exception):
            await self._ws.close()
