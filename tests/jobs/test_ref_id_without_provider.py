"""A known ``ref_id`` returns its job even when no provider serves the task any more."""

from __future__ import annotations

import pytest

from aiserver.errors import ErrorKind, ServiceError
from aiserver.jobs.model import JobState
from aiserver.tasks import TaskKind
from tests.jobs.helpers import Env, ScriptedProvider, submit, within


async def test_known_ref_id_returns_the_existing_job_when_no_provider_serves_the_task(
    env: Env,
) -> None:
    provider = ScriptedProvider(online=False)
    manager = await env.manager(provider)
    first = await submit(manager, env, ref_id="r1")
    provider.tasks = frozenset()  # reconfigured: nothing serves ImageToImage now

    again, existing = await within(
        manager.submit(
            owner="alice",
            task=TaskKind.IMAGE_TO_IMAGE,
            spec=first.spec,
            inputs=[env.input()],
            ref_id="r1",
            tag="",
            reply_to="",
        )
    )
    assert existing and again.id == first.id and again.state is JobState.QUEUED
    # Another owner's ref_id, or an unknown one, is new work that nothing can run.
    for owner, ref_id in (("bob", "r1"), ("alice", "r2")):
        with pytest.raises(ServiceError) as err:
            await submit(manager, env, owner=owner, ref_id=ref_id)
        assert (err.value.kind, err.value.reason) == (ErrorKind.FAILED_PRECONDITION, "NO_PROVIDER")
