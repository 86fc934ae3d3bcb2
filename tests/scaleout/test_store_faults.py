"""Coordinators as real processes while their PostgreSQL or their S3 bucket goes away for a
few seconds (a restart as the coordinators see it: every connection dropped, new ones
refused), through a relay the test cuts (tests/support/tcp_cut.py)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from imagetasks.v1 import job_pb2

from tests.scaleout.cluster import LEASE_S, Cluster, get_job, list_all, submit, watch_to_the_end
from tests.storage.backends import PG_URL, S3Server
from tests.support.tcp_cut import TcpCut

LONG_LEASE_S = 8.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SUCCEEDED = job_pb2.Job.STATE_SUCCEEDED
ENDED = {SUCCEEDED, job_pb2.Job.STATE_FAILED}


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


async def _health(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return int(reply.status)


async def _probe_health(targets: list[str], into: set[tuple[str, int]]) -> None:
    while True:
        for target in targets:
            with contextlib.suppress(grpc.aio.AioRpcError):
                into.add((target, await _health(target)))
        await asyncio.sleep(0.1)


@pytest.mark.parametrize(
    ("fault", "past_lease"),
    [("cut", False), ("cut", True), ("blackhole", True)],
    ids=["within-lease", "past-lease", "blackholed-past-lease"],
)
async def test_a_database_outage_loses_no_job_and_answers_unavailable(
    tmp_path: Path, fault: str, past_lease: bool
) -> None:
    """``cut``: a restart (connections reset, new ones refused). ``blackhole``: packets
    dropped (nothing answers, nothing is refused): only the coordinators' own bounds
    (``AISERVER_DATABASE_TIMEOUT_S``) end their waits."""
    db = urlsplit(PG_URL)
    async with TcpCut(db.hostname or "127.0.0.1", db.port or 5432) as relay:
        url = PG_URL.replace(f"{db.hostname}:{db.port}", f"127.0.0.1:{relay.port}")
        async with Cluster(
            tmp_path,
            coordinators=2,
            agents=2,
            max_jobs=2,
            step_delay_s=0.1,
            env={
                "AISERVER_DATABASE_URL": url,
                "AISERVER_DATABASE_TIMEOUT_S": "1",
                # Within the lease: a restart as production sees it (a few seconds of a
                # 30 s lease), scaled down.
                "AISERVER_JOB_LEASE_S": str(LEASE_S if past_lease else LONG_LEASE_S),
            },
        ) as c:
            targets = [s.target for s in c.servers]
            names = [await submit(targets[i % 2], i, steps=20) for i in range(12)]
            watchers = [
                asyncio.create_task(watch_to_the_end(targets[i % 2 :] + targets[: i % 2], n))
                for i, n in enumerate(names)
            ]
            async with asyncio.timeout(30):  # mid-run: prompts on the agents
                while sum((await c.standins.stats())["posted"].values()) < 4:
                    await asyncio.sleep(0.05)

            getattr(relay, fault)()
            # A restart as production sees it (lease 30 s) is within the lease; past it, every
            # held job's lease lapses while its holder lives.
            outage_s = LEASE_S + 1.5 if past_lease else LONG_LEASE_S / 2
            ends = time.monotonic() + outage_s
            answers: list[tuple[grpc.StatusCode, str, float]] = []
            health: set[tuple[str, int]] = set()
            probing = asyncio.create_task(_probe_health(targets, health))
            calls = 0
            while time.monotonic() < ends - 1:
                for target in targets:
                    # Read one job, list, submit one: each touches the store.
                    kind = calls % 3
                    calls += 1
                    began = time.monotonic()
                    try:
                        if kind == 0:
                            await get_job(target, names[0])
                        elif kind == 1:
                            await list_all(target)
                        else:
                            await submit(target, 1000 + calls)
                    except grpc.aio.AioRpcError as error:
                        answers.append((error.code(), _reason(error), time.monotonic() - began))
                await asyncio.sleep(0.5)
            await asyncio.sleep(max(0.0, ends - time.monotonic()))
            probing.cancel()
            relay.restore()
            if past_lease:  # (the health loop's period and bound need more than 2 s)
                # Out of rotation while the database is away, back once it answers.
                assert {(t, NOT_SERVING) for t in targets} <= health, health
            async with asyncio.timeout(20):
                while {await _health(t) for t in targets} != {SERVING}:
                    await asyncio.sleep(0.2)

            # Meanwhile: a clear, quick UNAVAILABLE, never INTERNAL nor a held caller.
            assert answers, "every call succeeded while the database was unreachable"
            assert {code for code, _, _ in answers} == {grpc.StatusCode.UNAVAILABLE}, answers
            assert {reason for _, reason, _ in answers} == {"STORE_UNAVAILABLE"}, answers
            assert max(took for _, _, took in answers) < 5, answers

            results = await asyncio.gather(*watchers)
            assert all(r.kinds[-1] == "finished" for r in results)
            jobs = {j.name: j for j in await list_all(targets[1])}
            assert sorted(jobs) == sorted(names)  # none lost
            # What each watcher was told is what the database says (no end announced that
            # was not stored, then reached otherwise by a taker).
            told = {n: r.events[-1].finished.job.state for n, r in zip(names, results, strict=True)}
            assert told == {n: j.state for n, j in jobs.items()}
            unfinished = {n: j.state for n, j in jobs.items() if j.state not in ENDED}
            assert not unfinished, unfinished
            more = [await submit(t, 100 + i, steps=2) for i, t in enumerate(targets)]
            after = await asyncio.gather(*(watch_to_the_end(targets, n) for n in more))
            if past_lease:
                # The taker re-attached under the live coordinator's websocket client id, which
                # silenced the live one's socket on that agent (ComfyUI keeps one socket per
                # id): the live one notices and re-opens it, so its jobs still succeed.
                assert all(got.kinds[-1] == "finished" for got in after)
            assert {j.state for j in jobs.values()} == {SUCCEEDED}, {
                n: str(j.error)[:200] for n, j in jobs.items() if j.state != SUCCEEDED
            }
            # Within the lease, each job's prompt was queued once: its holder waited for the
            # database to store what the prompt gave (it was dropped, and its taker queued
            # the prompt again when the images had gone to the dropped run). Past the lease
            # that is still so (known limit, reported, not asserted).
            posted = (await c.standins.stats())["posted"]
            twice = {label: n for label, n in posted.items() if n > 1}
            if not past_lease:
                assert not twice, twice
            # Both coordinators work again: each accepts and finishes a new job.
            assert {got.events[-1].finished.job.state for got in after} == {SUCCEEDED}


async def test_the_bucket_away_for_seconds_loses_no_job(tmp_path: Path) -> None:
    s3 = S3Server()
    moto = urlsplit(s3.endpoint)
    async with TcpCut(moto.hostname or "127.0.0.1", moto.port or 80) as relay:
        cluster = Cluster(
            tmp_path,
            coordinators=2,
            agents=2,
            max_jobs=2,
            step_delay_s=0.1,
            env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{relay.port}"},
            s3=s3,  # the services reach it through the relay only
        )
        async with cluster as c:
            targets = [s.target for s in c.servers]
            names = [await submit(targets[i % 2], i, steps=20) for i in range(8)]
            watchers = [asyncio.create_task(watch_to_the_end(targets, n)) for n in names]
            async with asyncio.timeout(30):  # inputs fetched, prompts on the agents
                while sum((await c.standins.stats())["posted"].values()) < 4:
                    await asyncio.sleep(0.05)
            relay.cut()  # outputs' puts and inputs' fetches meet a dead endpoint
            await asyncio.sleep(LEASE_S - 1)
            relay.restore()
            results = await asyncio.gather(*watchers)
            jobs = {j.name: j for j in await list_all(targets[0])}
            assert sorted(jobs) == sorted(names)
            told = {n: r.events[-1].finished.job.state for n, r in zip(names, results, strict=True)}
            assert told == {n: j.state for n, j in jobs.items()}
            assert {j.state for j in jobs.values()} == {SUCCEEDED}, {
                n: str(j.error)[:200] for n, j in jobs.items() if j.state != SUCCEEDED
            }


async def test_a_coordinator_frozen_past_its_lease_hands_its_jobs_over(tmp_path: Path) -> None:
    async with Cluster(tmp_path, coordinators=2, agents=2, max_jobs=2, step_delay_s=0.1) as c:
        targets = [s.target for s in c.servers]
        names = [await submit(targets[0], i, steps=20) for i in range(6)]
        watchers = [asyncio.create_task(watch_to_the_end(targets[::-1], n)) for n in names]
        async with asyncio.timeout(30):
            while sum((await c.standins.stats())["posted"].values()) < 3:
                await asyncio.sleep(0.05)
        frozen = c.servers[0].proc
        assert frozen is not None
        frozen.send_signal(signal.SIGSTOP)  # its event loop stalls: no renewal, no write
        try:
            await asyncio.sleep(LEASE_S + 2)
        finally:
            frozen.send_signal(signal.SIGCONT)  # it wakes up believing it holds them
        results = await asyncio.gather(*watchers)
        taken = [e for e in c.servers[1].logs() if "taken over" in str(e.get("message", ""))]
        assert taken, "the live coordinator took the frozen one's jobs"
        jobs = {j.name: j for j in await list_all(targets[1])}
        assert sorted(jobs) == sorted(names)
        told = {n: r.events[-1].finished.job.state for n, r in zip(names, results, strict=True)}
        assert told == {n: j.state for n, j in jobs.items()}  # the woken one overwrote nothing
        assert {j.state for j in jobs.values()} <= ENDED
        # Known limit (as past the lease above): the taker re-attached under the frozen
        # coordinator's websocket client id; a failure is UNAVAILABLE (retryable).
        assert {j.error.code for j in jobs.values() if j.state != SUCCEEDED} <= {14}
