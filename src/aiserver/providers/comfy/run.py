"""One job on one agent: upload, queue, follow the websocket, recover, download.

The pool starts a :class:`Run` over an agent's transport
(:class:`~aiserver.providers.comfy.client.ComfyClient`), with the timeouts and the background
spawner it owns. One run:

1. subscribe to the prompt id on the agent's shared websocket
   (:class:`~aiserver.providers.comfy.channel.AgentChannel`, opened once per agent) first:
   ComfyUI drops messages for absent clients;
2. upload each input as ``{job_id}-{field}-{sha8}.{ext}`` (unique per job, so a resubmit never
   reuses another job's cached result, and a retry of the same job reuses its own upload), or,
   with ``reuse_input_names``, under a name of the agent's that the next job overwrites once
   this one has ended (:mod:`~aiserver.providers.comfy.input_names`);
3. checkpoint ``{agent, prompt_id, client_id, seed}`` (the prompt id is ours, so a restart can
   re-attach even if it happened mid-``POST``), then ``POST /prompt`` with that ``prompt_id``;
4. follow the websocket's typed messages (:mod:`~aiserver.providers.comfy.messages`) for our
   ``prompt_id`` into :class:`ProviderProgress`, never decreasing; outputs come from
   ``executed`` (``/history`` or ``/api/jobs`` when messages were missed);
5. take images from the websocket when the outputs go over it (``socket_outputs``, see
   :mod:`~aiserver.providers.comfy.socket_outputs`), else download them with ``/view``; text
   outputs (``{"text": [...]}``) go to the sink as text. When frames were missed (a drop while
   the sender ran, a prompt that ended while no coordinator watched it), the same graph is
   queued again under a new prompt id (checkpointed first): upstream nodes come from
   ComfyUI's cache when it still holds them, and nothing is ever read from the agent's disk.

A dropped websocket is reopened with backoff (once for every run on it) and each prompt's state
read back over HTTP. Queue positions are counted by the channel, not asked per job. When a
run is abandoned (cancelled, timed out, the agent lost), its prompt is deleted if pending and
interrupted if running; a cancellation whose message is ``SHUTDOWN`` detaches instead, leaving
the prompt to be re-attached after the restart, and one whose message is :data:`AGENT_OFFLINE`
(the pool found the agent unresponsive) leaves the withdrawal to the background instead of
waiting up to ``cancel_s`` for an agent that may be hung. Failures are typed
(:class:`~aiserver.providers.failures.ProviderFailure` and its cause).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import io
import logging
import mimetypes
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import PurePosixPath
from typing import Any

from PIL import Image, UnidentifiedImageError

from aiserver.errors import ErrorKind, FieldViolation, ServiceError
from aiserver.providers.base import (
    SHUTDOWN,
    GeneratedImage,
    GeneratedText,
    ProviderProgress,
    RunSink,
    WorkInput,
    WorkItem,
)
from aiserver.providers.comfy import messages as msg
from aiserver.providers.comfy.agent_socket import SocketLost
from aiserver.providers.comfy.background import Spawn
from aiserver.providers.comfy.channel import AgentChannel, Subscription
from aiserver.providers.comfy.client import ComfyClient, RemoteJob
from aiserver.providers.comfy.errors import (
    agent_unavailable,
    execution_failure,
    interrupted,
    prompt_rejection,
)
from aiserver.providers.comfy.settings import ComfyTimeouts
from aiserver.providers.comfy.socket_outputs import (
    SocketImages,
    again,
    over_socket,
    senders_in,
)
from aiserver.providers.comfy.tracking import NodeTracker
from aiserver.providers.comfy.workflows import BuiltPrompt, Workflow
from aiserver.providers.failures import Cause, ProviderUnavailable
from aiserver.stages import Stage

__all__ = ["AGENT_OFFLINE", "Run"]

logger = logging.getLogger(__name__)

AGENT_OFFLINE = "aiserver:agent-offline"
"""Message of the ``CancelledError`` the pool ends a run with when its agent went offline."""

_MAX_REPEATS = 2
"""Times a prompt whose frames were missed is queued again before the attempt fails (retryable):
each needs a drop or a restart of its own."""

_MAX_SILENT_REOPENS = 3
"""Times one run re-opens a socket that missed its prompt's messages: two coordinators under
one client id (a take-over) silence each other's socket in turn; each run stops at this."""


class Run:
    """The state of one run of one job on one agent.

    ``timeouts`` bound its phases; ``spawn`` starts the clean-up that must outlive a cancelled
    run (both are the pool's). It re-attaches when ``work.resume`` names this agent.
    ``socket_lost`` is called when the websocket drops, before reconnecting: the pool checks at
    once whether the agent is still there (if not, it ends this run rather than let it wait out
    the reconnect budget).
    ``socket_outputs`` takes output images from the websocket when the agent's frames name
    their prompt; ``reuse_input_names`` uploads inputs under the agent's reusable names (both
    the pool's settings, off by default).
    """

    def __init__(
        self,
        client: ComfyClient,
        work: WorkItem,
        workflow: Workflow,
        sink: RunSink,
        *,
        timeouts: ComfyTimeouts,
        spawn: Spawn,
        socket_lost: Callable[[], None] = lambda: None,
        socket_outputs: bool = False,
        reuse_input_names: bool = False,
    ) -> None:
        self.c = client
        self.t = timeouts
        self.spawn = spawn
        self.socket_lost = socket_lost
        self.work = work
        self.workflow = workflow
        self.sink = sink
        resume = work.resume if work.resume.get("agent") == client.name else {}
        self.resume = resume
        self.client_id = resume.get("client_id") or client.channel.client_id
        self.prompt_id = resume.get("prompt_id") or str(uuid.uuid4())
        seed = resume.get("seed", "")
        self.seed = int(seed) if seed.isdigit() else None
        # Images over the websocket when the agent can (decided once the socket is open); a
        # re-attached prompt keeps what its checkpoint says.
        self.socket_outputs = resume.get("outputs") == "socket" if resume else socket_outputs
        self.images = SocketImages(frozenset())
        self.reuse_input_names = reuse_input_names
        self.input_slot: int | None = None  # held from the first upload to the run's end
        self.inputs_ours = False  # the graph loads inputs this run uploaded (and still holds)
        self.repeats = 0
        self.silent_reopens = 0
        self.sub: Subscription | None = None
        self.own_channel: AgentChannel | None = None  # re-attached under an earlier client id
        self.attached = False
        self.built: BuiltPrompt | None = None
        self.tracker: NodeTracker | None = None
        self.queued = False  # the prompt may exist on the agent
        self.started = False
        self.finished = False  # the agent is done with the prompt
        self.success = False
        self.outputs: dict[str, Any] = {}
        self.loop = asyncio.get_running_loop()
        self.started_at = 0.0
        self.queued_at = 0.0
        self.position_checked = 0.0
        self.last_sent: ProviderProgress | None = None
        self.best = 0.0
        self.withdrawing: asyncio.Task[None] | None = None
        """The withdrawal of the prompt left on an agent that went offline, while it runs
        in the background (the pool holds the run's place on the agent until it ends)."""

    # -- top level --

    def _uploaded(self) -> tuple[str, ...]:
        # The inputs the graph reads that this run has (a workflow's may be optional).
        return tuple(n for n in self.workflow.input_names if n in self.work.inputs)

    async def execute(self) -> None:
        try:
            await self._execute()
        except asyncio.CancelledError as cancel:
            if cancel.args and cancel.args[0] == SHUTDOWN:
                # The server is stopping: leave the prompt running; the checkpoint re-attaches.
                logger.info("detaching from prompt %s on %s", self.prompt_id, self.c.name)
            elif cancel.args and cancel.args[0] == AGENT_OFFLINE:
                # The agent did not answer its probe: a withdrawal may wait out cancel_s, and
                # the job's retry elsewhere (and its slot) must not wait with it.
                if self.queued and not self.finished:
                    self.withdrawing = self.spawn(self._abandon("agent offline"))
            elif self.queued and not self.finished:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(self.spawn(self._abandon("cancelled")))
            raise
        except Exception:
            if self.queued and not self.finished:
                await self._abandon("failed")
            raise
        finally:
            self._release_inputs()
            if self.sub is not None:
                self.sub.close()
            if self.own_channel is not None and self.c.let_go(self.own_channel):
                # The close handshake can wait on unread broadcasts (up to close_timeout):
                # the job is over, so it must not wait for it.
                self.spawn(self.own_channel.aclose())

    async def _execute(self) -> None:
        channel = self.c.channel
        if self.client_id != channel.client_id:
            # ComfyUI sends the prompt's messages to the client id it was queued with.
            channel = self.c.adopt(self.client_id)
            self.own_channel = channel
        self.sub = await channel.subscribe(self.prompt_id)
        if self.socket_outputs and not self.resume:
            # ComfyUI answers at once; an older agent never does (waited for once).
            self.socket_outputs = await channel.frames_name_prompt(min(self.t.connect_s, 2.0))
        attached = False
        if self.resume.get("prompt_id"):
            attached = await self._attach()
        if not attached:
            await self._emit(ProviderProgress(Stage.UPLOADING))
            await self._submit()
        while True:
            if not self.finished:
                await self._follow()
            if self.images.complete():
                break
            if self.repeats >= _MAX_REPEATS:
                raise self._unavailable(
                    f"prompt {self.prompt_id} ended but its images never arrived",
                    Cause.OUTPUT_MISSING,
                )
            await self._repeat()
        await self._deliver()

    async def _submit(self) -> None:
        """Upload the inputs, build the graph, checkpoint, queue."""
        uploads = await self._upload_inputs()
        self.inputs_ours = True
        built = self.workflow.build(self.work, uploads, seed=self.seed)
        if self.socket_outputs:
            built = over_socket(built, self.prompt_id)
        self._track(built)
        await self.sink.checkpoint(self._checkpoint())
        await self._queue()

    def _track(self, built: BuiltPrompt) -> None:
        self.built = built
        self.tracker = NodeTracker(built)
        self.images = SocketImages(built.socket_outputs)

    def _checkpoint(self) -> dict[str, str]:
        assert self.built is not None
        state = {"agent": self.c.name, "prompt_id": self.prompt_id, "client_id": self.client_id}
        if self.built.seed is not None:
            state["seed"] = str(self.built.seed)
        if self.built.socket_outputs:
            state["outputs"] = "socket"
        return state

    async def _attach(self) -> bool:
        """Follow a prompt an earlier process queued; False when the agent lost it."""
        state = await self.c.remote_job(self.prompt_id)
        if state.state == "unknown":
            logger.info("agent %s has no prompt %s: queueing again", self.c.name, self.prompt_id)
            return False
        # The graph only serves tracking here: upload names do not matter, the seed does.
        names = {name: self._upload_name(name) for name in self._uploaded()}
        built = self.workflow.build(self.work, names, seed=self.seed)
        self._track(over_socket(built, self.prompt_id) if self.socket_outputs else built)
        self.queued = True
        self.attached = True
        logger.info("re-attached to prompt %s on %s (%s)", self.prompt_id, self.c.name, state.state)
        await self._absorb(state)
        return True

    async def _repeat(self) -> None:
        """The prompt ended (successfully) but some of its image frames never reached us: queue
        its graph again under a new prompt id, on this process's socket. Only the senders are
        sure to run again (they are never cached); the rest runs again only if ComfyUI's cache
        no longer holds it. Without a graph known to load this job's own inputs, the job is
        submitted afresh (same seed)."""
        assert self.built is not None
        self.repeats += 1
        previous = self.prompt_id
        graph = await self._graph_to_repeat()
        channel = self.c.channel
        if self.sub is not None:
            self.sub.close()
        self.prompt_id = str(uuid.uuid4())
        self.client_id = channel.client_id
        self.sub = await channel.subscribe(self.prompt_id)
        self.queued = self.started = self.finished = self.success = self.attached = False
        self.queued_at = self.started_at = 0.0
        self.outputs = {}
        frames_named = await channel.frames_name_prompt(min(self.t.connect_s, 2.0))
        senders = self.built.socket_outputs
        logger.info(
            "prompt %s on %s ended without its images reaching us: queued again as %s",
            previous,
            self.c.name,
            self.prompt_id,
        )
        if graph is None or not frames_named or senders_in(graph, senders) != senders:
            self.seed = self.built.seed
            self.socket_outputs = frames_named
            await self._submit()
            return
        self._track(
            dataclasses.replace(self.built, graph=again(graph, senders, self.prompt_id, previous))
        )
        await self.sink.checkpoint(self._checkpoint())
        await self._queue()

    async def _graph_to_repeat(self) -> dict[str, Any] | None:
        """The graph that ran, if it loads this job's inputs."""
        assert self.built is not None
        if self.inputs_ours:  # uploaded by this run, whose names no other job takes meanwhile
            return self.built.graph
        # Queued by an earlier process: read it back, and check that its input files are still
        # this job's (another process may reuse names; a stale name must not run another input).
        graph = (await self.c.remote_job(self.prompt_id)).graph
        if graph is None:
            return None
        for name in self._uploaded():
            node, field = self.workflow.input_target(name)
            entry = graph.get(node)
            value = entry.get("inputs", {}).get(field) if isinstance(entry, dict) else None
            if not isinstance(value, str):
                return None
            subfolder, _, file_name = value.rpartition("/")
            try:
                data, _ = await self.c.view(file_name, subfolder, "input")
            except ProviderUnavailable:
                return None
            if hashlib.sha256(data).hexdigest() != self.work.inputs[name].sha256:
                return None
        return dict(graph)

    # -- uploading and queueing --

    def _upload_name(self, name: str) -> str:
        item = self.work.inputs[name]
        job = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in self.work.job_id)
        return f"{job}-{name}-{item.sha256[:8]}{self._suffix(item)}"

    @staticmethod
    def _suffix(item: WorkInput) -> str:
        suffix = PurePosixPath(item.file_name).suffix.lower()
        if not suffix or len(suffix) > 6:
            suffix = mimetypes.guess_extension(item.mime_type) or ".png"
        return suffix

    def _release_inputs(self) -> None:
        """The slot goes back once the prompt cannot load its inputs any more: the run ended,
        or was abandoned (a prompt we withdraw may still start, but its result is dropped)."""
        if self.input_slot is not None:
            slot, self.input_slot = self.input_slot, None
            self.c.input_names.give_back(slot)

    async def _upload_inputs(self) -> dict[str, str]:
        uploads = {}
        for name in self._uploaded():
            item = self.work.inputs.get(name)
            if item is None:
                raise ServiceError(
                    ErrorKind.INVALID_ARGUMENT,
                    "MISSING_INPUT",
                    f"missing input: {name}",
                    violations=(FieldViolation(name, "required"),),
                    metadata={"field": name},
                )
            data = await _read_input(item)
            if self.reuse_input_names:
                if self.input_slot is None:
                    self.input_slot = self.c.input_names.take()
                file_name = self.c.input_names.name(self.input_slot, name, self._suffix(item))
                uploaded = await self.c.upload_image(
                    data, file_name, item.mime_type, overwrite=True
                )
            else:
                file_name = self._upload_name(name)
                uploaded = await self.c.upload_image(data, file_name, item.mime_type)
            uploads[name] = uploaded.path
        return uploads

    async def _queue(self) -> None:
        assert self.built is not None
        self.queued = True  # set first: a timed-out POST may still have queued it
        assert self.sub is not None
        self.sub.queuing()
        body = {
            "prompt": self.built.graph,
            "client_id": self.client_id,
            "prompt_id": self.prompt_id,
        }
        accepted, answer = await self.c.post_prompt(body)
        if not accepted:
            self.queued = False
            raise prompt_rejection(answer, self.workflow, self.built.graph, self.c.name)
        ours = {o.node for o in self.built.outputs}
        node_errors = answer.get("node_errors") or {}
        if isinstance(node_errors, dict) and any(
            ours & set(entry.get("dependent_outputs", []))
            for entry in node_errors.values()
            if isinstance(entry, dict)
        ):
            # A 200 runs the valid outputs only; ours would not come.
            raise prompt_rejection(answer, self.workflow, self.built.graph, self.c.name)
        self.queued_at = self.loop.time()
        logger.info(
            "queued prompt %s on %s for job %s", self.prompt_id, self.c.name, self.work.job_id
        )
        await self._report_position(force=True)

    # -- following --

    async def _follow(self) -> None:
        t = self.t
        if not self.queued_at:
            self.queued_at = self.loop.time()
        last_ours = last_heard = self.loop.time()
        while not self.finished:
            if self.started:
                deadline = min(self.started_at + t.execution_s, last_ours + t.idle_s)
            else:
                deadline = self.queued_at + t.queue_wait_s
            assert self.sub is not None
            try:
                message = await self.sub.recv(min(deadline, last_heard + t.poll_s))
            except TimeoutError:
                now = self.loop.time()
                if now >= deadline:
                    raise self._timeout_error(now, last_ours) from None
                await self._poll()
                last_heard = now
                continue
            except SocketLost:
                logger.warning("websocket to %s dropped during %s", self.c.name, self.prompt_id)
                self.socket_lost()
                await self._reconnect()
                await self._absorb(await self.c.remote_job(self.prompt_id))
                last_heard = last_ours = self.loop.time()
                continue
            last_heard = self.loop.time()
            if await self._on_message(message):
                last_ours = last_heard

    async def _poll(self) -> None:
        """The socket was quiet for ``poll_s``: read the prompt's state over HTTP. A prompt
        that started or ended unheard means ComfyUI sends our client id's messages elsewhere
        (another socket under it took them): the socket is re-opened before anything else,
        so that what follows (a repeat for missed frames included) is heard again."""
        assert self.sub is not None
        generation = self.sub.socket_generation()
        state = await self.c.remote_job(self.prompt_id)
        unheard = (state.state == "running" and not self.started) or (
            # An ended prompt is repeated on this process's own socket: an adopted one is
            # not re-opened for it (that would only take the id back from its owner).
            state.state == "done" and self.client_id == self.c.channel.client_id
        )
        if (
            unheard
            and self.silent_reopens < _MAX_SILENT_REOPENS
            and await self.sub.reopen_silent(generation)
        ):
            self.silent_reopens += 1
        await self._absorb(state)

    def _timeout_error(self, now: float, last_ours: float) -> ProviderUnavailable:
        t = self.t
        if not self.started:
            what, cause = f"did not start within {t.queue_wait_s:g}s", Cause.QUEUE_TIMEOUT
        elif now >= self.started_at + t.execution_s:
            what, cause = f"did not finish within {t.execution_s:g}s", Cause.EXECUTION_TIMEOUT
        else:
            what, cause = f"sent nothing for {t.idle_s:g}s", Cause.IDLE_TIMEOUT
        return self._unavailable(f"prompt {self.prompt_id} {what}", cause)

    def _unavailable(self, message: str, cause: Cause) -> ProviderUnavailable:
        return agent_unavailable(
            self.c.name, self.c.url, message, cause=cause, prompt_id=self.prompt_id
        )

    async def _reconnect(self) -> None:
        t = self.t
        assert self.sub is not None
        try:
            await self.sub.reopen(t.reconnect_s, t.backoff_initial_s, t.backoff_max_s)
        except ProviderUnavailable as exc:
            raise self._unavailable(
                f"websocket lost and not regained within {t.reconnect_s:g}s: {exc.message}",
                Cause.WEBSOCKET,
            ) from exc

    async def _on_message(self, message: msg.Message) -> bool:
        """Handle one message; True when it was about our prompt."""
        match message:
            case msg.Preview(prompt_id=pid, node=node) if (
                pid == self.prompt_id and node in self.images.nodes
            ):
                self.images.add(message)  # an output image, sent by SaveImageWebsocket
                return True
            case msg.Preview() | msg.Unknown(binary=True):
                return self.started  # a preview frame while we run
            case msg.Status():
                if not self.started:
                    await self._report_position()
                return False
        if message.prompt_id != self.prompt_id:
            return False
        tracker = self.tracker
        assert tracker is not None
        match message:
            case msg.ExecutionStart():
                self._mark_started()
            case msg.ExecutionCached(nodes=nodes):
                self._mark_started()
                tracker.finished(nodes)
            case msg.Executing(node=None):  # the end marker: history is written by now
                self._mark_started()
                await self._on_end()
                return True
            case msg.Executing(node=str(node)):
                self._mark_started()
                tracker.start(node)
            case msg.Progress(node=node, value=value, max=maximum):
                self._mark_started()
                if node in self.images.nodes:  # SaveImageWebsocket counting its frames
                    tracker.start(node)
                    self.images.expect(node, maximum)
                else:
                    tracker.progress(node, value, maximum)
            case msg.ProgressState():
                tracker.finished(message.finished)
            case msg.Executed(node=node, output=output):
                tracker.finished([node])
                if output is not None:
                    self.outputs[node] = output
            case msg.ExecutionSuccess():
                self.success = True
                if self._have_outputs():
                    self.finished = True
                return True
            case msg.ExecutionError():
                self.finished = True
                raise execution_failure(message, self.c.name)
            case msg.ExecutionInterrupted():
                self.finished = True
                raise interrupted(message, self.c.name)
            case _:
                return True
        if self.started:
            await self._emit(tracker.update())
        return True

    @property
    def built_outputs(self) -> Sequence[Any]:
        assert self.built is not None
        return self.built.outputs

    def _have_outputs(self) -> bool:
        """Every output node reported (``executed``); senders report nothing there (their
        frames are checked once the prompt has ended)."""
        senders = self.images.nodes
        return all(o.node in self.outputs or o.node in senders for o in self.built_outputs)

    def _mark_started(self) -> None:
        if not self.started:
            self.started = True
            self.started_at = self.loop.time()
            if self.sub is not None:
                self.sub.started()

    async def _on_end(self) -> None:
        if self.success and self._have_outputs():
            self.finished = True
            return
        # Outcome or outputs were missed (a reconnect): history has them now.
        state = await self.c.remote_job(self.prompt_id)
        if state.state != "done":
            raise self._unavailable(
                f"prompt {self.prompt_id} ended but the agent reports it {state.state}",
                Cause.INCONSISTENT,
            )
        await self._absorb(state)

    async def _absorb(self, state: RemoteJob) -> None:
        """Take in what HTTP says about the prompt (after a reconnect, a poll, a resume)."""
        if state.state == "pending":
            if not self.started:
                await self._report_position()
            return
        if state.state == "running":
            self._mark_started()
            return
        if state.state == "unknown":
            self.queued = False
            raise self._unavailable(
                f"prompt {self.prompt_id} vanished from the agent (restarted or deleted?)",
                Cause.PROMPT_LOST,
            )
        self.finished = True
        for node, output in state.outputs.items():
            if isinstance(output, dict):
                self.outputs.setdefault(str(node), output)
        if state.success:
            self.success = True
            return
        for message in state.messages:
            match message:
                case msg.ExecutionError():
                    raise execution_failure(message, self.c.name)
                case msg.ExecutionInterrupted():
                    raise interrupted(message, self.c.name)
        raise ServiceError(
            ErrorKind.INTERNAL,
            "COMFYUI_EXECUTION_ERROR",
            f"ComfyUI agent {self.c.name}: prompt {self.prompt_id} failed without details",
            metadata={"agent": self.c.name, "prompt_id": self.prompt_id},
        )

    async def _report_position(self, *, force: bool = False) -> None:
        if not self.attached:  # our own prompt: the channel counts what is ahead of it
            if self.sub is not None and not self.started:
                await self._emit(
                    ProviderProgress(Stage.PENDING, queue_position=self.sub.position())
                )
            return
        # A prompt an earlier process queued: only the agent's queue knows its place.
        now = self.loop.time()
        if not force and now - self.position_checked < 0.5:
            return
        self.position_checked = now
        position = await self.c.queue_position(self.prompt_id)
        if position is not None and not self.started:
            await self._emit(ProviderProgress(Stage.PENDING, queue_position=position))

    # -- results --

    async def _deliver(self) -> None:
        assert self.built is not None
        images: list[dict[str, Any]] = []
        texts: list[tuple[str, str]] = []
        framed: list[tuple[str, int, msg.Preview]] = []
        for binding in self.built.outputs:
            output = self.outputs.get(binding.node) or {}
            if binding.node in self.images.nodes:
                frames = self.images.frames(binding.node)
                framed += [(binding.node, i, f) for i, f in enumerate(frames)]
                continue
            if binding.kind == "images":
                images += [i for i in output.get("images") or [] if isinstance(i, dict)]
            else:
                texts += [(binding.node, str(t)) for t in output.get("text") or []]
        if not images and not texts and not framed:
            raise ServiceError(
                ErrorKind.INTERNAL,
                "COMFYUI_NO_OUTPUTS",
                f"ComfyUI agent {self.c.name}: prompt {self.prompt_id} succeeded with no outputs",
                metadata={"agent": self.c.name, "prompt_id": self.prompt_id},
            )
        for node, index, frame in framed:
            mime, width, height = _describe(frame.image, frame.mime_type)
            name = f"{node}_{index + 1:05d}{mimetypes.guess_extension(mime) or '.png'}"
            await self.sink.image(
                GeneratedImage(frame.image, name, mime, width, height, seed=self.built.seed)
            )
        if images:
            await self._emit(ProviderProgress(Stage.DOWNLOADING, fraction=1.0))
        for ref in images:
            file_name = str(ref.get("filename", ""))
            data, content_type = await self.c.view(
                file_name, str(ref.get("subfolder", "")), str(ref.get("type", "output"))
            )
            mime, width, height = _describe(data, content_type)
            await self.sink.image(
                GeneratedImage(data, file_name, mime, width, height, seed=self.built.seed)
            )
        for node, text in texts:
            await self.sink.text(GeneratedText(text, node))

    async def _emit(self, update: ProviderProgress) -> None:
        if update is self.last_sent:
            return
        self.best = max(self.best, update.fraction)
        if update.fraction < self.best:
            update = ProviderProgress(
                update.stage,
                self.best,
                update.queue_position,
                update.node,
                update.node_type,
                update.step,
                update.max_steps,
            )
        if update != self.last_sent:
            self.last_sent = update
            await self.sink.progress(update)

    async def _abandon(self, why: str) -> None:
        """Take our prompt off the agent: delete it if pending, interrupt it if running."""
        try:
            async with asyncio.timeout(self.t.cancel_s):
                await self.c.withdraw(self.prompt_id, started=self.started)
        except (ServiceError, TimeoutError) as exc:
            # asyncio's TimeoutError has no text: say what it means (a hung agent's).
            reason = str(exc) or f"no answer within {self.t.cancel_s:g} s"
            logger.warning(
                "could not withdraw prompt %s (%s) from %s: %s",
                self.prompt_id,
                why,
                self.c.name,
                reason,
            )


_INLINE_READ = 256 * 1024
"""Inputs up to this size are read on the loop: a thread hop costs more than the read."""


async def _read_input(item: WorkInput) -> bytes:
    if item.data is not None:
        return item.data
    with item.path.open("rb", buffering=0) as file:  # its size from the open file: no stat
        if os.fstat(file.fileno()).st_size <= _INLINE_READ:
            return file.readall()
    return await asyncio.to_thread(item.path.read_bytes)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _describe(data: bytes, content_type: str) -> tuple[str, int, int]:
    """MIME type and size of an image, from its header."""
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR":
        # What ComfyUI sends almost always: the size is in the first chunk, no decoder needed.
        return "image/png", int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    try:
        with Image.open(io.BytesIO(data)) as img:
            mime = (
                Image.MIME.get(img.format or "", "") or content_type or "application/octet-stream"
            )
            return mime, img.width, img.height
    except (UnidentifiedImageError, OSError):
        return content_type.split(";", maxsplit=1)[0] or "application/octet-stream", 0, 0
