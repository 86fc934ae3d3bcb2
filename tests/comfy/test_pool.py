"""ComfyPool against several stand-ins: discovery, choice, slots, failover, recovery."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from aiserver.config import load_settings
from aiserver.errors import ErrorKind, ServiceError
from aiserver.imaging import ImageLimits
from aiserver.jobs.agent_slots import SharedAgentSlots
from aiserver.jobs.store import SlotClaim
from aiserver.jobs.store.sqlite import SqliteJobStore
from aiserver.provider_config import build_providers, comfy_pools
from aiserver.providers.base import (
    SHUTDOWN,
    Cause,
    Provider,
    ProviderFailure,
    ProviderUnavailable,
    WorkItem,
)
from aiserver.providers.comfy.pool import AgentConfig, AgentState, ComfyPool, PoolSettings
from aiserver.providers.comfy.workflows import WorkflowCatalog
from aiserver.tasks import (
    BUILT_IN_TASKS,
    ImageToImageSpec,
    ImageToTextSpec,
    ImageUpscaleSpec,
    TaskKind,
)
from tests.comfy.conftest import Spawn, StandInFactory
from tests.comfy.helpers import FAST, RecordingSink, png, work_item, write_input
from tests.storage.backends import JobStoreBackend
from tests.support.comfy_standin import ComfyStandIn

SETTINGS = PoolSettings(
    probe_interval_s=0.2, backoff_initial_s=0.05, backoff_max_s=0.2, timeouts=FAST
)


@pytest.fixture
async def pools() -> AsyncIterator[list[ComfyPool]]:
    made: list[ComfyPool] = []
    yield made
    for pool in made:
        await pool.close()


async def started(
    pools: list[ComfyPool], catalog: WorkflowCatalog, *agents: AgentConfig, **settings: Any
) -> ComfyPool:
    pool = ComfyPool(agents, catalog, settings=dataclasses.replace(SETTINGS, **settings))
    pools.append(pool)
    async with asyncio.timeout(5):
        await pool.start()
    return pool


def upscale(
    inputs_dir: Path, job_id: str = "01JPOOLJOB0000000000000000", model: str = ""
) -> WorkItem:
    image = write_input(inputs_dir, "image", png(40, 30))
    spec = ImageUpscaleSpec(model=model)
    return work_item(TaskKind.IMAGE_UPSCALE, spec, {"image": image}, job_id=job_id)


async def run(
    pool: ComfyPool, work: WorkItem, exclude: frozenset[str] = frozenset()
) -> RecordingSink:
    sink = RecordingSink()
    async with asyncio.timeout(10):
        await pool.run(work, sink, exclude=exclude)
    return sink


async def test_discovery_and_snapshot(
    make_standin: StandInFactory, pools: list[ComfyPool], catalog: WorkflowCatalog
) -> None:
    full = await make_standin()
    bare = await make_standin(
        missing_nodes=["Florence2Run", "DownloadAndLoadFlorence2Model"],
        models={"checkpoints": ["other.safetensors"], "upscale_models": ["RealESRGAN_x2.pth"]},
    )
    pool = await started(
        pools,
        catalog,
        AgentConfig(full.url, name="full", priority=2, max_concurrent_jobs=3),
        AgentConfig(bare.url, name="bare"),
        AgentConfig("http://127.0.0.1:9", name="off", enabled=False),
    )
    provider: Provider = pool  # the scheduler's protocol (mypy checks conformance in pool.py)
    assert provider.name == "comfyui"
    snap = {s.name: s for s in pool.snapshot()}
    assert snap["full"].state is AgentState.ONLINE and snap["full"].version == "0.8.0"
    assert set(snap["full"].tasks) == set(BUILT_IN_TASKS)
    assert snap["full"].models["upscale_models"] == (
        "RealESRGAN_x2.pth",
        "RealESRGAN_x4plus.pth",
        "corrupt_for_probe.pth",
    )
    assert "v1-5-pruned-emaonly.safetensors" in snap["full"].models["checkpoints"]
    assert (snap["full"].priority, snap["full"].max_concurrent_jobs) == (2, 3)
    assert snap["full"].last_seen is not None
    bare_snap = snap["bare"]
    assert set(bare_snap.tasks) == {TaskKind.IMAGE_UPSCALE}
    assert "Florence2Run" in bare_snap.unavailable[TaskKind.IMAGE_TO_TEXT]
    assert (
        "checkpoints/v1-5-pruned-emaonly.safetensors"
        in bare_snap.unavailable[TaskKind.IMAGE_TO_IMAGE]
    )
    assert snap["off"].state is AgentState.DISABLED
    # can_run: nodes and the model the spec asks for
    assert pool.can_run(TaskKind.IMAGE_TO_TEXT, ImageToTextSpec())
    assert pool.can_run(TaskKind.IMAGE_TO_IMAGE, ImageToImageSpec("x", model="other.safetensors"))
    assert (
        pool.pick(TaskKind.IMAGE_TO_IMAGE, ImageToImageSpec("x", model="other.safetensors"))
        == "bare"
    )
    assert not pool.can_run(
        TaskKind.IMAGE_TO_IMAGE, ImageToImageSpec("x", model="absent.safetensors")
    )
    assert (
        pool.pick(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec()) == "full"
    )  # priority breaks the tie


async def test_runs_on_the_agent_that_has_the_model(
    make_standin: StandInFactory, pools: list[ComfyPool], catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    a = await make_standin(models={"upscale_models": ["RealESRGAN_x2.pth"]})
    b = await make_standin(models={"upscale_models": ["4x_special.pth"]})
    pool = await started(pools, catalog, AgentConfig(a.url, name="a"), AgentConfig(b.url, name="b"))
    sink = await run(pool, upscale(inputs_dir, model="4x_special.pth"))
    assert sink.image_sizes() == [(80, 60)]
    assert len(b.received.prompts) == 1 and a.received.prompts == []
    with pytest.raises(ServiceError) as caught:
        await run(pool, upscale(inputs_dir, model="absent.pth"))
    assert (caught.value.kind, caught.value.reason) == (
        ErrorKind.FAILED_PRECONDITION,
        "COMFYUI_MODEL_MISSING",
    )
    assert "a: missing models: upscale_models/absent.pth" in caught.value.message


async def test_failover_after_a_500(
    make_standin: StandInFactory, pools: list[ComfyPool], catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    a = await make_standin()
    b = await make_standin()
    a.fail_http("/prompt")
    pool = await started(
        pools, catalog, AgentConfig(a.url, name="a", priority=9), AgentConfig(b.url, name="b")
    )
    work = upscale(inputs_dir)
    with pytest.raises(ProviderUnavailable) as caught:
        await run(pool, work)
    assert caught.value.metadata["agent"] == "a"
    tried = frozenset({caught.value.metadata["agent"]})
    sink = await run(pool, dataclasses.replace(work, attempt=2), exclude=tried)
    assert sink.image_sizes() == [(80, 60)] and len(b.received.prompts) == 1
    # Marked offline at once; its probes (which /prompt failures do not affect) bring it back.
    assert "500" in {s.name: s for s in pool.snapshot()}["a"].last_error
    # Every agent tried: one that is online is a new chance, not "no agent available".
    a.clear_http_faults()
    again = await run(pool, dataclasses.replace(work, attempt=3), exclude=frozenset({"a", "b"}))
    assert again.image_sizes() == [(80, 60)]


async def test_agent_killed_mid_job_then_retry_elsewhere(
    make_standin: StandInFactory,
    pools: list[ComfyPool],
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    spawn: Spawn,
) -> None:
    a = await make_standin()
    b = await make_standin()
    a.hang_at("3")
    pool = await started(
        pools,
        catalog,
        AgentConfig(a.url, name="a", priority=5),
        AgentConfig(b.url, name="b"),
        timeouts=dataclasses.replace(FAST, reconnect_s=0.3),
    )
    work = upscale(inputs_dir)
    sink = RecordingSink()
    task = spawn(pool.run(work, sink))
    await a.wait_for(lambda: a.running_prompt is not None)
    assert pool.load() == 1
    await a.kill()
    with pytest.raises(ProviderUnavailable) as caught:
        async with asyncio.timeout(5):
            await task
    assert caught.value.metadata["agent"] == "a"
    assert pool.load() == 0
    state = {s.name: s for s in pool.snapshot()}["a"]
    assert state.state is AgentState.OFFLINE and state.last_error
    retry = await run(pool, dataclasses.replace(work, attempt=2), exclude=frozenset({"a"}))
    assert retry.image_sizes() == [(80, 60)]


async def test_offline_agent_comes_back(
    make_standin: StandInFactory, pools: list[ComfyPool], catalog: WorkflowCatalog
) -> None:
    standin = await make_standin()
    await standin.kill()
    pool = await started(pools, catalog, AgentConfig(standin.url, name="a"))
    (snap,) = pool.snapshot()
    assert snap.state is AgentState.OFFLINE and "connection" in snap.last_error.lower()
    assert not pool.can_run(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec())
    await standin.restart()
    async with asyncio.timeout(5):
        while pool.snapshot()[0].state is not AgentState.ONLINE:
            await asyncio.sleep(0.02)
    assert pool.can_run(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec())


async def test_no_agent_online_is_unavailable(
    pools: list[ComfyPool], catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    pool = await started(pools, catalog, AgentConfig("http://127.0.0.1:9", name="gone"))
    with pytest.raises(ProviderUnavailable) as caught:
        await run(pool, upscale(inputs_dir))
    assert "gone: offline" in caught.value.message
    assert caught.value.cause is Cause.NO_AGENT and caught.value.retryable
    assert not caught.value.reached_agent and not caught.value.agent_lost


async def test_closed_pool_is_unavailable_without_an_agent(
    make_standin: StandInFactory, pools: list[ComfyPool], catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    standin = await make_standin()
    pool = await started(pools, catalog, AgentConfig(standin.url, name="a"))
    await pool.close()
    with pytest.raises(ProviderUnavailable) as caught:
        await run(pool, upscale(inputs_dir))
    assert caught.value.cause is Cause.PROVIDER_CLOSED and not caught.value.reached_agent


async def test_a_failure_that_is_not_the_agents_keeps_it_online(
    make_standin: StandInFactory, pools: list[ComfyPool], catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    standin = await make_standin()
    standin.fail_http("/view", status=404)
    pool = await started(pools, catalog, AgentConfig(standin.url, name="a"))
    with pytest.raises(ProviderUnavailable) as caught:
        await run(pool, upscale(inputs_dir))
    assert caught.value.cause is Cause.OUTPUT_MISSING and caught.value.agent == "a"
    assert not caught.value.agent_lost and caught.value.retryable
    (snap,) = pool.snapshot()
    assert snap.state is AgentState.ONLINE and snap.last_error == ""


async def test_an_agent_that_lost_a_model_is_probed_again(
    make_standin: StandInFactory, pools: list[ComfyPool], catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    standin = await make_standin()
    # Probes far apart: only the failure's type can bring the next one forward.
    pool = await started(pools, catalog, AgentConfig(standin.url, name="a"), probe_interval_s=60)
    assert pool.can_run(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec(model="RealESRGAN_x2.pth"))
    standin.set_models("upscale_models", [])
    with pytest.raises(ProviderFailure) as caught:
        await run(pool, upscale(inputs_dir, model="RealESRGAN_x2.pth"))
    assert caught.value.cause is Cause.AGENT_LACKS and caught.value.agent_outdated
    assert not caught.value.retryable and not caught.value.agent_lost
    async with asyncio.timeout(5):
        while pool.can_run(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec(model="RealESRGAN_x2.pth")):
            await asyncio.sleep(0.02)
    assert pool.snapshot()[0].state is AgentState.ONLINE


async def test_least_loaded_and_slots(
    make_standin: StandInFactory,
    pools: list[ComfyPool],
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    spawn: Spawn,
) -> None:
    a = await make_standin()
    b = await make_standin()
    a.pause_queue()
    b.pause_queue()
    pool = await started(
        pools,
        catalog,
        AgentConfig(a.url, name="a", priority=1),
        AgentConfig(b.url, name="b", priority=5),
    )
    sinks = [RecordingSink() for _ in range(5)]
    tasks = []
    for i in range(5):  # one at a time: each placement sees the previous one
        tasks.append(spawn(pool.run(upscale(inputs_dir, job_id=f"JOB{i}"), sinks[i])))
        await asyncio.sleep(0.05)
    await a.wait_for(lambda: len(a.pending_prompts) == 2 and len(b.pending_prompts) == 2)
    await asyncio.sleep(0.05)
    # Each agent has two slots (one running, one queued ahead, the default): b first
    # (priority), then a (least loaded), then b and a again; the fifth waits for a slot.
    assert [s.running_jobs for s in pool.snapshot()] == [2, 2]
    assert len(a.received.prompts) + len(b.received.prompts) == 4
    label = [p["prompt"]["5"]["inputs"]["filename_prefix"][-4:] for p in b.received.prompts]
    assert label == ["JOB0", "JOB2"]
    a.resume_queue()
    b.resume_queue()
    async with asyncio.timeout(10):
        await asyncio.gather(*tasks)
    assert len(a.received.prompts) + len(b.received.prompts) == 5
    assert all(s.image_sizes() == [(80, 60)] for s in sinks)
    assert pool.load() == 0


async def test_resume_goes_to_the_named_agent(
    make_standin: StandInFactory, pools: list[ComfyPool], catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    a = await make_standin()
    b = await make_standin()
    pool = await started(
        pools, catalog, AgentConfig(a.url, name="a", priority=9), AgentConfig(b.url, name="b")
    )
    work = upscale(inputs_dir)
    first = await run(pool, work)
    resume = first.checkpoints[0]
    assert resume["agent"] == "a"
    again = await run(pool, dataclasses.replace(work, attempt=2, resume=resume))
    assert again.image_sizes() == [(80, 60)]
    assert len(a.received.prompts) == 1 and b.received.prompts == []  # recovered, not re-run
    other = await run(pool, dataclasses.replace(work, resume=resume), exclude=frozenset({"a"}))
    assert other.image_sizes() == [(80, 60)] and len(b.received.prompts) == 1


async def test_api_key_is_sent_and_checked(
    make_standin: StandInFactory, pools: list[ComfyPool], catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    standin = await make_standin(api_key="s3cret")
    pool = await started(
        pools,
        catalog,
        AgentConfig(standin.url, name="good", api_key="s3cret"),
        AgentConfig(standin.url, name="bad", api_key="wrong"),
    )
    snap = {s.name: s for s in pool.snapshot()}
    assert snap["good"].state is AgentState.ONLINE
    assert snap["bad"].state is AgentState.OFFLINE and "api key" in snap["bad"].last_error
    assert "s3cret" not in repr(AgentConfig(standin.url, api_key="s3cret"))
    sink = await run(pool, upscale(inputs_dir))
    assert sink.image_sizes() == [(80, 60)]
    assert all(
        h.get("authorization") in ("Bearer s3cret", "Bearer wrong")
        for _, _, h in standin.received.requests
    )


def test_agent_config_validation() -> None:
    assert AgentConfig("http://gpu-1:8188").name == "gpu-1:8188"
    with pytest.raises(ValueError, match="http"):
        AgentConfig("gpu-1:8188")
    with pytest.raises(ValueError, match="max_concurrent_jobs"):
        AgentConfig("http://gpu-1:8188", max_concurrent_jobs=0)
    with pytest.raises(ValueError, match="two agents"):
        ComfyPool(
            [AgentConfig("http://a:1", name="x"), AgentConfig("http://b:1", name="x")],
            WorkflowCatalog.load(),
        )


async def test_shutdown_detaches_then_the_checkpoint_reattaches(
    make_standin: StandInFactory,
    pools: list[ComfyPool],
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    spawn: Spawn,
) -> None:
    standin = await make_standin()
    standin.hang_at("3")
    pool = await started(pools, catalog, AgentConfig(standin.url, name="a"))
    work = upscale(inputs_dir)
    sink = RecordingSink()
    task = spawn(pool.run(work, sink))
    await standin.wait_for(lambda: standin.running_prompt is not None)
    task.cancel(SHUTDOWN)
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await task
    (checkpoint,) = sink.checkpoints
    assert standin.received.interrupts == [] and standin.received.deletes == []
    assert standin.running_prompt == checkpoint["prompt_id"]  # left running on purpose
    # The next process: a fresh pool, the stored checkpoint.
    later = await started(pools, catalog, AgentConfig(standin.url, name="a"))
    again = RecordingSink()
    resumed = spawn(later.run(dataclasses.replace(work, resume=checkpoint), again))
    await standin.wait_for(lambda: standin.received.ws_connects.count(checkpoint["client_id"]) == 2)
    standin.release("3")
    async with asyncio.timeout(5):
        await resumed
    assert again.image_sizes() == [(80, 60)]
    assert len(standin.received.prompts) == 1


async def test_work_exclude_and_supports(
    make_standin: StandInFactory, pools: list[ComfyPool], catalog: WorkflowCatalog, inputs_dir: Path
) -> None:
    a = await make_standin()
    b = await make_standin()
    pool = await started(
        pools, catalog, AgentConfig(a.url, name="a", priority=9), AgentConfig(b.url, name="b")
    )
    work = dataclasses.replace(upscale(inputs_dir), exclude=frozenset({"a"}))
    assert (await run(pool, work)).image_sizes() == [(80, 60)]
    assert a.received.prompts == [] and len(b.received.prompts) == 1
    await a.kill()
    await b.kill()
    assert pool.supports(TaskKind.IMAGE_TO_TEXT)  # configured, whatever the health
    nothing = await started(pools, catalog, AgentConfig(a.url, name="a", enabled=False))
    assert not nothing.supports(TaskKind.IMAGE_UPSCALE)


async def test_refusal_only_when_waiting_cannot_help(
    make_standin: StandInFactory, pools: list[ComfyPool], catalog: WorkflowCatalog
) -> None:
    a = await make_standin(models={"upscale_models": ["RealESRGAN_x2.pth"]})
    pool = await started(pools, catalog, AgentConfig(a.url, name="a"))
    assert pool.refusal(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec()) is None
    refused = pool.refusal(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec(model="4x.pth"))
    assert refused is not None and refused.reason == "COMFYUI_MODEL_MISSING"
    # An agent that is down (never seen) might have it: wait rather than refuse.
    with_down = await started(
        pools, catalog, AgentConfig(a.url, name="a"), AgentConfig("http://127.0.0.1:9", name="b")
    )
    assert with_down.refusal(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec(model="4x.pth")) is None


def test_agent_settings_are_validated_and_named() -> None:
    assert AgentConfig(url="http://h:1").name == "h:1"
    with pytest.raises(ValueError):
        AgentConfig(url="ftp://h:1")
    with pytest.raises(ValueError):
        AgentConfig(url="http://h:1", max_concurrent_jobs=0)


def _gets(standin: ComfyStandIn, route: str) -> int:
    return sum(1 for method, path, _ in standin.received.requests if path.endswith(route))


async def test_probes_read_the_catalogue_only_when_due_or_after_a_restart(
    make_standin: StandInFactory, pools: list[ComfyPool], catalog: WorkflowCatalog
) -> None:
    standin = await make_standin()
    pool = await started(
        pools,
        catalog,
        AgentConfig(standin.url, name="a"),
        probe_interval_s=0.02,
        catalogue_interval_s=60,
    )
    async with asyncio.timeout(5):
        while _gets(standin, "/system_stats") < 6:
            await asyncio.sleep(0.02)
    assert _gets(standin, "/object_info") == 1  # the start's; liveness probes skip it
    standin.set_models("upscale_models", ["other_x2.pth"])
    await asyncio.sleep(0.1)
    assert not pool.can_run(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec(model="other_x2.pth"))
    await standin.kill()  # a restart: the agent comes back online with its catalogue re-read
    async with asyncio.timeout(5):
        while pool.snapshot()[0].state is AgentState.ONLINE:
            await asyncio.sleep(0.02)
    await standin.restart()
    async with asyncio.timeout(5):
        while pool.snapshot()[0].state is not AgentState.ONLINE:
            await asyncio.sleep(0.02)
    assert _gets(standin, "/object_info") == 2
    assert pool.can_run(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec(model="other_x2.pth"))
    standin.set_models("upscale_models", ["third_x2.pth"])
    await pool.probe("a")  # an operator's probe reads it too
    assert pool.can_run(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec(model="third_x2.pth"))


async def test_the_catalogue_is_read_again_once_its_interval_has_passed(
    make_standin: StandInFactory, pools: list[ComfyPool], catalog: WorkflowCatalog
) -> None:
    standin = await make_standin()
    pool = await started(
        pools,
        catalog,
        AgentConfig(standin.url, name="a"),
        probe_interval_s=0.02,
        catalogue_interval_s=0.3,
    )
    standin.set_models("upscale_models", ["other_x2.pth"])
    async with asyncio.timeout(5):
        while not pool.can_run(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec(model="other_x2.pth")):
            await asyncio.sleep(0.02)
    assert _gets(standin, "/object_info") >= 2


async def test_equally_loaded_agents_the_one_with_a_slot_kept_here_is_picked(
    make_standin: StandInFactory,
    pools: list[ComfyPool],
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    tmp_path: Path,
) -> None:
    """Shared slots: among agents with as few runs, the one whose slot this process still
    holds from an ended run gets the next run (no claim now, no release later); the least
    loaded and the higher priority still come first."""
    a = await make_standin()
    b = await make_standin()
    pool = await started(pools, catalog, AgentConfig(a.url, name="a"), AgentConfig(b.url, name="b"))
    store = await SqliteJobStore.open(tmp_path / "jobs.db")
    slots = SharedAgentSlots(store, "A", 30)
    slots.keep_s = 60.0
    pool.share_slots(slots)
    try:
        assert pool.pick(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec()) == "a"  # by name
        await run(pool, upscale(inputs_dir, job_id="JOB0"), exclude=frozenset({"a"}))
        assert len(b.received.prompts) == 1  # ran on b: b's slot is kept here now
        assert slots.kept("b") and not slots.kept("a")
        assert pool.pick(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec()) == "b"
        await run(pool, upscale(inputs_dir, job_id="JOB1"))
        assert len(b.received.prompts) == 2 and not a.received.prompts
        claimed = await store.claim_slot("b", 2, "B", 30)  # another process's run on b
        assert claimed is not None
    finally:
        await slots.stop()
        await store.close()


async def test_a_kept_slot_never_outweighs_load_or_priority(
    make_standin: StandInFactory,
    pools: list[ComfyPool],
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    tmp_path: Path,
    spawn: Spawn,
) -> None:
    """A slot kept here only breaks a tie: a less loaded agent, or one of higher priority,
    is picked over the agent whose slot this process still holds."""
    a = await make_standin()
    b = await make_standin()
    low = await make_standin()
    b.hang_at("3")
    pool = await started(
        pools,
        catalog,
        AgentConfig(a.url, name="a"),
        AgentConfig(b.url, name="b", max_concurrent_jobs=2),
        AgentConfig(low.url, name="low", priority=-1),
    )
    store = await SqliteJobStore.open(tmp_path / "jobs.db")
    slots = SharedAgentSlots(store, "A", 30)
    slots.keep_s = 60.0
    pool.share_slots(slots)
    try:
        task = spawn(
            pool.run(
                upscale(inputs_dir, job_id="JOB0"), RecordingSink(), exclude=frozenset({"a", "low"})
            )
        )
        await b.wait_for(lambda: b.running_prompt is not None)  # b runs one job
        for agent in ("b", "low"):  # and a slot of each is kept here, unused
            token = await slots.take(agent, 2)
            assert token is not None
            await slots.give_back(token)
        assert slots.kept("b") and slots.kept("low") and not slots.kept("a")
        spec = ImageUpscaleSpec()
        # b: one run more than a, equal priority; low: as loaded as a, lower priority.
        assert pool.pick(TaskKind.IMAGE_UPSCALE, spec, frozenset({"low"})) == "a"
        assert pool.pick(TaskKind.IMAGE_UPSCALE, spec, frozenset({"b"})) == "a"
        assert pool.pick(TaskKind.IMAGE_UPSCALE, spec, frozenset({"a"})) == "low"
        b.release("3")
        async with asyncio.timeout(10):
            await task
    finally:
        await slots.stop()
        await store.close()


async def test_a_probe_waits_probe_timeout_s_not_the_request_bound(
    pools: list[ComfyPool], catalog: WorkflowCatalog
) -> None:
    """An agent that accepts connections and answers nothing (hung) is offline after
    ``probe_timeout_s``; the request bound (uploads, downloads, the catalogue) is far longer."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepted, never answered

    hung = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = hung.sockets[0].getsockname()[1]
    slow = dataclasses.replace(FAST, request_s=30.0)
    try:
        began = asyncio.get_running_loop().time()
        pool = await started(
            pools,
            catalog,
            AgentConfig(f"http://127.0.0.1:{port}", name="hung"),
            probe_timeout_s=0.3,
            timeouts=slow,
        )
        took = asyncio.get_running_loop().time() - began
        (snap,) = pool.snapshot()
        assert snap.state is AgentState.OFFLINE and "/system_stats timed out" in snap.last_error
        assert took < 2.0, took
    finally:
        for writer in held:
            writer.close()
        hung.close()
        await hung.wait_closed()


def test_the_probe_timeout_is_a_setting_of_its_own() -> None:
    env = {"AISERVER_AGENTS": "http://127.0.0.1:9", "AISERVER_AGENT_PROBE_TIMEOUT_S": "2.5"}
    (pool,) = comfy_pools(build_providers(load_settings(env), ImageLimits()))
    assert pool._settings.probe_timeout_s == 2.5
    assert load_settings({}).agent_probe_timeout_s == PoolSettings().probe_timeout_s == 10.0
    with pytest.raises(ValueError, match="probe_timeout_s"):
        PoolSettings(probe_timeout_s=0)


async def test_no_prompt_is_queued_on_a_slot_whose_lease_is_not_firm(
    make_standin: StandInFactory,
    pools: list[ComfyPool],
    catalog: WorkflowCatalog,
    inputs_dir: Path,
    tmp_path: Path,
) -> None:
    """Shared slots on PostgreSQL: a run whose slot lease may lapse before its prompt is on
    the agent (the claim took most of the lease; renewals failing) queues no prompt there:
    another coordinator may hold that slot by then. It fails before reaching the agent, so
    the job goes back to the queue and claims a slot afresh."""
    a = await make_standin()
    pool = await started(pools, catalog, AgentConfig(a.url, name="a", max_concurrent_jobs=1))
    backend = JobStoreBackend("postgres", tmp_path)
    store = await backend.open()
    slots = SharedAgentSlots(store, "A", 0.6)
    pool.share_slots(slots)
    claim_slot = store.claim_slot

    async def slow(agent: str, capacity: int, holder: str, lease_s: float) -> SlotClaim | None:
        await asyncio.sleep(0.45)  # the store answers late: little of the lease is left
        return await claim_slot(agent, capacity, holder, lease_s)

    store.claim_slot = slow  # type: ignore[method-assign]
    try:
        with pytest.raises(ProviderUnavailable) as err:
            await run(pool, upscale(inputs_dir))
        assert not err.value.cause.reached_agent
        assert not a.received.prompts
        store.claim_slot = claim_slot  # type: ignore[method-assign]
        sink = await run(pool, upscale(inputs_dir))  # a firm slot: it runs
        assert len(a.received.prompts) == 1 and sink.checkpoints
    finally:
        await slots.stop()
        await backend.close()
