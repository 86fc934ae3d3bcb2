"""SIGTERM under load loses no accepted job: a server process with a ComfyUI stand-in takes a
stream of synchronous and queued jobs, is told to stop in the middle, exits cleanly, and is
started again on the same data dir; every job a caller saw accepted then ends SUCCEEDED
(finished before the exit, or resumed/retried after the restart)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from pathlib import Path

import grpc
from imagetasks.v1 import (
    common_pb2,
    generation_service_pb2,
    generation_service_pb2_grpc,
    job_pb2,
    job_service_pb2_grpc,
    tasks_pb2,
)
from imagetasks.v1 import job_service_pb2 as jpb

from tests.support.comfy_standin import ComfyStandIn
from tests.support.images import encode, quadrant_image
from tests.support.server_process import ServerProcess

PNG = encode(quadrant_image(32, 24), "PNG")
CALLERS = 24


async def _submit(
    stub: generation_service_pb2_grpc.GenerationServiceStub, sync: bool, accepted: set[str]
) -> None:
    mode = common_pb2.RESPONSE_MODE_SYNC if sync else common_pb2.RESPONSE_MODE_ASYNC
    call = stub.ImageToImage(timeout=120)
    await call.write(
        generation_service_pb2.ImageToImageRequest(
            params=tasks_pb2.ImageToImageParams(
                positive_prompt="a lighthouse",
                steps=4,
                options=common_pb2.JobOptions(
                    mode=mode, delivery=common_pb2.OUTPUT_DELIVERY_REFERENCES
                ),
            )
        )
    )
    await call.write(
        generation_service_pb2.ImageToImageRequest(
            chunk=common_pb2.FileChunk(field="image", data=PNG)
        )
    )
    await call.done_writing()
    async for reply in call:
        if reply.event.WhichOneof("kind") == "accepted":
            accepted.add(reply.event.job)


async def test_sigterm_under_load_loses_no_accepted_job(tmp_path: Path) -> None:
    data = tmp_path / "data"
    accepted: set[str] = set()
    failures: list[str] = []
    async with ComfyStandIn(tmp_path / "comfy", step_delay_s=0.05) as comfy:
        env = {
            "AISERVER_AGENTS": f'[{{"url": "{comfy.url}", "max_concurrent_jobs": 2}}]',
            "AISERVER_SHUTDOWN_GRACE_S": "1",
            "AISERVER_AGENT_PROBE_INTERVAL_S": "1",
        }
        first = ServerProcess(data, env)
        await first.start()
        stop = asyncio.Event()
        try:
            async with grpc.aio.insecure_channel(first.target) as ch:
                stub = generation_service_pb2_grpc.GenerationServiceStub(ch)
                rng = random.Random(5)

                async def caller() -> None:
                    while not stop.is_set():
                        try:
                            await _submit(stub, rng.random() < 0.5, accepted)
                        except grpc.aio.AioRpcError as err:
                            if not stop.is_set():
                                failures.append(f"{err.code()}: {err.details()}")
                            return

                tasks = [asyncio.create_task(caller()) for _ in range(CALLERS)]
                async with asyncio.timeout(60):
                    while len(accepted) < 30:
                        await asyncio.sleep(0.05)
                stop.set()
                code = await first.stop()  # SIGTERM
                assert code == 0, "\n".join(first.lines[-20:])
                async with asyncio.timeout(30):
                    await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await first.kill()
        assert not failures, failures[:5]
        assert any("shutting down" in line for line in first.lines)
        accepted_count = len(accepted)

        second = ServerProcess(data, env)
        async with second, grpc.aio.insecure_channel(second.target) as ch:
            jobs = job_service_pb2_grpc.JobServiceStub(ch)
            final: dict[str, int] = {}
            async with asyncio.timeout(90):
                while len(final) < len(accepted):
                    for name in sorted(accepted - set(final)):
                        job = (await jobs.GetJob(jpb.GetJobRequest(name=name))).job
                        if job.state in (
                            job_pb2.Job.STATE_SUCCEEDED,
                            job_pb2.Job.STATE_FAILED,
                            job_pb2.Job.STATE_CANCELLED,
                        ):
                            final[name] = job.state
                    await asyncio.sleep(0.2)
            not_succeeded = {n: s for n, s in final.items() if s != job_pb2.Job.STATE_SUCCEEDED}
            assert not not_succeeded, not_succeeded
        recovered = [
            int(m.group(1))
            for e in second.logs()
            if (m := re.search(r"(\d+) unfinished jobs recovered", e["message"]))
        ]
        assert recovered and recovered[0] > 0  # the restart had work left to do
        print(
            f"\n{accepted_count} jobs accepted before SIGTERM; {recovered[0]} unfinished at exit,"
            " resumed after the restart; all SUCCEEDED"
        )
        with contextlib.suppress(Exception):
            await second.stop()
