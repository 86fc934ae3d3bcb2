"""Server streams whose client stopped taking messages: found and ended.

A response message that the client's HTTP/2 flow-control window has no room for keeps
grpc.aio's write waiting, and the handler with it: its streaming slot, its job watch, its
buffers, for as long as the call lasts (its deadline, or forever). grpc.aio gives a server no
way to reset one stream: ``context.abort`` queues the status behind the blocked message, and
a cancelled handler task leaves the call itself open in the core. So a write pending for the
idle time ends the call in two steps:

1. the handler task is cancelled: the slot, the watch and the handler's memory go at once;
2. the connection carrying it is shut down (its socket, found by the call's peer address), so
   the core ends the call and frees the unsent message; the client sees UNAVAILABLE and its
   channel reconnects. A connection that also carries another open stream (a proxy
   multiplexing many clients) is left open: its stalled stream then ends with the
   connection or the client's deadline, its server-side handler already gone (a proxy
   cancels it when its own client goes); but only :data:`MAX_SPARED` times within
   :data:`SPARE_WINDOW` idle times: the core's part of each such stream (the unsent message,
   up to a chunk) stays, so a client that keeps one stream open to shelter stalled ones loses
   its connection all the same.

The watch is one sweep timer for all streams, not a timer per message: a message costs two
stores of the clock.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Collection
from typing import Protocol

__all__ = ["MAX_SPARED", "StallWatch", "Writer", "shut_connection"]

logger = logging.getLogger(__name__)

_FD_DIR = "/proc/self/fd"
MAX_SPARED = 16
"""Stalled streams ended on one connection without shutting it, within :data:`SPARE_WINDOW`
idle times, before it is shut anyway."""
SPARE_WINDOW = 10
"""Idle times after a connection's first spared stream over which its spares are counted."""
_SPARED_PEERS = 4096
"""Connections whose spared streams are counted (then the counts start over)."""


class Writer(Protocol):
    """One server stream as the watch sees it."""

    writing_since: float | None
    """``time.monotonic()`` when the message being written was handed to grpc; None when
    no write is waiting."""
    peer: str

    def stalled(self) -> None:
        """Its write waited the idle time: end it (the watch forgets it)."""


class StallWatch:
    """Calls ``stalled()`` on a watched writer whose write has waited ``idle_s`` (within a
    quarter of it), then shuts its connection unless another watched stream on it is not
    stalled. ``shut``: how a connection is shut (:func:`shut_connection` with the ports)."""

    def __init__(self, idle_s: float, shut: Callable[[str], bool]) -> None:
        self.idle_s = idle_s
        self._shut = shut
        self._writers: set[Writer] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._spared: dict[str, tuple[float, int]] = {}
        """Per connection (peer): when its first counted stalled stream was ended while it
        was left open, and how many since."""

    def add(self, writer: Writer) -> None:
        self._writers.add(writer)
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.idle_s / 4, self._sweep)

    def discard(self, writer: Writer) -> None:
        self._writers.discard(writer)

    def _sweep(self) -> None:
        self._timer = None
        now = time.monotonic()
        due = now - self.idle_s
        stalled = [
            w for w in self._writers if w.writing_since is not None and w.writing_since <= due
        ]
        for writer in stalled:
            self._writers.discard(writer)
            try:
                writer.stalled()
            except Exception:  # one writer's failure must not leave the others running
                logger.exception("ending a stalled stream")
        for peer, count in Counter(w.peer for w in stalled).items():
            if any(w.peer == peer for w in self._writers) and self._spare(peer, count):
                continue  # the connection still carries a live stream
            self._spared.pop(peer, None)
            try:
                self._shut(peer)
            except OSError:
                logger.warning("could not shut the connection of stalled stream %s", peer)
        if self._writers:
            self._timer = asyncio.get_running_loop().call_later(self.idle_s / 4, self._sweep)

    def _spare(self, peer: str, count: int) -> bool:
        """Whether ``peer``'s connection may stay open after ``count`` more stalled streams."""
        if len(self._spared) >= _SPARED_PEERS and peer not in self._spared:
            self._spared.clear()
        now = time.monotonic()
        since, spared = self._spared.get(peer, (now, 0))
        if now - since > SPARE_WINDOW * self.idle_s:
            since, spared = now, 0
        spared += count
        self._spared[peer] = (since, spared)
        return spared <= MAX_SPARED

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._writers.clear()


def _address(peer: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    """``ipv4:10.1.2.3:5555`` / ``ipv6:[::1]:5555`` -> (address, port); None otherwise."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6") or ":" not in rest:
        return None
    host, _, port = rest.rpartition(":")
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%")[0])
        return _unmapped(address), int(port)
    except ValueError:
        return None


def _unmapped(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    mapped = getattr(address, "ipv4_mapped", None)  # the core's dual-stack sockets
    return mapped if mapped is not None else address


def shut_connection(peer: str, local_ports: Collection[int]) -> bool:
    """Shut down (not close: the fd stays the core's) this process's TCP socket whose remote
    end is ``peer`` and local port one of ``local_ports``; whether one was found. Linux
    (``/proc/self/fd``); elsewhere nothing is found."""
    wanted = _address(peer)
    if wanted is None or not local_ports:
        return False
    try:
        names = os.listdir(_FD_DIR)
    except OSError:
        return False
    for name in names:
        try:
            if not os.readlink(f"{_FD_DIR}/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except (OSError, ValueError):
            continue  # closed meanwhile, or not an internet socket
        try:
            if sock.type != socket.SOCK_STREAM or sock.family not in (
                socket.AF_INET,
                socket.AF_INET6,
            ):
                continue
            remote, local = sock.getpeername(), sock.getsockname()
            host = _unmapped(ipaddress.ip_address(str(remote[0]).split("%")[0]))
            if (host, remote[1]) == wanted and local[1] in local_ports:
                sock.shutdown(socket.SHUT_RDWR)
                return True
        except (OSError, ValueError):
            continue
        finally:
            sock.close()  # the duplicate only
    return False
