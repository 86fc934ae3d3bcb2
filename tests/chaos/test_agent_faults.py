"""Agent faults, one at a time: the job manager and a real ComfyPool over stand-ins that are
killed and restarted (issue 16, "Agent faults")."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from aiserver.jobs.manager import JobManager
from aiserver.jobs.model import Finished, Job, JobEvent, JobState, Retrying
from aiserver.providers.comfy.pool import AgentConfig, AgentState, ComfyPool, PoolSettings
from aiserver.providers.comfy.workflows import WorkflowCatalog
from aiserver.providers.failures import Cause, ProviderUnavailable
from aiserver.tasks import ImageToImageSpec, TaskKind
from tests.chaos.harness import Agent, read_logs
from tests.comfy.helpers import FAST, RecordingSink, png, work_item, write_input
from tests.jobs.helpers import Env, collect, submit
from tests.support.comfy_standin import ComfyStandIn
from tests.support.tcp_cut import TcpCut

KSAMPLER = "7"  # in workflows/image_to_image.json
NOTICE_S = 2.5
"""~2 s to notice a dead agent, plus slack for a loaded machine."""
# The default reconnect window (30 s) and poll interval: a fix must not rely on short ones.
TIMEOUTS = dataclasses.replace(FAST, reconnect_s=30.0, idle_s=60.0, execution_s=60.0, poll_s=5.0)
POOL = PoolSettings(probe_interval_s=0.5, backoff_initial_s=0.1, timeouts=TIMEOUTS)


@dataclasses.dataclass
class Cluster:
    env: Env
    root: Path
    agents: list[ComfyStandIn] = dataclasses.field(default_factory=list)
    pools: list[ComfyPool] = dataclasses.field(default_factory=list)

    async def agent(self, step_delay_s: float = 0.05) -> ComfyStandIn:
        standin = ComfyStandIn(self.root / f"agent-{len(self.agents)}", step_delay_s=step_delay_s)
        await standin.start()
        self.agents.append(standin)
        return standin

    async def pool(self, settings: PoolSettings = POOL) -> ComfyPool:
        configs = [AgentConfig(a.url, name=f"agent-{i}") for i, a in enumerate(self.agents)]
        pool = ComfyPool(configs, WorkflowCatalog.load(), settings=settings)
        self.pools.append(pool)
        await pool.start()
        return pool

    async def manager(self, **settings: Any) -> tuple[JobManager, ComfyPool]:
        pool = await self.pool()
        return await self.env.manager(pool, **settings), pool  # type: ignore[arg-type]


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(Env(tmp_path), tmp_path)
    try:
        yield c
    finally:
        await c.env.close()
        for pool in c.pools:
            await pool.close()
        for agent in c.agents:
            await agent.close()


SPEC = ImageToImageSpec(positive_prompt="a lighthouse", steps=10)


async def running_on(agent: ComfyStandIn, within_s: float = 10) -> None:
    async with asyncio.timeout(within_s):
        while agent.running_prompt is None:
            await asyncio.sleep(0.01)


async def ends(manager: JobManager, job: Job, within_s: float) -> tuple[Job, list[JobEvent]]:
    events = await collect(manager.subscribe(job.id), within_s)
    final = events[-1].kind
    assert isinstance(final, Finished)
    return final.job, events


def retries(events: list[JobEvent]) -> list[Retrying]:
    return [e.kind for e in events if isinstance(e.kind, Retrying)]


async def test_the_only_agent_killed_mid_job_runs_the_retry_when_back(cluster: Cluster) -> None:
    agent = await cluster.agent()
    manager, _ = await cluster.manager(max_attempts=2)
    job = await submit(manager, cluster.env, spec=SPEC)
    await running_on(agent)
    await agent.kill()
    await asyncio.sleep(1.0)
    await agent.restart()  # a restarted agent is a new chance, even for the job it dropped
    final, events = await ends(manager, job, 30)
    assert final.state is JobState.SUCCEEDED, final.error
    # Two attempts, each reached the agent: waiting for it to come back spent none.
    assert final.attempts == 2 and len(retries(events)) == 1
    assert len(agent.received.prompts) == 2  # one per attempt


async def test_while_every_online_agent_is_excluded_no_attempt_is_spent(cluster: Cluster) -> None:
    a = await cluster.agent()
    b = await cluster.agent()
    manager, pool = await cluster.manager(max_attempts=2)
    await b.kill()  # down for the whole test
    async with asyncio.timeout(10):
        while {s.name: s.state for s in pool.snapshot()}["agent-1"] is not AgentState.OFFLINE:
            await asyncio.sleep(0.02)
    job = await submit(manager, cluster.env, spec=SPEC)
    await running_on(a)
    await a.kill()
    await asyncio.sleep(0.3)
    await a.restart()  # soon online again, while the job's retry excludes it
    await asyncio.sleep(1.0)
    now = await manager.get(job.id, None)
    assert now.state is not JobState.FAILED and now.attempts <= 2, now.error
    final, _ = await ends(manager, job, 30)
    assert final.state is JobState.SUCCEEDED and final.attempts == 2, final.error


async def test_the_final_error_keeps_the_first_cause(cluster: Cluster) -> None:
    agent = await cluster.agent()
    manager, _ = await cluster.manager(max_attempts=3, queue_timeout_s=3.0)
    job = await submit(manager, cluster.env, spec=SPEC)
    await running_on(agent)
    await agent.kill()  # and never back
    final, events = await ends(manager, job, 30)
    assert final.state is JobState.FAILED and final.error is not None
    first = retries(events)[0].reason
    assert "agent-0" in first
    assert first in final.error.message, final.error.message
    assert final.attempts == 1  # no attempt without an agent to reach


async def test_a_job_on_a_dead_agent_gives_its_slot_back_at_once(cluster: Cluster) -> None:
    a = await cluster.agent()
    b = await cluster.agent()
    manager, _ = await cluster.manager()
    # Both slots taken: the first job on agent-0 (preferred on ties by name), the second on B.
    first = await submit(manager, cluster.env, spec=SPEC)
    await running_on(a)
    second = await submit(manager, cluster.env, spec=SPEC)
    await running_on(b)
    events = aiter(manager.subscribe(first.id))
    await a.kill()  # and never back: the first job must move to B, not wait out 30 s
    killed = time.monotonic()
    async with asyncio.timeout(NOTICE_S):
        async for event in events:
            if isinstance(event.kind, Retrying):
                break
    final, _ = await ends(manager, first, 15)
    assert final.state is JobState.SUCCEEDED and final.agent == "agent-1", final.error
    assert time.monotonic() - killed < 10
    assert (await ends(manager, second, 15))[0].state is JobState.SUCCEEDED


async def test_an_offline_agent_is_reprobed_within_the_probe_interval(cluster: Cluster) -> None:
    agent = await cluster.agent()
    pool = await cluster.pool(dataclasses.replace(POOL, backoff_max_s=60.0))
    await agent.kill()
    await asyncio.sleep(4.0)  # unbounded, the backoff would be past 3 s by now
    await agent.restart()
    back = time.monotonic()
    async with asyncio.timeout(POOL.probe_interval_s + 1.0):
        while pool.snapshot()[0].state is not AgentState.ONLINE:
            await asyncio.sleep(0.02)
    assert time.monotonic() - back <= POOL.probe_interval_s + 1.0


async def forget_prompts(agent: ComfyStandIn) -> None:
    """The agent forgets its queue (as after a restart, or an operator's clear) yet answers."""
    await agent.wait_for(lambda: bool(agent.pending_prompts))
    async with httpx.AsyncClient(base_url=agent.url) as http:
        await http.post("/queue", json={"clear": True})


async def test_a_vanished_prompt_leaves_the_agent_online(cluster: Cluster, tmp_path: Path) -> None:
    agent = await cluster.agent()
    agent.pause_queue()
    pool = await cluster.pool()
    image = write_input(tmp_path, "image", png(48, 32))
    work = work_item(TaskKind.IMAGE_TO_IMAGE, SPEC, {"image": image})
    run = asyncio.create_task(pool.run(work, RecordingSink()))
    await forget_prompts(agent)
    with pytest.raises(ProviderUnavailable) as caught:
        async with asyncio.timeout(10):
            await run
    assert caught.value.cause is Cause.PROMPT_LOST and caught.value.reached_agent
    # It answers: not offline, still a candidate for the job's next attempt.
    assert pool.snapshot()[0].state is AgentState.ONLINE, pool.snapshot()[0].last_error
    assert pool.pick(TaskKind.IMAGE_TO_IMAGE, SPEC, exclude=frozenset({"agent-0"})) == "agent-0"


async def test_a_vanished_prompt_runs_again_on_the_same_agent(cluster: Cluster) -> None:
    agent = await cluster.agent()
    agent.pause_queue()
    manager, _ = await cluster.manager(max_attempts=2)
    job = await submit(manager, cluster.env, spec=SPEC)
    await forget_prompts(agent)
    agent.resume_queue()
    final, events = await ends(manager, job, 30)
    assert final.state is JobState.SUCCEEDED and final.agent == "agent-0", final.error
    assert final.attempts == 2 and len(retries(events)) == 1


@pytest.mark.parametrize("when", ["mid-run", "before-prompt"])
async def test_an_agent_that_stops_answering_without_a_reset_loses_its_job_to_another(
    cluster: Cluster, when: str
) -> None:
    """A partition: the agent's host accepts nothing back, refuses nothing (its packets are
    dropped: tests/support/tcp_cut.py ``blackhole``), its websocket falls silent mid-run or
    its ``POST /prompt`` is never answered. No reset ever comes, so only the provider's own
    bounds can end the wait: the job must move to the other agent within them, not hang."""
    silent = await cluster.agent()
    other = await cluster.agent()
    url = urlsplit(silent.url)
    async with TcpCut(url.hostname or "127.0.0.1", url.port or 80) as relay:
        manager = await _relayed_pair(cluster, relay, url.scheme, other.url)
        if when == "before-prompt":
            relay.blackhole()  # the probe notices, or the upload or post waits out request_s
        job = await submit(manager, cluster.env, spec=SPEC)
        if when == "mid-run":
            await running_on(silent)
            relay.blackhole()
        began = time.monotonic()
        final, events = await ends(manager, job, 40)
        took = time.monotonic() - began
        assert final.state is JobState.SUCCEEDED, final.error
        assert final.agent == "agent-1", final.agent
        assert took < 30, took  # the bounds (request_s, idle_s, the probe), not for ever
        if when == "mid-run":  # it ran there first, and moved once
            assert len(silent.received.prompts) == 1 and len(retries(events)) == 1
        else:  # it never ran there
            assert not silent.received.prompts


async def test_a_withdraw_the_silent_agent_never_answers_is_logged_with_its_reason(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A hung agent (a real ComfyUI SIGSTOPped does this: its TCP stays open, nothing comes
    back) leaves the abandoned run's delete/interrupt unanswered until ``cancel_s``; the
    warning must say so, not end in an empty reason (asyncio's TimeoutError has no text)."""
    silent = await cluster.agent()
    other = await cluster.agent()
    url = urlsplit(silent.url)
    async with TcpCut(url.hostname or "127.0.0.1", url.port or 80) as relay:
        manager = await _relayed_pair(cluster, relay, url.scheme, other.url)
        job = await submit(manager, cluster.env, spec=SPEC)
        await running_on(silent)
        with caplog.at_level(logging.WARNING, logger="aiserver.providers.comfy.run"):
            relay.blackhole()
            final, _ = await ends(manager, job, 40)
        assert final.state is JobState.SUCCEEDED and final.agent == "agent-1", final.error
        withdrawals = [r.getMessage() for r in caplog.records if "withdraw" in r.getMessage()]
        assert withdrawals, "the run on the silent agent was not withdrawn"
        assert all(not m.endswith(": ") for m in withdrawals), withdrawals
        assert any(f"no answer within {TIMEOUTS.cancel_s:g} s" in m for m in withdrawals), (
            withdrawals
        )


# A hung agent (SIGSTOP: TCP open, nothing answers). The request bound is long here, as the
# default (60 s) is for uploads and downloads: the probe must not wait it out; nor must a run
# the agent's going offline ended wait out cancel_s for its withdrawal.
HUNG_POOL = dataclasses.replace(
    POOL,
    probe_timeout_s=1.0,
    timeouts=dataclasses.replace(TIMEOUTS, request_s=20.0, cancel_s=6.0),
)
HUNG_SLACK_S = 2.0


async def offline_within(pool: ComfyPool, name: str, within_s: float) -> float:
    """Seconds until ``name`` is offline; fails (at once, not after request_s) past within_s."""
    began = time.monotonic()
    async with asyncio.timeout(within_s):
        while {s.name: s.state for s in pool.snapshot()}[name] is not AgentState.OFFLINE:
            await asyncio.sleep(0.02)
    return time.monotonic() - began


async def test_a_stopped_agent_goes_offline_within_the_probe_bound_and_its_job_moves(
    cluster: Cluster,
) -> None:
    """A real process SIGSTOPped mid-run (what the fault trial did to a real ComfyUI): its
    websocket stays open and silent, the kernel still accepts connections. The periodic probe
    must mark it offline within the probe interval plus ``probe_timeout_s``, not
    ``request_s``; that ends its run, which is retried on the other agent and succeeds, and
    new jobs go there."""
    log = cluster.root / "hung.log"
    hung = Agent("agent-0", cluster.root / "hung", log, step_delay_s=0.5)  # 10 steps: 5 s
    await hung.start()
    try:
        other = await cluster.agent()
        configs = [AgentConfig(hung.url, name="agent-0"), AgentConfig(other.url, name="agent-1")]
        pool = ComfyPool(configs, WorkflowCatalog.load(), settings=HUNG_POOL)
        cluster.pools.append(pool)
        await pool.start()
        manager = await cluster.env.manager(pool, max_attempts=2)  # type: ignore[arg-type]
        job = await submit(manager, cluster.env, spec=SPEC)  # agent-0 first, by name
        async with asyncio.timeout(10):
            while not any(e.event == "start" for e in read_logs([log])):
                await asyncio.sleep(0.02)
        hung.freeze()
        bound = HUNG_POOL.probe_interval_s + HUNG_POOL.probe_timeout_s + HUNG_SLACK_S
        took = await offline_within(pool, "agent-0", bound)
        assert took <= bound, took
        final, events = await ends(manager, job, 15)
        assert final.state is JobState.SUCCEEDED, final.error
        assert final.agent == "agent-1" and final.attempts == 2 and len(retries(events)) == 1
        assert len(other.received.prompts) == 1
        later = await submit(manager, cluster.env, spec=SPEC)
        done, _ = await ends(manager, later, 15)
        assert done.state is JobState.SUCCEEDED and done.agent == "agent-1", done.error
        assert [e.event for e in read_logs([log])] == ["start"]  # nothing more reached it
    finally:
        await hung.kill()


async def test_a_lost_websocket_then_a_failed_probe_ends_the_agents_runs(
    cluster: Cluster,
) -> None:
    """The run's websocket drops and the agent then hangs (new connections accepted, never
    answered: the fault trial's ComfyUI, whose socket the keepalive ping dropped). The drop
    asks for a probe at once; it fails within ``probe_timeout_s`` and the agent goes offline,
    which ends its run for a retry elsewhere at once, instead of waiting out the websocket's
    reconnect budget (30 s), ``request_s``, or ``cancel_s`` for the withdrawal the hung agent
    never answers (that goes on in the background). The periodic probe is far off: the drop's
    probe did it."""
    silent = await cluster.agent(step_delay_s=0.5)
    other = await cluster.agent()
    url = urlsplit(silent.url)
    async with TcpCut(url.hostname or "127.0.0.1", url.port or 80) as relay:
        relayed = f"{url.scheme}://127.0.0.1:{relay.port}"
        configs = [AgentConfig(relayed, name="agent-0"), AgentConfig(other.url, name="agent-1")]
        settings = dataclasses.replace(HUNG_POOL, probe_interval_s=30.0)
        pool = ComfyPool(configs, WorkflowCatalog.load(), settings=settings)
        cluster.pools.append(pool)
        await pool.start()
        manager = await cluster.env.manager(pool, max_attempts=2)  # type: ignore[arg-type]
        job = await submit(manager, cluster.env, spec=SPEC)
        events = aiter(manager.subscribe(job.id))
        await running_on(silent)
        relay.cut()  # the websocket (and idle HTTP connections) reset ...
        relay.restore()
        relay.blackhole()  # ... and every new connection hangs
        took = await offline_within(pool, "agent-0", settings.probe_timeout_s + HUNG_SLACK_S)
        assert took <= settings.probe_timeout_s + HUNG_SLACK_S, took
        assert relay.swallowed >= 1  # the probe (and reconnects) met the hang
        async with asyncio.timeout(HUNG_SLACK_S):  # not the withdrawal's cancel_s
            async for event in events:
                if isinstance(event.kind, Retrying):
                    break
        final, _ = await ends(manager, job, 15)
        assert final.state is JobState.SUCCEEDED and final.agent == "agent-1", final.error
        assert len(silent.received.prompts) == 1 and len(other.received.prompts) == 1


async def _relayed_pair(cluster: Cluster, relay: TcpCut, scheme: str, other_url: str) -> JobManager:
    """A manager over two agents, the first reached through ``relay`` (request_s 3 s, idle_s
    4 s: a silent agent is given up within seconds)."""
    relayed = f"{scheme}://127.0.0.1:{relay.port}"
    configs = [AgentConfig(relayed, name="agent-0"), AgentConfig(other_url, name="agent-1")]
    settings = dataclasses.replace(
        POOL, timeouts=dataclasses.replace(TIMEOUTS, request_s=3.0, idle_s=4.0)
    )
    pool = ComfyPool(configs, WorkflowCatalog.load(), settings=settings)
    cluster.pools.append(pool)
    await pool.start()
    return await cluster.env.manager(pool, max_attempts=2)  # type: ignore[arg-type]
