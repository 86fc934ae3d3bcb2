"""Retention deletes old outputs and the references to them, never those of running jobs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from imagetasks.v1 import artifact_service_pb2 as apb
from imagetasks.v1 import artifact_service_pb2_grpc, job_service_pb2_grpc, tasks_pb2
from imagetasks.v1 import job_service_pb2 as jpb

from aiserver.retention import Retention, RetentionPolicy
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
