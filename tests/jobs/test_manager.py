from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from aiserver.errors import ErrorKind, ServiceError
from aiserver.jobs.model import (
    Accepted,
    Finished,
    Job,
    JobState,
    OutputStored,
    Progress,
    Retrying,
    Stage,
    TextProduced,
)
from aiserver.jobs.scheduler import SHUTDOWN
from aiserver.jobs.store import JobQuery
from aiserver.jobs.store.sqlite import SqliteJobStore
from aiserver.providers.base import Cause, ProviderFailure, ProviderUnavailable
from aiserver.tasks import ImageToImageSpec, ImageToTextSpec, TaskKind
from tests.jobs.helpers import (
    Env,
    Run,
    ScriptedProvider,
    collect,
    final_job,
    gated,
    produce_image,
    produce_text,
    submit,
    within,
)


async def test_submit_runs_and_streams_every_event_in_order(env: Env) -> None:
    provider = ScriptedProvider(online=False)
    manager = await env.manager(provider)
    job = await submit(manager, env, ref_id="req-1", tag="cats")
    assert (job.state, job.ref_id, job.tag, job.owner) == (
        JobState.QUEUED,
        "req-1",
        "cats",
        "alice",
    )
    assert job.name == f"jobs/{job.id}"
    sub = manager.subscribe(job.id)
    accepted = await within(anext(sub))
    assert accepted.sequence == 1
    assert accepted.kind == Accepted(TaskKind.IMAGE_TO_IMAGE, "req-1", 1)
    assert manager.queue_position(job.id) == 1

    provider.online = True  # picked up by the periodic recheck
    events = [accepted, *await collect(sub)]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))  # gap-free
    assert [type(e.kind) for e in events] == [
        Accepted,
        Progress,
        Progress,
        Progress,
        OutputStored,
        Finished,
    ]
    # While no provider could take it, watchers were told why.
    assert events[1].kind == Progress(Stage.QUEUED, queue_position=1, waiting="p1 is offline")
    assert events[2].kind == Progress(Stage.PENDING, provider="p1")
    assert events[3].kind == Progress(Stage.RUNNING, 0.5, step=1, max_steps=2, provider="p1")
    final = events[-1].kind
    assert isinstance(final, Finished)
    assert final.job.state is JobState.SUCCEEDED and final.job.attempts == 1
    assert isinstance(events[4].kind, OutputStored)
    assert final.job.outputs == [events[4].kind.artifact]
    assert final.job.progress == 1.0 and final.job.provider == "p1"

    stored = await manager.get(job.id, "alice")
    assert stored.state is JobState.SUCCEEDED and stored.outputs == final.job.outputs
    assert (await env.artifacts.get(stored.outputs[0].name, "alice")).job_id == job.id
    assert [r.work.inputs["image"].path for r in provider.runs] == [
        env.spool.path_for(job.inputs[0].sha256)
    ]


async def test_texts_are_produced(env: Env) -> None:
    manager = await env.manager(ScriptedProvider(behaviour=produce_text))
    job = await submit(manager, env, task=TaskKind.IMAGE_TO_TEXT, spec=ImageToTextSpec())
    events = await collect(manager.subscribe(job.id))
    texts = [e.kind for e in events if isinstance(e.kind, TextProduced)]
    assert texts == [TextProduced(0, "a caption", "7")]
    assert (await manager.get(job.id, None)).texts == ["a caption"]


async def test_ref_id_is_idempotent_per_owner(env: Env) -> None:
    manager = await env.manager(ScriptedProvider(online=False))
    first, existing = await manager.submit(
        owner="alice",
        task=TaskKind.IMAGE_TO_IMAGE,
        spec=ImageToImageSpec(positive_prompt="x"),
        inputs=[env.input()],
        ref_id="r1",
        tag="",
        reply_to="",
    )
    assert not existing
    again = await submit(manager, env, ref_id="r1")
    assert again.id == first.id
    other = await submit(manager, env, owner="bob", ref_id="r1")
    assert other.id != first.id
    assigned = await submit(manager, env)
    assert assigned.ref_id == assigned.id  # empty ref_id: the server assigns one
    assert manager.queue_position(other.id) == 2


async def test_other_owners_jobs_are_not_found(env: Env) -> None:
    manager = await env.manager(ScriptedProvider(online=False))
    job = await submit(manager, env, owner="alice")
    assert (await manager.get(job.id, None)).id == job.id  # admin sees everything
    for call in (manager.get(job.id, "mallory"), manager.cancel(job.id, "mallory")):
        with pytest.raises(ServiceError) as err:
            await within(call)
        assert (err.value.kind, err.value.reason) == (ErrorKind.NOT_FOUND, "JOB_NOT_FOUND")
    with pytest.raises(ServiceError) as missing:
        await manager.get("01JUNKJUNKJUNKJUNKJUNKJUNK", None)
    assert missing.value.reason == "JOB_NOT_FOUND"
    assert (await manager.get(job.id, "alice")).state is JobState.QUEUED


async def test_submit_rejections(env: Env) -> None:
    manager = await env.manager(ScriptedProvider(tasks=[TaskKind.IMAGE_UPSCALE]))
    with pytest.raises(ServiceError) as err:
        await submit(manager, env, task=TaskKind.IMAGE_TO_TEXT, spec=ImageToTextSpec())
    assert (err.value.kind, err.value.reason) == (ErrorKind.FAILED_PRECONDITION, "NO_PROVIDER")
    assert manager.can_serve(TaskKind.IMAGE_UPSCALE)
    assert not manager.can_serve(TaskKind.IMAGE_TO_TEXT)

    gone = env.input(b"vanished")
    env.spool.path_for(gone.sha256).unlink()
    with pytest.raises(ServiceError) as err:
        await submit(manager, env, task=TaskKind.IMAGE_UPSCALE, inputs=[gone])
    assert (err.value.kind, err.value.reason) == (ErrorKind.FAILED_PRECONDITION, "INPUT_MISSING")
    with pytest.raises(ServiceError) as err:
        await submit(manager, env, task=TaskKind.IMAGE_UPSCALE, inputs=[])
    assert err.value.reason == "INPUT_REQUIRED"


async def test_list_through_the_manager(env: Env) -> None:
    manager = await env.manager(ScriptedProvider(online=False))
    ids = [(await submit(manager, env, tag="t" if i % 2 else "")).id for i in range(5)]
    await submit(manager, env, owner="bob")
    page, token = await manager.list(
        owner="alice", states=[], task=None, tag="", ref_id="", page_size=2, page_token=""
    )
    assert [j.id for j in page] == ids[::-1][:2] and token
    page2, _ = await manager.list(
        owner="alice", states=[], task=None, tag="", ref_id="", page_size=2, page_token=token
    )
    assert [j.id for j in page2] == ids[::-1][2:4]
    tagged, _ = await manager.list(
        owner="alice",
        states=[JobState.QUEUED],
        task=TaskKind.IMAGE_TO_IMAGE,
        tag="t",
        ref_id="",
        page_size=0,
        page_token="",
    )
    assert [j.id for j in tagged] == [ids[3], ids[1]]
    for size, bad in ((2, "not-a-token"), (-1, "")):
        with pytest.raises(ServiceError) as err:
            await manager.list(
                owner="alice",
                states=[],
                task=None,
                tag="",
                ref_id="",
                page_size=size,
                page_token=bad,
            )
        assert err.value.kind is ErrorKind.INVALID_ARGUMENT


async def test_late_subscribers_get_a_replay(env: Env) -> None:
    manager = await env.manager(ScriptedProvider(), history_retain_s=0.05)
    job = await submit(manager, env)
    live = await collect(manager.subscribe(job.id))
    in_memory = await collect(manager.subscribe(job.id))  # ended, history still in memory
    assert [type(e.kind) for e in in_memory] == [Accepted, OutputStored, Finished]
    await asyncio.sleep(0.1)
    synthesized = await collect(manager.subscribe(job.id))  # history dropped: from the store
    assert [e.kind for e in synthesized] == [e.kind for e in in_memory]
    assert synthesized[-1].sequence == in_memory[-1].sequence == live[-1].sequence


async def test_queue_positions_are_published(env: Env) -> None:
    provider = ScriptedProvider(behaviour=gated)
    manager = await env.manager(provider, max_running_per_provider=1)
    first = await submit(manager, env)
    run = await provider.next_run()
    second = await submit(manager, env)
    third = await submit(manager, env)
    assert [manager.queue_position(j.id) for j in (first, second, third)] == [0, 1, 2]
    sub = manager.subscribe(third.id)
    assert (await within(anext(sub))).kind == Accepted(TaskKind.IMAGE_TO_IMAGE, third.ref_id, 2)
    run.release.set()
    moved = await within(anext(sub))
    assert moved.kind == Progress(Stage.QUEUED, queue_position=1)
    (await provider.next_run()).release.set()
    (await provider.next_run()).release.set()
    assert isinstance((await collect(sub))[-1].kind, Finished)


async def test_least_loaded_provider_is_picked(env: Env) -> None:
    a, b = ScriptedProvider("a", gated), ScriptedProvider("b", gated)
    manager = await env.manager(a, b, max_running_per_provider=2)
    jobs = [await submit(manager, env) for _ in range(4)]
    runs = [await a.next_run(), await a.next_run(), await b.next_run(), await b.next_run()]
    assert (a.load(), b.load()) == (2, 2)
    assert manager.queue_position(jobs[-1].id) == 0
    fifth = await submit(manager, env)
    assert manager.queue_position(fifth.id) == 1  # both full
    for run in runs[:2]:  # a frees up, b stays busy: the queued job goes to a
        run.release.set()
    (await a.next_run()).release.set()
    final = (await collect(manager.subscribe(fifth.id)))[-1].kind
    assert isinstance(final, Finished) and final.job.provider == "a"
    for run in runs[2:]:
        run.release.set()


async def test_cancel_queued_job(env: Env) -> None:
    provider = ScriptedProvider(online=False)
    manager = await env.manager(provider)
    job = await submit(manager, env)
    sub = manager.subscribe(job.id)
    cancelled = await within(manager.cancel(job.id, "alice"))
    assert cancelled.state is JobState.CANCELLED
    assert cancelled.error is not None and cancelled.error.kind is ErrorKind.CANCELLED
    assert manager.queue_position(job.id) == 0
    events = await collect(sub)
    assert isinstance(events[-1].kind, Finished)
    assert events[-1].kind.job.state is JobState.CANCELLED
    provider.online = True
    await asyncio.sleep(0.1)
    assert provider.runs == []
    again = await manager.cancel(job.id, "alice")  # terminal: unchanged
    assert again.state is JobState.CANCELLED and again.ended == cancelled.ended


async def test_cancel_running_job_cancels_the_provider(env: Env) -> None:
    provider = ScriptedProvider(behaviour=gated)
    manager = await env.manager(provider)
    job = await submit(manager, env)
    run = await provider.next_run()
    cancelled = await within(manager.cancel(job.id, None))
    assert cancelled.state is JobState.CANCELLED
    assert run.cancelled and run.cancel_message is None  # a user's cancel, not shutdown
    assert (await manager.get(job.id, None)).state is JobState.CANCELLED
    assert provider.load() == 0


async def test_unavailable_provider_is_retried_without_the_failed_agent(env: Env) -> None:
    async def flaky(run: Run) -> None:
        if run.work.attempt == 1:
            await run.sink.checkpoint({"agent": "gpu-1", "prompt_id": "p1"})
            raise ProviderUnavailable("gpu-1 went away", agent="gpu-1", cause=Cause.CONNECTION)
        await produce_image(run)

    provider = ScriptedProvider(behaviour=flaky)
    manager = await env.manager(provider)
    job = await submit(manager, env)
    events = await collect(manager.subscribe(job.id))
    retrying = [e.kind for e in events if isinstance(e.kind, Retrying)]
    assert retrying == [Retrying(1, "gpu-1 went away", "gpu-1")]
    final = events[-1].kind
    assert isinstance(final, Finished) and final.job.state is JobState.SUCCEEDED
    assert final.job.attempts == 2 and final.job.resume == {}
    first, second = (r.work for r in provider.runs)
    assert (first.attempt, first.exclude) == (1, frozenset())
    assert (second.attempt, second.exclude, dict(second.resume)) == (2, frozenset({"gpu-1"}), {})
    assert [e.sequence for e in events] == sorted(e.sequence for e in events)


async def test_max_attempts_then_failed_with_the_last_error(env: Env) -> None:
    async def down(run: Run) -> None:
        raise ProviderUnavailable(
            f"down on attempt {run.work.attempt}",
            agent=f"a{run.work.attempt}",
            cause=Cause.CONNECTION,
        )

    provider = ScriptedProvider(behaviour=down)
    manager = await env.manager(provider, max_attempts=3)
    job = await submit(manager, env)
    events = await collect(manager.subscribe(job.id))
    assert [e.kind.attempt for e in events if isinstance(e.kind, Retrying)] == [
        1,
        2,
    ]  # the attempt that failed
    final = events[-1].kind
    assert isinstance(final, Finished)
    assert final.job.state is JobState.FAILED and final.job.attempts == 3
    assert final.job.error is not None
    assert (final.job.error.kind, final.job.error.reason) == (
        ErrorKind.UNAVAILABLE,
        "PROVIDER_UNAVAILABLE",
    )
    # The last error, naming the first one: the cause that started the retries.
    assert final.job.error.message == "down on attempt 3; first failure (on a1): down on attempt 1"
    assert final.job.error.metadata["first_failure"] == "down on attempt 1"
    assert provider.runs[-1].work.exclude == {"a1", "a2"}


async def test_errors_fail_the_job(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    async def invalid(run: Run) -> None:
        raise ServiceError(ErrorKind.INVALID_ARGUMENT, "UNKNOWN_MODEL", "no such model")

    async def broken(run: Run) -> None:
        raise RuntimeError("boom")

    async def silent(run: Run) -> None:
        return None

    provider = ScriptedProvider(behaviour=invalid)
    manager = await env.manager(provider)
    results: list[Job] = []
    for behaviour in (invalid, broken, silent):
        provider.behaviour = behaviour
        job = await submit(manager, env)
        results.append(await final_job(manager.subscribe(job.id)))
    assert all(j.error is not None for j in results)
    assert [(j.state, j.error.kind, j.error.reason) for j in results if j.error] == [
        (JobState.FAILED, ErrorKind.INVALID_ARGUMENT, "UNKNOWN_MODEL"),
        (JobState.FAILED, ErrorKind.INTERNAL, "INTERNAL"),
        (JobState.FAILED, ErrorKind.INTERNAL, "NO_OUTPUTS"),
    ]
    assert "boom" not in str(results[1].error)  # details go to the log, not the client
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert any("boom" in str(r.exc_info[1]) for r in logged if r.exc_info)
    assert [r.work.attempt for r in provider.runs] == [1, 1, 1]  # no retries for these


async def test_the_failures_type_decides_retrying(env: Env) -> None:
    """A retryable cause is retried, with the failure's agent excluded; a final one is not,
    whatever its kind; and UNAVAILABLE alone (no cause) is not a reason to retry."""

    async def final(run: Run) -> None:
        raise ProviderFailure(
            ErrorKind.INTERNAL,
            "COMFYUI_EXECUTION_ERROR",
            "node 7 failed",
            cause=Cause.EXECUTION_ERROR,
            agent="gpu-1",
        )

    async def busy_then_fine(run: Run) -> None:
        if run.work.attempt == 1:
            raise ProviderUnavailable("gpu-2 too busy", agent="gpu-2", cause=Cause.QUEUE_TIMEOUT)
        await produce_image(run)

    async def unavailable_without_cause(run: Run) -> None:
        raise ServiceError(ErrorKind.UNAVAILABLE, "PROVIDER_UNAVAILABLE", "no cause given")

    provider = ScriptedProvider(behaviour=final)
    manager = await env.manager(provider)
    results: list[Job] = []
    for behaviour in (final, busy_then_fine, unavailable_without_cause):
        provider.behaviour = behaviour
        job = await submit(manager, env)
        results.append(await final_job(manager.subscribe(job.id)))
    assert [j.state for j in results] == [JobState.FAILED, JobState.SUCCEEDED, JobState.FAILED]
    assert [(r.work.attempt, r.work.exclude) for r in provider.runs] == [
        (1, frozenset()),
        (1, frozenset()),
        (2, frozenset({"gpu-2"})),
        (1, frozenset()),
    ]


def test_a_final_cause_is_never_unavailable() -> None:
    """UNAVAILABLE promises a retry may succeed: a cause that says otherwise is refused."""
    with pytest.raises(ValueError):
        ProviderUnavailable("node 7 failed", agent="gpu-1", cause=Cause.EXECUTION_ERROR)
    lost = ProviderUnavailable("gone", agent="gpu-1", cause=Cause.CONNECTION)
    assert (lost.reached_agent, lost.agent_lost, lost.retryable) == (True, True, True)
    assert lost.metadata == {"agent": "gpu-1", "cause": "connection"}


async def test_queue_timeout(env: Env) -> None:
    manager = await env.manager(ScriptedProvider(online=False), queue_timeout_s=0.2)
    job = await submit(manager, env)
    final = (await collect(manager.subscribe(job.id)))[-1].kind
    assert isinstance(final, Finished) and final.job.state is JobState.FAILED
    assert final.job.error is not None
    assert (final.job.error.kind, final.job.error.reason) == (
        ErrorKind.DEADLINE_EXCEEDED,
        "QUEUE_TIMEOUT",
    )


async def test_a_job_no_provider_will_take_fails_at_once(env: Env) -> None:
    provider = ScriptedProvider(online=False)
    provider.refuse = ServiceError(
        ErrorKind.FAILED_PRECONDITION, "COMFYUI_MODEL_MISSING", "no agent has model x"
    )
    manager = await env.manager(provider, queue_timeout_s=60)
    job = await submit(manager, env)
    async with asyncio.timeout(5):  # long before the queue timeout
        final = (await collect(manager.subscribe(job.id)))[-1].kind
    assert isinstance(final, Finished) and final.job.state is JobState.FAILED
    assert final.job.error is provider.refuse or final.job.error == provider.refuse
    assert provider.runs == []


async def test_run_timeout(env: Env) -> None:
    provider = ScriptedProvider(behaviour=gated)
    manager = await env.manager(provider, run_timeout_s=0.2)
    job = await submit(manager, env)
    final = (await collect(manager.subscribe(job.id)))[-1].kind
    assert isinstance(final, Finished) and final.job.error is not None
    assert (final.job.error.kind, final.job.error.reason) == (
        ErrorKind.DEADLINE_EXCEEDED,
        "RUN_TIMEOUT",
    )
    assert provider.runs[0].cancelled


async def test_terminal_hooks_run_after_store_and_event(env: Env) -> None:
    manager = await env.manager(ScriptedProvider())
    seen: list[tuple[str, JobState]] = []
    called = asyncio.Event()

    async def failing(job: Job) -> None:
        raise RuntimeError("webhook down")

    async def recording(job: Job) -> None:
        stored = await manager.get(job.id, None)
        seen.append((job.id, stored.state))
        called.set()

    manager.add_terminal_hook(failing)
    manager.add_terminal_hook(recording)
    job = await submit(manager, env)
    events = await collect(manager.subscribe(job.id))
    await within(called.wait())
    assert seen == [(job.id, JobState.SUCCEEDED)]
    assert isinstance(events[-1].kind, Finished)
    second = await submit(manager, env)  # a failing hook breaks nothing
    assert (await final_job(manager.subscribe(second.id))).state is JobState.SUCCEEDED


async def test_a_plain_function_hook_runs_when_the_job_ends(env: Env) -> None:
    # Plain functions (the metrics hook) run at once, without a task per job.
    manager = await env.manager(ScriptedProvider())
    seen: list[tuple[str, JobState]] = []

    def recording(job: Job) -> None:
        seen.append((job.id, job.state))

    def failing(job: Job) -> None:
        raise RuntimeError("metrics down")

    manager.add_terminal_hook(failing)
    manager.add_terminal_hook(recording)
    job = await submit(manager, env)
    events = await collect(manager.subscribe(job.id))
    assert isinstance(events[-1].kind, Finished)
    assert seen == [(job.id, JobState.SUCCEEDED)]
    second = await submit(manager, env)  # a failing hook breaks nothing
    assert (await final_job(manager.subscribe(second.id))).state is JobState.SUCCEEDED
    assert seen[-1] == (second.id, JobState.SUCCEEDED)


async def test_spool_files_are_deleted_when_no_unfinished_job_needs_them(env: Env) -> None:
    provider = ScriptedProvider(behaviour=gated)
    manager = await env.manager(provider)
    shared, own = env.input(b"shared"), env.input(b"own")
    a = await submit(manager, env, inputs=[shared])
    b = await submit(manager, env, inputs=[shared])
    c = await submit(manager, env, inputs=[own])
    runs = {r.work.job_id: r for r in [await provider.next_run() for _ in range(3)]}
    for job in (a, c):
        runs[job.id].release.set()
        await collect(manager.subscribe(job.id))
    assert env.spool.path_for(shared.sha256).exists()  # b still needs it
    assert not env.spool.path_for(own.sha256).exists()
    runs[b.id].release.set()
    await collect(manager.subscribe(b.id))
    assert not env.spool.path_for(shared.sha256).exists()


async def test_stop_lets_jobs_finish_within_grace_then_leaves_them_recoverable(env: Env) -> None:
    provider = ScriptedProvider(behaviour=gated)
    manager = await env.manager(provider)
    quick, slow = await submit(manager, env), await submit(manager, env)
    quick_run, slow_run = await provider.next_run(), await provider.next_run()
    if quick_run.work.job_id != quick.id:
        quick_run, slow_run = slow_run, quick_run
    asyncio.get_running_loop().call_later(0.05, quick_run.release.set)
    await within(manager.stop(grace_s=0.3))
    assert slow_run.cancelled and slow_run.cancel_message == SHUTDOWN
    store = env.stores[0]
    stored = {j.id: j.state for j in (await store.query(JobQuery(), page_size=0, page_token=""))[0]}
    assert stored == {quick.id: JobState.SUCCEEDED, slow.id: JobState.RUNNING}
    with pytest.raises(ServiceError) as err:
        await submit(manager, env)
    assert err.value.kind is ErrorKind.UNAVAILABLE


async def test_spool_deletion_waits_out_the_grace_period(env: Env) -> None:
    manager = await env.manager(ScriptedProvider(), spool_grace_s=0.1)
    ref = env.input(b"soon gone")
    job = await submit(manager, env, inputs=[ref])
    await final_job(manager.subscribe(job.id))
    path = env.spool.path_for(ref.sha256)
    assert path.exists()  # a request may be about to submit the same content
    await asyncio.sleep(0.2)
    assert not path.exists()


async def test_a_pinned_upload_survives_a_job_ending_with_the_same_bytes(env: Env) -> None:
    from aiserver.jobs.model import InputRef
    from aiserver.spool import UploadBudget

    provider = ScriptedProvider(behaviour=gated)
    manager = await env.manager(provider)  # spool_grace_s=0: deletion is immediate
    writer = env.spool.open("image", "in.png", UploadBudget(1 << 20))
    await writer.write(b"same bytes")
    pending = env.spool.commit(await writer.finish())  # a request between upload and submit
    ref = InputRef("image", "in.png", pending.sha256, pending.size, "image/png", 8, 8)
    job = await submit(manager, env, inputs=[ref])
    (await provider.next_run()).release.set()
    await collect(manager.subscribe(job.id))
    assert pending.path.exists(), "deleted while another request still held it"
    env.spool.unpin(pending)
    manager.discard_inputs({pending.sha256})  # that request made no job after all
    assert not pending.path.exists()


async def test_a_submission_right_after_anothers_create_counts_it_once(env: Env) -> None:
    # A created job is in the active set from the moment its create returns; it must no longer
    # be counted as "being created" too, or a submission that checks the per-owner limit in
    # that moment is refused with room left (seen at 64 concurrent callers).
    manager = await env.manager(ScriptedProvider("p1", gated), max_active_per_owner=3)
    await submit(manager, env)
    store = manager._store
    create = store.create
    late: list[asyncio.Task[object]] = []

    async def create_then_submit(*args: object, **kwargs: object) -> object:
        # Suspended first (as a create that waits for the writes' turn): the create goes on
        # in a task of its own, so its caller wakes a step after the job is in _active.
        await asyncio.sleep(0)
        result = await create(*args, **kwargs)  # type: ignore[arg-type]
        if not late:  # the next submission starts while this one's caller is still waiting
            asyncio.get_running_loop().call_soon(
                lambda: late.append(asyncio.create_task(submit(manager, env)))
            )
        return result

    store.create = create_then_submit  # type: ignore[method-assign]
    await submit(manager, env)  # the second of three allowed
    assert len(late) == 1  # it began before this caller woke: inside the window
    third = await within(late[0])  # the third: 2 unfinished before it, room for one more
    assert third.state is JobState.QUEUED


async def test_a_controller_cancelled_while_its_end_waits_to_be_written_still_ends_the_job(
    env: Env,
) -> None:
    # stop() cancels controllers that outlive the grace; one cancelled while the job's end
    # waits for the writes' turn must not cut that end half-way: stored, Finished sent, the
    # job out of the active set and its done set.
    produced = asyncio.Event()

    async def image_then_gate(run: Run) -> None:
        await produce_image(run)
        produced.set()
        await run.release.wait()

    provider = ScriptedProvider(behaviour=image_then_gate)
    manager = await env.manager(provider)
    store = manager._store
    if not isinstance(store, SqliteJobStore):
        pytest.skip("the embedded store's writes' turn")
    job = await submit(manager, env)
    events = manager.subscribe(job.id)
    run = await provider.next_run()
    await within(produced.wait())
    active = manager._active[job.id]
    turn = store._turn
    gate = threading.Event()
    held = asyncio.ensure_future(turn.in_thread(lambda: gate.wait(10)))  # a long write
    try:
        await asyncio.sleep(0)
        assert turn.busy()
        run.release.set()
        for _ in range(1000):  # the run ends; the controller begins the job's end
            if active.finishing:
                break
            await asyncio.sleep(0)
        assert active.finishing and job.id in manager._active  # its write queued
        assert active.controller is not None
        active.controller.cancel()
        await asyncio.sleep(0)
    finally:
        gate.set()
    await within(held)
    final = await final_job(events)
    assert final.state is JobState.SUCCEEDED
    await within(active.done.wait())
    assert job.id not in manager._active
    stored = await store.get(job.id)
    assert stored is not None and stored.job.state is JobState.SUCCEEDED
