"""A pool of ComfyUI agents, as one :class:`~aiserver.providers.base.Provider`.

Each agent is probed (``/system_stats``, then ``/object_info``) when the pool starts, then every
``probe_interval_s`` while online and with exponential backoff (at most ``probe_interval_s``)
while offline, and at once when a run's websocket drops; ``/system_stats`` gets
``probe_timeout_s`` to answer, so a hung agent goes offline within the probe interval plus
that, not the long request bound of uploads and downloads. A successful probe
discovers the agent's node types and model files (both ``/object_info`` combo shapes) and checks
every workflow against them; an agent is chosen for a task only if it has the task's nodes and
the model the spec asks for, and the reason it lacks them is kept for operators.

:meth:`ComfyPool.run` picks the least-loaded capable agent (higher priority breaks ties), waits
for a free slot when all are busy, and drives a :class:`~aiserver.providers.comfy.run.Run` over
that agent's transport with the pool's timeouts and background tasks. A failure's typed cause
decides what happens to the agent: ``agent_lost`` marks it offline, ``agent_outdated`` probes it
again; the failure is re-raised for the scheduler. An agent marked offline ends the runs it had
at once (each raises :class:`ProviderUnavailable` for a retry), so their slots do not wait out
the websocket's reconnect budget. ``WorkItem.exclude`` (or the ``exclude`` argument) names
agents the scheduler has already tried: they are chosen only when no other agent can take the
job (a restarted agent is a new chance).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiserver.errors import ErrorKind, ServiceError
from aiserver.providers.base import Provider, RunSink, WorkItem
from aiserver.providers.comfy.background import Background
from aiserver.providers.comfy.client import ComfyClient
from aiserver.providers.comfy.run import AGENT_OFFLINE, Run
from aiserver.providers.comfy.settings import AgentSettings, PoolSettings
from aiserver.providers.comfy.slots import AgentSlots, LocalSlots, SlotFencedSink, SlotToken
from aiserver.providers.comfy.socket_outputs import SAVE_OVER_SOCKET
from aiserver.providers.comfy.workflows import (
    AgentCapabilities,
    ModelNeed,
    Workflow,
    WorkflowCatalog,
    WorkflowCheck,
)
from aiserver.providers.failures import Cause, ProviderFailure, ProviderUnavailable
from aiserver.tasks import BUILT_IN_TASKS, TaskKind, TaskSpec

__all__ = ["AgentConfig", "AgentSnapshot", "AgentState", "ComfyPool", "PoolSettings"]

logger = logging.getLogger(__name__)


class AgentState(enum.Enum):
    STARTING = "STARTING"
    """Configured and enabled, not probed yet."""
    ONLINE = "ONLINE"
    OFFLINE = "OFFLINE"
    DISABLED = "DISABLED"


AgentConfig = AgentSettings
"""One ComfyUI agent (validated on creation)."""


@dataclass(frozen=True, slots=True)
class AgentSnapshot:
    """An agent as operators see it."""

    name: str
    url: str
    state: AgentState
    priority: int
    max_concurrent_jobs: int
    running_jobs: int
    tasks: tuple[TaskKind, ...]
    """Tasks it can serve with their default models."""
    unavailable: Mapping[TaskKind, str]
    """Tasks it cannot serve (or not with their default model), and why."""
    models: Mapping[str, tuple[str, ...]]
    """Model files by ComfyUI folder (``checkpoints``, ``upscale_models``...)."""
    last_error: str
    last_seen: datetime | None
    """When a probe last succeeded."""
    version: str
    """``comfyui_version`` from ``/system_stats``."""


class _Agent:
    def __init__(self, config: AgentConfig, client: ComfyClient) -> None:
        self.config = config
        self.client = client
        self.state = AgentState.STARTING if config.enabled else AgentState.DISABLED
        self.caps: AgentCapabilities | None = None
        self.checks: dict[TaskKind, WorkflowCheck] = {}
        self.running = 0
        self.leaving = 0
        """Places held by evicted runs' prompts until their withdrawal ends (see ``run``):
        not this pool's load, but no new run takes them."""
        self.last_error = ""
        self.last_seen: datetime | None = None
        self.version = ""
        self.backoff = 0.0
        self.next_probe = 0.0
        self.catalogue_due = 0.0
        """Loop time from which the next probe reads ``/object_info`` again (0: at once)."""
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.runs: set[asyncio.Task[Any]] = set()
        """The tasks running an attempt here (the provider's ``run`` calls)."""
        self.evicted: set[asyncio.Task[Any]] = set()
        """Those of ``runs`` cancelled because the agent went offline."""

    @property
    def busy(self) -> int:
        """Places taken on the agent: runs, and prompts being withdrawn."""
        return self.running + self.leaving


class ComfyPool:
    """Several ComfyUI agents behind the Provider protocol."""

    def __init__(
        self,
        agents: Iterable[AgentConfig],
        workflows: WorkflowCatalog,
        *,
        settings: PoolSettings | None = None,
        name: str = "comfyui",
    ) -> None:
        self._name = name
        self._workflows = workflows
        self._settings = settings or PoolSettings()
        self._agents: dict[str, _Agent] = {}
        for config in agents:
            if config.name in self._agents:
                raise ValueError(f"two agents named {config.name!r}")
            client = ComfyClient(
                config.name,
                config.url,
                api_key=config.api_key,
                connect_s=self._settings.timeouts.connect_s,
                request_s=self._settings.timeouts.request_s,
            )
            self._agents[config.name] = _Agent(config, client)
        self._changed = asyncio.Condition()
        self._background = Background()
        self._closed = False
        self._slots: AgentSlots = LocalSlots()

    def share_slots(self, slots: AgentSlots) -> None:
        """Take each agent slot from ``slots`` too: other coordinators use these agents."""
        self._slots = slots

    # ---- Provider ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    def refusal(self, task: TaskKind, spec: TaskSpec) -> ServiceError | None:
        """Why no agent can run ``spec`` while waiting would not help; None if one can (or an
        agent that is down now might, once it is back)."""
        workflow = self._workflows.resolve(task, spec)
        if workflow is None:
            return ServiceError(
                ErrorKind.UNIMPLEMENTED,
                "WORKFLOW_MISSING",
                f"no ComfyUI workflow for {task.value}",
                metadata={"task": task.value},
            )
        capable, reasons = self._capable(workflow, spec, frozenset())
        if capable:
            return None
        error = self._none_capable(workflow, spec, reasons, frozenset())
        return None if isinstance(error, ProviderFailure) and error.retryable else error

    def unavailable_reason(self, task: TaskKind, spec: TaskSpec) -> str:
        # The version the job was accepted with (a workflow job has no folder default).
        workflow = self._workflows.resolve(task, spec)
        if workflow is None:
            return f"no ComfyUI workflow for {task.value}"
        capable, reasons = self._capable(workflow, spec, frozenset())
        if capable:
            return ""
        return f"no ComfyUI agent can take it now ({_detail(reasons)})"

    def load(self) -> int:
        return sum(agent.running for agent in self._agents.values())

    def capacity(self) -> int:
        """Slots of the agents that are online: jobs beyond them wait in our queue."""
        return sum(
            agent.config.slots
            for agent in self._agents.values()
            if agent.state is AgentState.ONLINE
        )

    def supports(self, task: TaskKind) -> bool:
        """A workflow for ``task`` and at least one enabled agent, healthy or not."""
        # Named workflows come and go with the folder; each run carries its own.
        bound = task is TaskKind.WORKFLOW or self._workflows.find(task) is not None
        return bound and any(a.config.enabled for a in self._agents.values())

    def can_run(self, task: TaskKind, spec: TaskSpec) -> bool:
        workflow = self._workflows.resolve(task, spec)
        return workflow is not None and bool(self._capable(workflow, spec, frozenset())[0])

    async def run(
        self, work: WorkItem, sink: RunSink, exclude: frozenset[str] = frozenset()
    ) -> None:
        """Run on the best agent not in ``work.exclude | exclude``.

        A failure names the agent (``ProviderFailure.agent``), for the next exclude.
        """
        exclude = work.exclude | exclude
        workflow = self._workflows.resolve(work.task, work.spec) or self._workflows.get(work.task)
        agent, slot = await self._acquire(work, workflow, exclude)
        name = agent.config.name
        logger.debug("job %s (%s) runs on agent %s", work.job_id, work.task.value, name)
        if slot is not None:
            sink = SlotFencedSink(sink, lambda: self._slots.firm(slot), name)
        run = Run(
            agent.client,
            work,
            workflow,
            sink,
            timeouts=self._settings.timeouts,
            spawn=self._background.spawn,
            socket_lost=lambda: self._probe_soon(agent),  # dead, or a blip? ask it now
            socket_outputs=self._outputs_over_websocket(agent),
            reuse_input_names=self._settings.reuse_input_names,
        )
        task = asyncio.current_task()
        if task is not None:
            agent.runs.add(task)
        try:
            await run.execute()
        except asyncio.CancelledError:
            if task is None or task not in agent.evicted:
                raise
            # The agent went offline under this run (see _set_offline): give the slot back
            # now, as a failure the scheduler retries, instead of waiting out the reconnects.
            task.uncancel()
            raise ProviderUnavailable(
                f"agent {name} went offline during the job: {agent.last_error}",
                cause=Cause.CONNECTION,
                agent=name,
            ) from None
        except ProviderFailure as exc:
            if exc.agent_lost:
                await self._set_offline(agent, exc.message)
            if exc.agent_outdated:
                self._probe_soon(agent)  # its models or nodes changed since the last probe
            raise
        finally:
            if task is not None:
                agent.runs.discard(task)
                agent.evicted.discard(task)
            agent.running -= 1
            left = run.withdrawing
            if left is None or left.done():
                if slot is not None:
                    await self._slots.give_back(slot)
                await self._notify()
            else:
                # Evicted (the agent went offline): its prompt stays on the agent until the
                # withdrawal lands (or gives up after cancel_s). Its place there - and its
                # shared slot - is held till then, so an agent back meanwhile gets no more
                # than its capacity, from here or from another coordinator. Not this pool's
                # load: the job's retry elsewhere does not wait for it.
                # Spawned before any await: this task may be cancelled at the next one
                # (_notify waits for the condition, which _acquire may hold across a slow
                # shared-slot claim), and the counter and the slot must still come back.
                agent.leaving += 1
                self._background.spawn(self._vacate_after(left, agent, slot))
                await self._notify()

    async def _vacate_after(
        self, withdrawal: asyncio.Task[None], agent: _Agent, slot: SlotToken | None
    ) -> None:
        await asyncio.wait([withdrawal])
        agent.leaving -= 1
        if slot is not None:
            await self._slots.give_back(slot)
        await self._notify()

    async def withdraw(self, resume: Mapping[str, str]) -> None:
        """Delete the checkpoint's prompt from its agent's queue, or interrupt it if it runs
        (what a cancelled run does, for a prompt whose run died with its process)."""
        agent = self._agents.get(resume.get("agent", ""))
        prompt_id = resume.get("prompt_id", "")
        if agent is None or not prompt_id:
            return
        try:
            async with asyncio.timeout(self._settings.timeouts.cancel_s):
                await agent.client.withdraw(prompt_id)
        except (ServiceError, TimeoutError) as exc:
            logger.warning(
                "could not withdraw prompt %s from %s: %s", prompt_id, agent.config.name, exc
            )
            return
        logger.info(
            "withdrew prompt %s from %s (its job was cancelled)", prompt_id, agent.config.name
        )

    def _outputs_over_websocket(self, agent: _Agent) -> bool:
        caps = agent.caps
        return (
            self._settings.outputs_over_websocket
            and caps is not None
            and SAVE_OVER_SOCKET in caps.nodes
        )

    # ---- operators --------------------------------------------------------------------------

    def pick(
        self, task: TaskKind, spec: TaskSpec, exclude: frozenset[str] = frozenset()
    ) -> str | None:
        """The agent :meth:`run` would choose now, if one has a free slot."""
        workflow = self._workflows.resolve(task, spec)
        if workflow is None:
            return None
        capable = self._capable(workflow, spec, exclude)[0]
        if not capable and exclude:  # as in run(): an agent that already tried, as a last resort
            capable = self._capable(workflow, spec, frozenset())[0]
        free = [a for a in capable if a.busy < a.config.slots]
        return _best(free, self._slots.kept).config.name if free else None

    def snapshot(self) -> tuple[AgentSnapshot, ...]:
        extra = self._workflows.model_inputs()
        out = []
        for agent in self._agents.values():
            unavailable = {t: c.reason for t, c in agent.checks.items() if not c.ok}
            if agent.caps is not None:
                for task in BUILT_IN_TASKS:
                    if task not in agent.checks:
                        unavailable[task] = "no workflow"
            out.append(
                AgentSnapshot(
                    name=agent.config.name,
                    url=agent.config.url,
                    state=agent.state,
                    priority=agent.config.priority,
                    max_concurrent_jobs=agent.config.max_concurrent_jobs,
                    running_jobs=agent.running,
                    tasks=tuple(t for t, c in agent.checks.items() if c.ok),
                    unavailable=unavailable,
                    models=agent.caps.models_by_folder(extra) if agent.caps else {},
                    last_error=agent.last_error,
                    last_seen=agent.last_seen,
                    version=agent.version,
                )
            )
        return tuple(out)

    def capabilities(self) -> dict[str, AgentCapabilities]:
        """What each online agent has, by agent name (to check named workflows against)."""
        return {
            name: agent.caps
            for name, agent in self._agents.items()
            if agent.state is AgentState.ONLINE and agent.caps is not None
        }

    @property
    def workflows(self) -> WorkflowCatalog:
        return self._workflows

    def recheck(self) -> None:
        """Check every probed agent against the workflows again (they were reloaded)."""
        for agent in self._agents.values():
            if agent.caps is not None:
                agent.checks = self._workflows.check(agent.caps)

    async def changed(self) -> None:
        """Returns at the pool's next change: an agent probed, gone offline, or freed a slot."""
        async with self._changed:
            await self._changed.wait()

    async def probe(self, name: str) -> AgentSnapshot:
        """Probe one agent now and return its state."""
        agent = self._agents[name]
        if agent.state is not AgentState.DISABLED:
            agent.catalogue_due = 0.0
            await self._probe(agent)
        return next(s for s in self.snapshot() if s.name == name)

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Probe every enabled agent once (concurrently), then keep watching them."""
        enabled = [a for a in self._agents.values() if a.state is not AgentState.DISABLED]
        await asyncio.gather(*(self._probe(a) for a in enabled))
        for agent in enabled:
            agent.task = asyncio.create_task(
                self._watch(agent), name=f"comfy-probe-{agent.config.name}"
            )

    async def close(self) -> None:
        """Stop probing and close the clients; runs still going fail as unavailable."""
        self._closed = True
        tasks = [a.task for a in self._agents.values() if a.task is not None]
        for agent in self._agents.values():
            agent.wake.set()
        # Let a probe in flight finish: cancelling a connect mid-way can leak its socket.
        if tasks:
            await asyncio.wait(tasks, timeout=self._settings.timeouts.connect_s)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._notify()
        await self._background.drain()  # withdrawals of abandoned prompts, websocket closes
        for agent in self._agents.values():
            await agent.client.aclose()

    async def __aenter__(self) -> ComfyPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- probing ------------------------------------------------------------------------------

    async def _watch(self, agent: _Agent) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            wait = agent.next_probe - loop.time()
            if wait > 0:
                agent.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await agent.wake.wait()
                continue
            await self._probe(agent)

    async def _probe(self, agent: _Agent) -> bool:
        s = self._settings
        loop = asyncio.get_running_loop()
        # The catalogue is big (590 KB from a plain ComfyUI 0.8, megabytes with custom nodes;
        # ~140 ms of the agent's CPU to build, tens of ms of ours to parse): re-read only
        # when it may have changed, else every catalogue_interval_s; /system_stats says alive.
        fresh = agent.state is AgentState.ONLINE and agent.caps is not None
        info: dict[str, Any] | None = None
        try:
            # Its own short bound: a hung agent must go offline (ending its runs, taking no
            # new ones) within probe_timeout_s of the probe, not request_s.
            stats = await agent.client.system_stats(timeout_s=s.probe_timeout_s)
            system = stats.get("system")
            version = str(system.get("comfyui_version", "")) if isinstance(system, dict) else ""
            if not fresh or loop.time() >= agent.catalogue_due or version != agent.version:
                info = await agent.client.object_info()
        except ServiceError as exc:
            # Backing off spares a dead agent, but never past the probe interval: an agent that
            # is back must be noticed as soon as an online one would be re-checked.
            backoff = min(s.backoff_max_s, agent.backoff * 2 or s.backoff_initial_s)
            agent.backoff = min(backoff, s.probe_interval_s)
            agent.next_probe = loop.time() + agent.backoff
            await self._set_offline(agent, exc.message, reschedule=False)
            return False
        if info is not None:
            agent.caps = AgentCapabilities.from_object_info(info)
            agent.checks = self._workflows.check(agent.caps)
            agent.catalogue_due = loop.time() + s.catalogue_interval_s
        agent.version = version
        agent.last_seen = datetime.now(UTC)
        agent.backoff = 0.0
        agent.next_probe = loop.time() + s.probe_interval_s
        if agent.state is not AgentState.ONLINE:
            lacking = {t.value: c.reason for t, c in agent.checks.items() if not c.ok}
            logger.info(
                "agent %s online (ComfyUI %s); lacking: %s",
                agent.config.name,
                agent.version,
                lacking or "nothing",
            )
        agent.state = AgentState.ONLINE
        await self._notify()
        return True

    async def _set_offline(self, agent: _Agent, error: str, *, reschedule: bool = True) -> None:
        if agent.state is not AgentState.OFFLINE:
            logger.warning("agent %s offline: %s", agent.config.name, error)
        agent.state = AgentState.OFFLINE
        agent.last_error = error
        # Its attempts cannot go on: end them now (each raises for a retry elsewhere), the one
        # reporting the failure aside.
        current = asyncio.current_task()
        for task in agent.runs - agent.evicted:
            if task is not current:
                agent.evicted.add(task)
                task.cancel(AGENT_OFFLINE)  # withdraw its prompt in the background
        if reschedule:
            # Start the backoff over: the next probe comes soon, then further apart.
            agent.backoff = self._settings.backoff_initial_s
            agent.next_probe = asyncio.get_running_loop().time() + agent.backoff
            agent.wake.set()
        await self._notify()

    def _probe_soon(self, agent: _Agent) -> None:
        agent.next_probe = 0.0
        agent.catalogue_due = 0.0  # a lost socket (a restart?) or an outdated catalogue
        agent.wake.set()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # ---- choosing ------------------------------------------------------------------------------

    def _capable(
        self, workflow: Workflow, spec: TaskSpec, exclude: frozenset[str]
    ) -> tuple[list[_Agent], dict[str, str]]:
        """Online agents that can run ``spec``, and why each other agent cannot."""
        capable, reasons = [], {}
        needs: tuple[ModelNeed, ...] | None = None  # the same for every agent: found once
        for name, agent in self._agents.items():
            caps = agent.caps
            if name in exclude:
                reasons[name] = "already tried"
                continue
            if agent.state is not AgentState.ONLINE or caps is None:
                reasons[name] = agent.state.value.lower() + (
                    f" ({agent.last_error})" if agent.last_error else ""
                )
                continue
            if needs is None:
                needs = workflow.models_for(spec)
            why = workflow.unmet(caps, needs)
            if why:
                reasons[name] = why
            else:
                capable.append(agent)
        return capable, reasons

    async def _acquire(
        self, work: WorkItem, workflow: Workflow, exclude: frozenset[str]
    ) -> tuple[_Agent, SlotToken | None]:
        resumed = self._agents.get(work.resume.get("agent", ""))
        if (
            resumed is not None
            and resumed.config.name not in exclude
            and resumed.state is not AgentState.DISABLED
            and work.resume.get("prompt_id")
        ):
            # Its prompt is already on that agent: follow it there, slot or not.
            resumed.running += 1
            try:
                slot = await self._slots.take(resumed.config.name, resumed.config.slots)
            except BaseException:  # the job store away: no run, so not counted either
                resumed.running -= 1
                raise
            return resumed, slot
        async with self._changed:
            while True:
                if self._closed:
                    raise ProviderUnavailable(
                        "the ComfyUI pool is closed", cause=Cause.PROVIDER_CLOSED
                    )
                capable, reasons = self._capable(workflow, work.spec, exclude)
                if not capable and exclude:
                    # Nothing else can take it: an agent that already tried is a new chance
                    # (an agent lost then is back only after a probe found it again).
                    capable = self._capable(workflow, work.spec, frozenset())[0]
                if not capable:
                    raise self._none_capable(workflow, work.spec, reasons, exclude)
                free = [a for a in capable if a.busy < a.config.slots]
                busy_elsewhere = bool(free)
                while free:
                    agent = _best(free, self._slots.kept)
                    slot = await self._slots.take(agent.config.name, agent.config.slots)
                    if slot is not None:
                        agent.running += 1
                        return agent, slot
                    free.remove(agent)  # its slots are taken by other coordinators
                if busy_elsewhere:  # their ends are not announced here: ask again soon
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._slots.poll_s):
                            await self._changed.wait()
                else:
                    await self._changed.wait()

    def _none_capable(
        self,
        workflow: Workflow,
        spec: TaskSpec,
        reasons: Mapping[str, str],
        exclude: frozenset[str],
    ) -> ServiceError:
        detail = _detail(reasons)
        # An agent that is down but could serve (or was never seen) may come back: retryable.
        could_return = [
            agent
            for name, agent in self._agents.items()
            if name not in exclude
            and agent.state in (AgentState.STARTING, AgentState.OFFLINE)
            and (agent.caps is None or not workflow.can_serve(agent.caps, spec))
        ]
        unable = [
            reasons[name]
            for name, agent in self._agents.items()
            if name not in exclude and agent.state is AgentState.ONLINE
        ]
        if unable and not could_return:
            models = any(why.startswith("missing models") for why in unable)
            return ServiceError(
                ErrorKind.FAILED_PRECONDITION,
                "COMFYUI_MODEL_MISSING" if models else "COMFYUI_NODE_MISSING",
                f"no ComfyUI agent can run {workflow.task.value}: {detail}",
                metadata={"task": workflow.task.value, "agents": detail[:1000]},
            )
        return ProviderUnavailable(
            f"no ComfyUI agent available for {workflow.task.value}: {detail}",
            cause=Cause.NO_AGENT,
            metadata={"agents": detail[:1000]},
        )


def _best(agents: list[_Agent], kept: Callable[[str], bool]) -> _Agent:
    # Fewest running jobs; then higher priority; then one whose slot this process still
    # holds from a run that ended (shared slots: taking it costs no claim now and no release
    # later, and the balance between agents is the same); then name, for a stable choice.
    return min(
        agents,
        key=lambda a: (a.busy, -a.config.priority, not kept(a.config.name), a.config.name),
    )


if TYPE_CHECKING:

    def _conforms(pool: ComfyPool) -> Provider:
        return pool  # mypy proves ComfyPool satisfies the Provider protocol


def _detail(reasons: Mapping[str, str]) -> str:
    """Each agent's reason for not taking a job, for an error or a waiting reason."""
    return "; ".join(f"{name}: {why}" for name, why in reasons.items()) or "none configured"
