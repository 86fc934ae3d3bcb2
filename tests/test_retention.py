"""Retention deletes old outputs and the references to them, never those of running jobs."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import cast

import grpc
import pytest
from imagetasks.v1 import artifact_service_pb2 as apb
from imagetasks.v1 import artifact_service_pb2_grpc, job_service_pb2_grpc, tasks_pb2
from imagetasks.v1 import job_service_pb2 as jpb

from aiserver.artifacts import ArtifactStore
from aiserver.jobs.manager import JobManager
from aiserver.retention import ROLE, Retention, RetentionPolicy
from tests.storage.backends import JobStoreBackend
from tests.support.artifacts import put_ref
from tests.support.generation import comfy_service, generate
from tests.support.images import encode, quadrant_image


async def test_sweep_deletes_artifacts_and_the_job_references(tmp_path: Path) -> None:
    async with comfy_service(tmp_path) as (service, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch:
            params = tasks_pb2.ImageUpscaleParams()
            png = encode(quadrant_image(), "PNG")
            got = await generate(ch, "ImageUpscale", params, {"image": png})
            job_name = got.final.name
            artifact = got.final.outputs[0].name
            assert service.manager is not None and service.job_store is not None

            keep_all = Retention(
                RetentionPolicy(max_age_s=3600, max_total_bytes=None, interval_s=60, fresh_s=0.0),
                service.artifacts,
                service.job_store,
                service.manager,
            )
            assert await keep_all.sweep() == []

            cap = Retention(
                RetentionPolicy(max_age_s=None, max_total_bytes=1, interval_s=60, fresh_s=0.0),
                service.artifacts,
                service.job_store,
                service.manager,
            )
            assert await cap.sweep() == [artifact]

            jobs = job_service_pb2_grpc.JobServiceStub(ch)
            job = (await jobs.GetJob(jpb.GetJobRequest(name=job_name))).job
            assert list(job.outputs) == []  # no dangling reference
            reader = artifact_service_pb2_grpc.ArtifactServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in reader.ReadArtifact(apb.ReadArtifactRequest(name=artifact)):
                    pass
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_outputs_of_unfinished_jobs_are_protected(tmp_path: Path) -> None:
    async with comfy_service(tmp_path) as (service, _):
        assert service.manager is not None and service.job_store is not None
        ref = await put_ref(
            service,
            b"\x89PNG fake but stored",
            job_id="01JOB",
            width=1,
            height=1,
            file_name="x.png",
        )
        in_use = {ref.name}
        service.manager.artifacts_in_use = lambda: in_use  # type: ignore[method-assign]
        cap = Retention(
            RetentionPolicy(max_age_s=0.0, max_total_bytes=None, interval_s=60, fresh_s=0.0),
            service.artifacts,
            service.job_store,
            service.manager,
        )
        assert await cap.sweep() == []
        in_use.clear()
        assert await cap.sweep() == [ref.name]


async def test_the_service_sweep_keeps_a_fresh_output_whatever_the_cap(tmp_path: Path) -> None:
    # A put writes its bytes after its row, and another coordinator's output is in no job
    # record until its job's save: the service's sweep keeps every blob younger than
    # max(SWEEP_FRESH_S, two job leases), even under a cap of one byte.
    async with comfy_service(
        tmp_path, artifact_max_total_bytes=1, retention_interval_s=3600.0, job_lease_s=40.0
    ) as (service, _):
        assert service.retention is not None and service.manager is not None
        assert service.retention.policy.fresh_s == 80.0
        ref = await put_ref(
            service,
            b"\x89PNG an output whose job is not saved yet",
            job_id="01OTHER",
            width=1,
            height=1,
            file_name="x.png",
        )
        assert await service.retention.sweep() == []
        stale = Retention(
            replace(service.retention.policy, fresh_s=0.0),
            service.artifacts,
            service.job_store,
            service.manager,
        )
        assert await stale.sweep() == [ref.name]


class _NothingToSweep:
    """The artifact store and manager as the leader sees them with nothing stored: the
    test is about who leads, not what is swept."""

    def artifacts_in_use(self) -> set[str]:
        return set()

    async def sweep(self, *args: object, **kwargs: object) -> list[str]:
        return []


async def test_a_stopped_leader_gives_up_the_lead(tmp_path: Path) -> None:
    """Two coordinators on one PostgreSQL store: the retention leader that stops resigns,
    so the other takes the lead at its next ask, not once the lease (30 s or more) lapsed."""
    backend = JobStoreBackend("postgres", tmp_path)
    try:
        a, b = await backend.open(), await backend.open()
        nothing = _NothingToSweep()
        policy = RetentionPolicy(max_age_s=3600, max_total_bytes=None, interval_s=0.05)
        leader = Retention(policy, cast(ArtifactStore, nothing), a, cast(JobManager, nothing))
        leader.start()
        for _ in range(100):
            if await backend.sql("SELECT holder FROM leaders WHERE role = 'retention'"):
                break
            await asyncio.sleep(0.02)
        assert not await b.lead(ROLE, "B", leader.lease_s)  # led by the running one
        await leader.stop()
        assert await b.lead(ROLE, "B", leader.lease_s)
    finally:
        await backend.close()
