"""Several ``aiserver serve`` processes on one PostgreSQL schema and one S3 bucket (moto's
server), with ComfyUI stand-ins in a process of their own, and the gRPC calls the tests make.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from imagetasks.v1 import common_pb2, job_pb2, job_service_pb2_grpc, tasks_pb2
from imagetasks.v1 import job_service_pb2 as jpb

from bench.standin_proc import StandIns
from tests.storage.backends import PG_URL, S3_CREDENTIALS, S3Server
from tests.support.generation import Collected, generate
from tests.support.images import encode, quadrant_image
from tests.support.server_process import ServerProcess

KSAMPLER_STEPS = 4
LEASE_S = 3.0


class Cluster:
    """``coordinators`` services sharing ``agents`` stand-ins, each running ``max_jobs`` prompts
    at once with ``queue_ahead`` more waiting in its own queue (the service's default is 1)."""

    def __init__(
        self,
        root: Path,
        *,
        coordinators: int,
        agents: int = 2,
        max_jobs: int = 4,
        queue_ahead: int = 1,
        step_delay_s: float = 0.0,
        env: dict[str, str] | None = None,
        s3: S3Server | None = None,
    ) -> None:
        self.root = root
        self.count = coordinators
        self.schema = f"t_{uuid.uuid4().hex[:16]}"
        self.standins = StandIns(agents, root / "agents", step_delay_s=step_delay_s)
        self.max_jobs = max_jobs
        self.extra_env = env or {}
        self.queue_ahead = queue_ahead
        self.s3: S3Server | None = s3
        """Given: the tests reach it through a relay of their own (``env``); stopped at exit."""
        self.bucket = ""
        self.servers: list[ServerProcess] = []

    def env(self) -> dict[str, str]:
        assert self.s3 is not None
        agents = [
            {
                "url": url,
                "name": f"agent{i}",
                "max_concurrent_jobs": self.max_jobs,
                "queue_ahead": self.queue_ahead,
            }
            for i, url in enumerate(self.standins.urls)
        ]
        return {
            "AISERVER_DATABASE_URL": PG_URL,
            "AISERVER_DATABASE_SCHEMA": self.schema,
            "AISERVER_BLOB_URL": f"s3://{self.bucket}/artifacts",
            "AISERVER_JOB_LEASE_S": str(LEASE_S),
            "AISERVER_DATABASE_TIMEOUT_S": str(LEASE_S / 3),  # the most a lease this short allows
            "AISERVER_AGENTS": json.dumps(agents),
            "AISERVER_AGENT_PROBE_INTERVAL_S": "1",
            # The per-key limit counts across every coordinator (the database's count): the
            # 300 jobs of the full run are all submitted before most have finished.
            "AISERVER_MAX_ACTIVE_JOBS_PER_KEY": "1000",
            "AWS_ENDPOINT_URL": self.s3.endpoint,
            "AWS_ACCESS_KEY_ID": S3_CREDENTIALS["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": S3_CREDENTIALS["aws_secret_access_key"],
            "AWS_REGION": "us-east-1",
            **self.extra_env,
        }

    async def __aenter__(self) -> Cluster:
        self.s3 = self.s3 or S3Server()
        self.bucket = self.s3.new_bucket()
        await self.standins.__aenter__()
        for i in range(self.count):
            server = ServerProcess(self.root / f"c{i}", self.env())
            self.servers.append(server)
            await server.start()
        return self

    async def restart(self, index: int) -> None:
        await self.servers[index].start()

    async def __aexit__(self, *exc: object) -> None:
        for server in self.servers:
            await server.__aexit__()
        await self.standins.__aexit__()
        if self.s3 is not None:
            await asyncio.to_thread(self.s3.stop)
        conn = await asyncpg.connect(PG_URL)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")
        finally:
            await conn.close()


async def submit(target: str, seed: int, *, steps: int = KSAMPLER_STEPS) -> str:
    """An ImageToImage job, RESPONSE_MODE_ASYNC; its name (``jobs/...``)."""
    params = tasks_pb2.ImageToImageParams(
        positive_prompt=f"job {seed}",
        steps=steps,
        options=common_pb2.JobOptions(mode=common_pb2.RESPONSE_MODE_ASYNC, ref_id=f"r{seed}"),
    )
    png = encode(quadrant_image(16 + seed % 32, 16 + seed // 32 % 32), "PNG")
    async with grpc.aio.insecure_channel(target) as channel:
        got = await generate(channel, "ImageToImage", params, {"image": png})
    assert got.kinds == ["accepted"], got.kinds
    return str(got.events[0].job)


async def watch(target: str, name: str, timeout_s: float = 120) -> list[Any]:
    """Every event of ``WatchJob`` until the stream ends."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        call = stub.WatchJob(jpb.WatchJobRequest(name=name), timeout=timeout_s)
        return [reply.event async for reply in call]


async def watch_to_the_end(targets: list[str], name: str, timeout_s: float = 180) -> Collected:
    """Watch on the first target; when its process goes away, watch again on the next one
    (what a client behind a balancer does). The events of the last watch that ended."""
    got = Collected()
    async with asyncio.timeout(timeout_s):
        attempt = 0
        while True:
            target = targets[attempt % len(targets)]
            attempt += 1
            try:
                got.events = await watch(target, name, timeout_s)
            except grpc.aio.AioRpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise
                await asyncio.sleep(0.2)
                continue
            if got.events and got.kinds[-1] == "finished":
                return got
            await asyncio.sleep(0.2)  # the stream ended without finished: watch again


async def cancel(target: str, name: str) -> job_pb2.Job:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        reply = await stub.CancelJob(jpb.CancelJobRequest(name=name), timeout=60)
        return reply.job


async def get_job(target: str, name: str) -> job_pb2.Job:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        reply = await stub.GetJob(jpb.GetJobRequest(name=name), timeout=60)
        return reply.job


async def watch_jobs(target: str, into: list[job_pb2.Job]) -> None:
    """``WatchJobs`` until cancelled: each reply's job is appended to ``into``."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        async for reply in stub.WatchJobs(jpb.WatchJobsRequest()):
            into.append(reply.job)


def job_id(name: str) -> str:
    """The job id in a job's resource name (``jobs/{id}``): the label the stand-ins count by."""
    return name.removeprefix("jobs/")


async def until_job(target: str, name: str, timeout_s: float = 30, **fields: int) -> None:
    """Until GetJob on ``target`` shows these field values."""
    async with asyncio.timeout(timeout_s):
        while True:
            job = await get_job(target, name)
            if all(getattr(job, k) == v for k, v in fields.items()):
                return
            await asyncio.sleep(0.1)


async def list_all(target: str) -> list[job_pb2.Job]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        jobs: list[job_pb2.Job] = []
        token = ""
        while True:
            reply = await stub.ListJobs(
                jpb.ListJobsRequest(page_size=100, page_token=token), timeout=60
            )
            jobs.extend(reply.jobs)
            token = reply.next_page_token
            if not token:
                return jobs


def full_mode() -> bool:
    """``AISERVER_SCALEOUT_FULL=1``: the issue's full figures (300 jobs), not CI's short run."""
    return os.environ.get("AISERVER_SCALEOUT_FULL", "") == "1"
