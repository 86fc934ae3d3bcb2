"""One websocket per agent, shared by every run on it: frames routed by ``prompt_id``.

ComfyUI sends a prompt's messages to the ``client_id`` it was queued with, so one socket (one
``clientId``) serves every prompt this process queues on the agent: a run
:meth:`~AgentChannel.subscribe`\\ s to its prompt id before queueing and reads its own messages
from its :class:`Subscription`. ``status`` frames (the queue changed) go to every subscriber
whose prompt has not started; frames naming no prompt are dropped (the channel asks for
preview metadata, so binary frames name theirs).

When the socket drops, every subscriber reads :class:`SocketLost` once; each then calls
:meth:`Subscription.reopen` (the first one reconnects, with backoff; the others find it open)
and reads its prompt's state back over HTTP. A run re-attaching to a prompt queued under
another ``client_id`` (an earlier process) opens a channel of its own with that id.

ComfyUI keeps one socket per client id: a second socket under ours (another coordinator that
took over our prompts) takes our messages, and its close unregisters the id; our socket stays
open but silent. A run that learns over HTTP what the socket should have told it calls
:meth:`Subscription.reopen_silent`: the socket is closed and every run recovers as from a drop
(the reopen registers the id with ComfyUI again).

Queue positions come from the channel too, without a ``GET /queue`` per job: the prompts this
channel queued that are ahead of a prompt and have not ended (exact when the agent serves
only this process; other clients' prompts are not counted).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable

from aiserver.providers.comfy import messages as msg
from aiserver.providers.comfy.agent_socket import AgentSocket, SocketLost
from aiserver.providers.failures import Cause, ProviderUnavailable

__all__ = ["AgentChannel", "Subscription"]

logger = logging.getLogger(__name__)

OpenSocket = Callable[[str], Awaitable[AgentSocket]]
"""Opens ``/ws?clientId=`` (the transport's ``open_websocket``)."""


class _Lost:
    """Put in every subscription when the socket drops."""


_LOST = _Lost()
_ENDS = (msg.ExecutionSuccess, msg.ExecutionError, msg.ExecutionInterrupted)


class Subscription:
    """One prompt's messages from its agent's shared websocket.

    Its own small queue rather than an ``asyncio.Queue`` plus ``asyncio.timeout`` per wait:
    a job reads about ten frames, and those two were a good part of the CPU per frame.
    """

    def __init__(self, channel: AgentChannel, prompt_id: str) -> None:
        self._channel = channel
        self.prompt_id = prompt_id
        self.order: int | None = None
        """When its prompt was queued, among this channel's (None: not by this channel)."""
        self.ended = False
        """The prompt's end was seen (it no longer holds a queue position)."""
        self.wants_status = True
        """Queue changes (``status`` frames) are delivered: until the run says its prompt
        started (:meth:`started`), when its place in the queue no longer matters."""
        self._items: collections.deque[msg.Message | _Lost] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def client_id(self) -> str:
        return self._channel.client_id

    async def recv(self, deadline: float | None = None) -> msg.Message:
        """The next message for this prompt (or a broadcast); :class:`SocketLost` once per drop;
        ``TimeoutError`` once the loop's time reaches ``deadline``."""
        while not self._items:
            loop = asyncio.get_running_loop()
            if deadline is not None:
                if loop.time() >= deadline:
                    raise TimeoutError
                self._arm(loop, deadline)
            waiter = self._waiter = loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return self._take()

    def recv_nowait(self) -> msg.Message | None:
        """The next message if one is waiting, else None (:class:`SocketLost` as recv)."""
        return self._take() if self._items else None

    def started(self) -> None:
        """Its prompt runs: ``status`` frames are no longer of interest."""
        self.wants_status = False

    async def reopen(self, budget_s: float, backoff_s: float, backoff_max_s: float) -> None:
        """After :class:`SocketLost`: until the shared socket is back (or the budget is spent)."""
        await self._channel.reopen(budget_s, backoff_s, backoff_max_s)

    def socket_generation(self) -> int:
        """Which socket the channel has open now (counts opens): for :meth:`reopen_silent`."""
        return self._channel.generation

    async def reopen_silent(self, generation: int) -> bool:
        """The socket ``generation`` missed this prompt's messages: re-open it (see the module);
        False when it is no longer the open one (another run re-opened it, or it dropped)."""
        return await self._channel.reopen_silent(generation)

    def queuing(self) -> None:
        """Its prompt is being queued now (call before ``POST /prompt``): its place in line."""
        self.order = self._channel.next_place()

    def position(self) -> int:
        """Prompts of this channel queued before ours that have not ended (running included)."""
        return self._channel.ahead_of(self)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._channel.unsubscribe(self)

    def _take(self) -> msg.Message:
        item = self._items.popleft()
        if isinstance(item, _Lost):
            raise SocketLost(f"websocket to {self._channel.name} dropped")
        return item

    def _arm(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        # One timer kept across waits: a run's deadline mostly moves later (it follows the
        # last message heard), so a timer set for an earlier one fires early at worst, and the
        # wait is armed again. A new timer only when none is set, or it is too late.
        timer = self._timer
        if timer is not None and timer.when() <= deadline:
            return
        if timer is not None:
            timer.cancel()
        self._timer = loop.call_at(deadline, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _put(self, item: msg.Message | _Lost) -> None:
        if isinstance(item, _ENDS) or (isinstance(item, msg.Executing) and item.node is None):
            self.ended = True
        self._items.append(item)
        self._wake()


class AgentChannel:
    """The shared websocket of one agent under one ``client_id``."""

    def __init__(self, name: str, open_socket: OpenSocket, client_id: str) -> None:
        self.name = name
        self.client_id = client_id
        self._open_socket = open_socket
        self._subs: dict[str, Subscription] = {}
        self._socket: AgentSocket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._order = itertools.count()
        self._closed = False
        self._flags: dict[str, object] = {}
        self._flags_seen = asyncio.Event()
        self.generation = 0
        """Sockets opened so far: names the open one."""

    async def subscribe(self, prompt_id: str) -> Subscription:
        """Route ``prompt_id``'s frames to a new subscription, opening the socket if needed.

        Subscribe before queueing: ComfyUI sends nothing to a client that is not connected.
        """
        sub = Subscription(self, prompt_id)
        self._subs[prompt_id] = sub
        try:
            await self._ensure_open()
        except BaseException:
            self.unsubscribe(sub)
            raise
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if self._subs.get(sub.prompt_id) is sub:
            del self._subs[sub.prompt_id]

    async def frames_name_prompt(self, wait_s: float) -> bool:
        """The agent said its binary frames carry prompt ids (``supports_preview_metadata``).

        It answers our feature flags right after the socket opens; an older agent never does,
        which costs ``wait_s`` once per channel.
        """
        if not self._flags_seen.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._flags_seen.wait()
            self._flags_seen.set()  # asked once: an agent that did not answer never will
        return self._flags.get("supports_preview_metadata") is True

    def next_place(self) -> int:
        return next(self._order)

    def ahead_of(self, sub: Subscription) -> int:
        mine = sub.order
        return sum(
            1
            for s in self._subs.values()
            if s.order is not None and not s.ended and (mine is None or s.order < mine)
        )

    async def reopen(self, budget_s: float, backoff_s: float, backoff_max_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget_s
        delay = backoff_s
        while True:
            try:
                await self._ensure_open()
                return
            except ProviderUnavailable:
                if self._closed or loop.time() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, backoff_max_s)

    async def reopen_silent(self, generation: int) -> bool:
        async with self._lock:  # no socket opens until the silent one is closed
            socket, reader = self._socket, self._reader
            if socket is None or reader is None or generation != self.generation:
                return False
            logger.warning(
                "websocket to %s (client %s) no longer receives its prompts' messages: "
                "re-opening it",
                self.name,
                self.client_id[:8],
            )
            self._socket = self._reader = None
            try:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
                # Closed before the new one opens: ComfyUI's cleanup of the old socket pops
                # the client id, which would unregister a newer socket.
                await socket.close()
            finally:
                for sub in list(self._subs.values()):
                    sub._put(_LOST)  # each run reopens and reads its prompt's state back
            return True

    async def aclose(self) -> None:
        """Stop reading and close the socket (without waiting on the agent)."""
        self._closed = True
        reader, socket = self._reader, self._socket
        self._reader = self._socket = None
        for sub in list(self._subs.values()):
            sub._put(_LOST)  # runs still on it fail now (reopen refuses), not at a timeout
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if socket is not None:
            await socket.close()

    async def _ensure_open(self) -> None:
        async with self._lock:
            if self._socket is not None:
                return
            if self._closed:
                raise ProviderUnavailable(
                    f"the websocket to {self.name} is closed",
                    cause=Cause.CLIENT_CLOSED,
                    agent=self.name,
                )
            socket = await self._open_socket(self.client_id)
            # Binary frames (previews, SaveImageWebsocket) then carry their prompt id. A socket
            # that drops at once is left to the reader: its runs recover as from any drop.
            with contextlib.suppress(SocketLost):
                await socket.send_json("feature_flags", {"supports_preview_metadata": True})
            self._socket = socket
            self.generation += 1
            self._reader = asyncio.create_task(
                self._read(socket), name=f"comfy-ws-{self.name}-{self.client_id[:8]}"
            )

    async def _read(self, socket: AgentSocket) -> None:
        subs = self._subs
        try:
            while True:
                message = await socket.recv()
                if message.prompt_id:
                    sub = subs.get(message.prompt_id)
                    if sub is not None:
                        sub._put(message)
                elif isinstance(message, msg.Status):
                    for sub in list(subs.values()):
                        if sub.wants_status:
                            sub._put(message)
                elif isinstance(message, msg.FeatureFlags):
                    self._flags = dict(message.flags)
                    self._flags_seen.set()
        except SocketLost as exc:
            logger.warning("websocket to %s dropped: %s", self.name, exc)
            await socket.close()
        finally:
            if self._socket is socket:  # not closed on purpose: every run recovers
                self._socket = None
                self._reader = None
                for sub in list(subs.values()):
                    sub._put(_LOST)
