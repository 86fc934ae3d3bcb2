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
   channel reconnects.

A connection that still carries a call being served (a stream whose client took a message
within the idle time, or one waiting on its servicer, or a unary call in progress: a proxy
multiplexing many clients) is not shut for other streams' stalls: the stalled stream is
*spared*, its handler gone, and ends with the connection, the client's deadline or the
client's cancel (a proxy cancels it when its own client goes). The core keeps each spared
stream's unsent message (up to a chunk) meanwhile, so they are bounded process-wide: at most
``max_spared`` spared within the last :data:`SPARE_WINDOW` idle times; past that, the
connection holding the most of them is shut (logged at WARNING), its healthy calls with it.

The watch is one sweep timer for all streams, not a timer per message: a message costs two
stores of the clock. Finding the sockets (a scan of ``/proc/self/fd``) runs once per sweep,
for all the connections to shut, in a thread.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Collection
from typing import Protocol
from urllib.parse import unquote

__all__ = ["MAX_SPARED", "SPARE_WINDOW", "StallWatch", "Writer", "shut_connections"]

logger = logging.getLogger(__name__)

_FD_DIR = "/proc/self/fd"
MAX_SPARED = 256
"""Default ``max_spared``: stalled streams left open on connections still serving other calls,
process-wide (each holds up to one message in the core: ~256 x ``chunk_bytes``, 256 MiB at
the defaults, at worst)."""
SPARE_WINDOW = 10
"""Idle times a spared stream is counted for (a proxy's gone client's stream is cancelled by
the proxy; one still open after that is left to its deadline)."""

Address = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


class Writer(Protocol):
    """One server stream as the watch sees it."""

    writing_since: float | None
    """``time.monotonic()`` when the message being written was handed to grpc; None when
    no write is waiting."""
    peer: str

    def stalled(self, shut: bool) -> None:
        """Its write waited the idle time: end it (the watch forgets it); ``shut``: whether
        its connection is being shut (else the stream is left open in the core)."""


class StallWatch:
    """Calls ``stalled()`` on a watched writer whose write has waited ``idle_s`` (within a
    quarter of it), then shuts its connection unless it still serves another call (see the
    module docstring). ``shut``: shuts the connections of the given peers, run in a thread
    (:func:`shut_connections` with the ports)."""

    def __init__(
        self,
        idle_s: float,
        shut: Callable[[Collection[str]], Collection[str]],
        *,
        max_spared: int = MAX_SPARED,
    ) -> None:
        self.idle_s = idle_s
        self.max_spared = max_spared
        self._shut = shut
        self._writers: set[Writer] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._shutting: set[asyncio.Task[None]] = set()
        self.serving: dict[str, int] = {}
        """Per peer: its calls being served (opened, not finished nor stalled)."""
        self._spared: deque[tuple[float, str]] = deque()
        """Spared stalled streams, oldest first: when, and their connection (peer)."""

    def opened(self, peer: str) -> None:
        serving = self.serving
        serving[peer] = serving.get(peer, 0) + 1

    def closed(self, peer: str) -> None:
        serving = self.serving
        left = serving.pop(peer, 1) - 1
        if left > 0:
            serving[peer] = left

    def add(self, writer: Writer) -> None:
        self._writers.add(writer)
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.idle_s / 4, self._sweep)

    def discard(self, writer: Writer) -> None:
        self._writers.discard(writer)

    @property
    def spared(self) -> int:
        """Spared stalled streams counted now."""
        return len(self._spared)

    def _sweep(self) -> None:
        self._timer = None
        now = time.monotonic()
        due = now - self.idle_s
        stalled = [
            w for w in self._writers if w.writing_since is not None and w.writing_since <= due
        ]
        to_shut: set[str] = set()
        if stalled:
            for writer in stalled:
                self._writers.discard(writer)
            for peer, count in Counter(w.peer for w in stalled).items():
                if self.serving.get(peer, 0) > count:  # the others are served: spare it
                    self._spared.extend((now, peer) for _ in range(count))
                else:
                    to_shut.add(peer)
            to_shut |= self._over_bound(now)
        for writer in stalled:
            try:
                writer.stalled(writer.peer in to_shut)
            except Exception:  # one writer's failure must not leave the others running
                logger.exception("ending a stalled stream")
        if to_shut:
            task = asyncio.get_running_loop().create_task(self._shut_all(to_shut))
            self._shutting.add(task)
            task.add_done_callback(self._shutting.discard)
        if self._writers:
            self._timer = asyncio.get_running_loop().call_later(self.idle_s / 4, self._sweep)

    def _over_bound(self, now: float) -> set[str]:
        """Forgets spares past the window, and those of connections being shut; past
        ``max_spared``, picks the connections holding the most to shut."""
        spared = self._spared
        while spared and now - spared[0][0] > SPARE_WINDOW * self.idle_s:
            spared.popleft()
        chosen: set[str] = set()
        while len(spared) > self.max_spared:
            peer, held = Counter(p for _, p in spared).most_common(1)[0]
            logger.warning(
                "%d stalled streams spared on connections still serving other calls (bound"
                " %d): shutting the connection of %s, which holds %d of them, its other"
                " calls with it",
                len(spared),
                self.max_spared,
                peer,
                held,
            )
            chosen.add(peer)
            self._spared = spared = deque(s for s in spared if s[1] != peer)
        return chosen

    async def _shut_all(self, peers: set[str]) -> None:
        self._spared = deque(s for s in self._spared if s[1] not in peers)
        try:
            done = await asyncio.to_thread(self._shut, peers)
        except OSError:
            done = ()
        for peer in peers.difference(done):
            logger.warning("could not shut the connection of stalled stream %s", peer)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._writers.clear()
        for task in self._shutting:
            task.cancel()


def _address(peer: str) -> Address | None:
    """grpc's peer string -> (address, port); None for other transports. grpc (1.85)
    percent-encodes it: ``ipv4:10.1.2.3:5555``, ``ipv6:%5B::1%5D:5555`` (``[::1]``)."""
    kind, _, rest = unquote(peer).partition(":")
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


def shut_connections(peers: Collection[str], local_ports: Collection[int]) -> set[str]:
    """Shut down (not close: the fd stays the core's) this process's TCP sockets whose remote
    end is one of ``peers`` and local port one of ``local_ports``, in one scan of the open
    fds; returns the peers whose socket was found. Linux (``/proc/self/fd``); elsewhere
    nothing is found. Blocking: run it in a thread."""
    wanted: dict[Address, str] = {}
    for peer in peers:
        address = _address(peer)
        if address is not None:
            wanted[address] = peer
    found: set[str] = set()
    if not wanted or not local_ports:
        return found
    try:
        names = os.listdir(_FD_DIR)
    except OSError:
        return found
    for name in names:
        try:
            if not os.readlink(f"{_FD_DIR}/{name}").startswith("socket:"):
                continue
            fd = os.dup(int(name))
        except (OSError, ValueError):
            continue  # closed meanwhile
        try:
            sock = socket.socket(fileno=fd)
        except OSError:  # the number was reused meanwhile by something else
            os.close(fd)
            continue
        try:
            if sock.type != socket.SOCK_STREAM or sock.family not in (
                socket.AF_INET,
                socket.AF_INET6,
            ):
                continue
            local = sock.getsockname()
            if local[1] not in local_ports:
                continue
            remote = sock.getpeername()
            host = _unmapped(ipaddress.ip_address(str(remote[0]).split("%")[0]))
            match = wanted.get((host, remote[1]))
            if match is not None:
                sock.shutdown(socket.SHUT_RDWR)
                found.add(match)
                if len(found) == len(wanted):
                    break
        except (OSError, ValueError):
            continue
        finally:
            sock.close()  # the duplicate only
    return found
