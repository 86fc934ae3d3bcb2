"""ImageUpscale naming a model nobody has is refused at once, embedded upscaler on or off."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aiserver.errors import ServiceError
from aiserver.jobs.model import Finished, JobState
from aiserver.providers.base import Provider, ProviderUnavailable
from aiserver.providers.comfy.pool import AgentConfig, ComfyPool, PoolSettings
from aiserver.providers.comfy.workflows import WorkflowCatalog
from aiserver.providers.fallback import Excluding, Fallback
from aiserver.providers.local import LocalUpscaleProvider, LocalUpscaleSettings
from aiserver.tasks import ImageUpscaleSpec, TaskKind
from tests.comfy.helpers import FAST
from tests.jobs.helpers import Env, collect, env, submit
from tests.providers_local.helpers import RecordingSink, save, textured, work_for
from tests.support.comfy_standin import ComfyStandIn

__all__ = ["env"]  # the fixture

MISSING = "no_such_model.pth"


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[ComfyStandIn]:
    async with ComfyStandIn(tmp_path / "agent") as standin:
        yield standin


async def fails_at_once(env: Env, providers: list[Provider]) -> ServiceError:
    manager = await env.manager(*providers, recheck_interval_s=2.0)
    started = time.monotonic()
    job = await submit(
        manager, env, task=TaskKind.IMAGE_UPSCALE, spec=ImageUpscaleSpec(model=MISSING)
    )
    events = await collect(manager.subscribe(job.id), seconds=10)
    final = events[-1].kind
    assert isinstance(final, Finished) and final.job.state is JobState.FAILED
    assert time.monotonic() - started < 1.0  # not at a queue deadline, nor a recheck
    assert final.job.error is not None and final.job.attempts == 0
    return final.job.error


def local() -> LocalUpscaleProvider:
    return LocalUpscaleProvider(LocalUpscaleSettings())


async def test_refused_at_once_with_agents_and_the_embedded_fallback(
    env: Env, agent: ComfyStandIn
) -> None:
    pool = ComfyPool(
        [AgentConfig(agent.url, name="agent-a")],
        WorkflowCatalog.load(),
        settings=PoolSettings(timeouts=FAST),
    )
    async with pool:
        error = await fails_at_once(env, [pool, Fallback(local(), [pool])])
    assert error.reason == "COMFYUI_MODEL_MISSING" and MISSING in error.message


async def test_refused_at_once_with_upscales_always_local(env: Env, agent: ComfyStandIn) -> None:
    pool = ComfyPool(
        [AgentConfig(agent.url, name="agent-a")],
        WorkflowCatalog.load(),
        settings=PoolSettings(timeouts=FAST),
    )
    upscale = frozenset({TaskKind.IMAGE_UPSCALE})
    async with pool:
        error = await fails_at_once(env, [Excluding(pool, upscale), local()])
    assert error.reason == "UNKNOWN_MODEL" and error.metadata["model"] == MISSING


async def test_refused_at_once_without_agents(env: Env) -> None:
    error = await fails_at_once(env, [local()])
    assert error.reason == "UNKNOWN_MODEL"


async def test_a_model_it_has_is_not_refused() -> None:
    provider = local()
    for model in ("", "realesrgan-x4plus", "RealESRGAN_x4plus.pth"):
        assert provider.refusal(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec(model=model)) is None
    await provider.close()


async def test_a_model_that_failed_to_load_is_refused_for_good(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiserver.providers.local import models

    param, weights = tmp_path / "broken.param", tmp_path / "broken.bin"
    param.write_text("not a param file\n")
    weights.write_bytes(b"\0" * 16)
    monkeypatch.setattr(models, "model_files", lambda model: (param, weights))
    provider = local()
    spec = ImageUpscaleSpec()
    assert provider.refusal(TaskKind.IMAGE_UPSCALE, spec) is None  # not tried yet
    path = save(textured((4, 4)), tmp_path / "a.png")
    with pytest.raises(ProviderUnavailable):
        await provider.run(work_for(path), RecordingSink())
    refused = provider.refusal(TaskKind.IMAGE_UPSCALE, spec)
    assert refused is not None and refused.reason == "LOCAL_MODEL_UNAVAILABLE"
    assert "cannot load" in provider.unavailable_reason(TaskKind.IMAGE_UPSCALE, spec)
    await provider.close()
