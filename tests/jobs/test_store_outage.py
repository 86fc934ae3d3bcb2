"""Two coordinators (job managers) on one PostgreSQL schema while one of them loses the
database: cut (every connection reset, new ones refused) or black-holed (packets dropped:
nothing answers, nothing is refused), through a relay in front of it (tests/support/tcp_cut.py).
What is checked: a watcher following the other's job through the store rides out a short
outage without missing or repeating an event, and gives up UNAVAILABLE past its bound; a run
whose lease is no longer firm does not queue work a taker would queue again."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from aiserver.blobs.s3 import S3BlobStore
from aiserver.jobs.event_codec import FINISHED
from aiserver.jobs.manager import JobManager
from aiserver.jobs.model import Accepted, Finished, InputRef, JobEvent, JobState
from aiserver.jobs.scheduler import SchedulerSettings
from aiserver.jobs.store import JobStore, new_holder_id
from aiserver.jobs.store.postgres import PostgresJobStore
from aiserver.jobs.store_watch import StoreWatch
from aiserver.outage import backend_outage
from aiserver.spool import InputSpool
from aiserver.tasks import ImageToImageSpec, TaskKind
from tests.jobs.helpers import (
    FAST,
    Env,
    Run,
    ScriptedProvider,
    final_job,
    gated,
    png,
    produce_image,
    submit,
    within,
)
from tests.storage.backends import PG_URL, S3_CREDENTIALS, JobStoreBackend, S3Server
from tests.support.tcp_cut import TcpCut

LEASE_S = 1.5
TIMEOUT_S = 0.5  # the relayed store's bound on a statement or a connect


class Coordinators:
    """Managers on one schema; :meth:`relayed` ones reach it through ``relay``."""

    def __init__(self, tmp_path: Path, relay: TcpCut) -> None:
        self.backend = JobStoreBackend("postgres", tmp_path)
        self.env = Env(tmp_path / "env")
        self.relay = relay
        self.managers: list[JobManager] = []
        self.stores: list[JobStore] = []

    async def manager(
        self,
        provider: ScriptedProvider,
        *,
        relayed: bool = False,
        spool: InputSpool | None = None,
        **settings: Any,
    ) -> JobManager:
        if relayed:
            db = urlsplit(PG_URL)
            url = PG_URL.replace(f"{db.hostname}:{db.port}", f"127.0.0.1:{self.relay.port}")
            store: JobStore = await PostgresJobStore.open(
                url, schema=self.backend.schema, pool_size=4, timeout_s=TIMEOUT_S
            )
            self.stores.append(store)
        else:
            store = await self.backend.open()
        manager = JobManager(
            store,
            spool or self.env.spool,
            self.env.artifacts,
            [provider],
            SchedulerSettings(**{**FAST, **settings}),
            holder=new_holder_id(),
            lease_s=LEASE_S,
        )
        self.managers.append(manager)
        await manager.start()
        return manager

    async def close(self) -> None:
        self.relay.restore()
        for manager in self.managers:
            await manager.stop(0.1)
        for store in self.stores:
            await store.close()
        await self.env.artifacts.close()
        await self.backend.close()


@pytest.fixture
async def relay() -> AsyncIterator[TcpCut]:
    db = urlsplit(PG_URL)
    async with TcpCut(db.hostname or "127.0.0.1", db.port or 5432) as found:
        yield found


@pytest.fixture
async def pair(tmp_path: Path, relay: TcpCut) -> AsyncIterator[Coordinators]:
    found = Coordinators(tmp_path, relay)
    try:
        yield found
    finally:
        await found.close()


def _serves_nothing() -> ScriptedProvider:
    return ScriptedProvider("p1", tasks=())


async def _three_outputs(run: Run) -> None:
    await run.release.wait()
    for _ in range(3):
        await produce_image(run)


@pytest.mark.parametrize("fault", ["cut", "blackhole"])
async def test_a_watcher_elsewhere_rides_out_a_short_outage_missing_and_repeating_nothing(
    pair: Coordinators, fault: str
) -> None:
    runner = ScriptedProvider("p1", _three_outputs)
    a = await pair.manager(runner)  # runs the job; its database stays
    b = await pair.manager(_serves_nothing(), relayed=True, watch_outage_s=20.0)
    job = await submit(a, pair.env)
    run = await runner.next_run()
    watch = b.subscribe(job.id)
    assert isinstance(watch, StoreWatch)
    first = await within(anext(watch))
    assert isinstance(first.kind, Accepted)
    getattr(pair.relay, fault)()  # b loses the database ...
    run.release.set()  # ... while the job emits its outputs and ends on a
    final = await within(final_job(a.subscribe(job.id)), 10)
    assert final.state is JobState.SUCCEEDED
    reads = asyncio.ensure_future(_all(watch))
    # The outage outlasts the watcher's idle re-read (2 s): it reads, and fails, meanwhile.
    await asyncio.sleep(3.5)
    assert not reads.done()  # ... and the watcher waits through it
    pair.relay.restore()
    events = [first, *await within(reads, 15)]
    assert isinstance(events[-1].kind, Finished)
    assert events[-1].kind.job.state is JobState.SUCCEEDED
    sequences = [e.sequence for e in events]
    assert sequences == sorted(set(sequences)), sequences  # none twice, in order
    stored = await pair.backend.open()
    rows = await stored.events(job.id)  # every event stored: none missed
    assert sequences == [r.sequence for r in rows], (sequences, [r.kind for r in rows])
    assert rows[-1].kind == FINISHED


async def test_a_watcher_gives_up_unavailable_when_the_outage_outlasts_its_bound(
    pair: Coordinators,
) -> None:
    runner = ScriptedProvider("p1", gated)
    a = await pair.manager(runner)
    b = await pair.manager(_serves_nothing(), relayed=True, watch_outage_s=1.0)
    job = await submit(a, pair.env)
    await runner.next_run()
    watch = b.subscribe(job.id)
    await within(anext(watch))
    pair.relay.blackhole()
    began = time.monotonic()
    with pytest.raises(Exception) as ended:
        await within(_all(watch), 10)
    took = time.monotonic() - began
    error = backend_outage(ended.value)
    assert error is not None and error.reason == "STORE_UNAVAILABLE", ended.value
    # The bound, plus an idle wait (2 s) and one failed read (its statement and cancel).
    assert 1.0 <= took < 1.0 + 2.0 + 4 * TIMEOUT_S + 3.0, took


async def test_a_run_whose_lease_is_not_firm_queues_nothing_a_taker_queues_again(
    pair: Coordinators,
) -> None:
    """The holder's renewals stopped (a frozen process, or its database away) and its lease
    lapsed, but nobody has taken the job yet, so its fenced checkpoint save still succeeds.
    Queueing the prompt after it would race the taker, which finds the checkpoint's prompt
    not yet on the agent and queues it too: the agent would run it twice."""
    agent: dict[str, int] = {}  # prompt id -> times queued (what a ComfyUI stand-in counts)
    checkpointed = asyncio.Event()
    post_now = asyncio.Event()

    async def holder_run(run: Run) -> None:
        await run.release.wait()
        await run.sink.checkpoint({"agent": "x", "prompt_id": "prompt-1"})
        checkpointed.set()
        await post_now.wait()
        agent["prompt-1"] = agent.get("prompt-1", 0) + 1  # POST /prompt
        await produce_image(run)

    async def taker_run(run: Run) -> None:
        prompt = run.work.resume.get("prompt_id", "")
        assert prompt == "prompt-1"  # from the checkpoint
        if prompt not in agent:  # not on the agent (yet): queue it
            agent[prompt] = agent.get(prompt, 0) + 1
        await produce_image(run)

    holder = ScriptedProvider("p1", holder_run)
    a = await pair.manager(holder)
    job = await submit(a, pair.env)
    run = await holder.next_run()
    # Frozen: no renewal, no adoption pass (which would claim its own lapsed lease again).
    await a._leases.stop()  # type: ignore[union-attr]
    for task in a._shared_tasks:
        task.cancel()
    async with asyncio.timeout(10):  # until the lease has lapsed in the database
        while await pair.backend.sql(
            f"SELECT lease_expires_us > (extract(epoch FROM clock_timestamp()) * 1e6)::bigint"
            f" FROM jobs WHERE id = '{job.id}'"
        ):
            await asyncio.sleep(0.1)
    run.release.set()
    # The checkpoint is saved (nobody holds the job instead), then the run either goes on
    # to queue its prompt (waiting for post_now) or stops there.
    await within(
        asyncio.wait(
            {asyncio.ensure_future(checkpointed.wait()), _ended(run)},
            return_when=asyncio.FIRST_COMPLETED,
        )
    )
    taker = ScriptedProvider("p1", taker_run)
    b = await pair.manager(taker)
    final = await within(final_job(b.subscribe(job.id)), 10)
    assert final.state is JobState.SUCCEEDED
    post_now.set()  # the holder's queueing, late
    await within(run.done.wait())
    assert agent == {"prompt-1": 1}, agent  # queued once, by one of them


async def test_an_input_fetch_that_meets_the_bucket_away_fails_no_job(
    pair: Coordinators, tmp_path: Path
) -> None:
    """The coordinator that runs a job fetches its input from the bucket (another one
    received the upload) while the bucket does not answer: the job waits for the bucket
    (dropped, then taken again), it does not fail (it failed INTERNAL)."""
    s3 = S3Server()
    bucket = s3.new_bucket()
    moto = urlsplit(s3.endpoint)
    try:
        async with TcpCut(moto.hostname or "127.0.0.1", moto.port or 80) as bucket_relay:

            def blobs(endpoint: str) -> S3BlobStore:
                return S3BlobStore(
                    f"s3://{bucket}/t",
                    endpoint_url=endpoint,
                    region="us-east-1",
                    access_key=S3_CREDENTIALS["aws_access_key_id"],
                    secret_key=S3_CREDENTIALS["aws_secret_access_key"],
                )

            receiver = InputSpool(tmp_path / "spool-a", shared=blobs(s3.endpoint))
            fetcher = InputSpool(
                tmp_path / "spool-b", shared=blobs(f"http://127.0.0.1:{bucket_relay.port}")
            )
            fast = {"steal_after_s": 0.2}
            offline = ScriptedProvider("p1", online=False)  # accepts, cannot start it
            a = await pair.manager(offline, spool=receiver, **fast)
            runner = ScriptedProvider("p1")
            bucket_relay.cut()
            await pair.manager(runner, spool=fetcher, **fast)  # steals the job, then fetches
            data = png(3)
            sha = hashlib.sha256(data).hexdigest()
            receiver.path_for(sha).parent.mkdir(parents=True, exist_ok=True)
            receiver.path_for(sha).write_bytes(data)
            job, _ = await within(
                a.submit(
                    owner="alice",
                    task=TaskKind.IMAGE_TO_IMAGE,
                    spec=ImageToImageSpec(positive_prompt="a cat"),
                    inputs=[InputRef("image", "in.png", sha, len(data), "image/png", 8, 8)],
                    ref_id="",
                    tag="",
                    reply_to="",
                )
            )
            async with asyncio.timeout(20):  # the fetch met the bucket away
                while not bucket_relay.refused:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            assert (await a.get(job.id, None)).state in (JobState.QUEUED, JobState.RUNNING)
            bucket_relay.restore()
            final = await within(final_job(a.subscribe(job.id), 20), 20)
            assert final.state is JobState.SUCCEEDED, final.error
            assert runner.runs  # run where the input was fetched, once the bucket answered
    finally:
        await asyncio.to_thread(s3.stop)


async def test_watch_jobs_elsewhere_sees_the_end_of_a_job_that_moved_during_an_outage(
    pair: Coordinators,
) -> None:
    """The WatchJobs feed on b (jobs held by a) loses the database while a's job ends: once
    it answers again, the feed reads what it missed (its reads and announcements failed)."""
    runner = ScriptedProvider("p1", gated)
    a = await pair.manager(runner)
    b = await pair.manager(_serves_nothing(), relayed=True)
    seen: list[JobEvent] = []
    remove = b.tap(lambda event, job: seen.append(event))
    job = await submit(a, pair.env)
    run = await runner.next_run()
    async with asyncio.timeout(10):  # the feed follows the job
        while not seen:
            await asyncio.sleep(0.05)
    pair.relay.cut()
    run.release.set()
    await within(final_job(a.subscribe(job.id)), 10)
    await asyncio.sleep(1.0)  # the feed's reads fail meanwhile
    pair.relay.restore()
    async with asyncio.timeout(15):
        while not any(isinstance(e.kind, Finished) for e in seen):
            await asyncio.sleep(0.05)
    remove()
    sequences = [e.sequence for e in seen]
    assert sequences == sorted(set(sequences))


def _ended(run: Run) -> asyncio.Future[Any]:
    return asyncio.ensure_future(run.done.wait())


async def _all(watch: StoreWatch) -> list[JobEvent]:
    return [e async for e in watch]
