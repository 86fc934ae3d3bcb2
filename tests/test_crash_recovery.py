"""SIGKILL with jobs queued and running; after a restart every job reaches a terminal state.

The agent keeps one job queued ahead (the default ``queue_ahead=1``): at the kill one job runs
on it, one waits in its queue and one in the service's."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
from pathlib import Path

import grpc
from imagetasks.v1 import common_pb2, job_pb2, job_service_pb2_grpc, tasks_pb2
from imagetasks.v1 import job_service_pb2 as jpb

from tests.support.comfy_standin import ComfyStandIn
from tests.support.generation import generate
from tests.support.images import encode, quadrant_image
from tests.support.process import server_process
from tests.support.prompt_marks import repeated

KSAMPLER = "7"  # in workflows/image_to_image.json


async def list_jobs(target: str) -> list[job_pb2.Job]:
    async with grpc.aio.insecure_channel(target) as ch:
        reply = await job_service_pb2_grpc.JobServiceStub(ch).ListJobs(jpb.ListJobsRequest())
        return list(reply.jobs)


async def test_jobs_survive_sigkill_and_the_running_one_is_reattached(tmp_path: Path) -> None:
    async with ComfyStandIn(tmp_path / "comfy", step_delay_s=0.01) as comfy:
        comfy.hold_after_step(KSAMPLER, 1)
        env = {"AISERVER_AGENTS": comfy.url, "AISERVER_AGENT_PROBE_INTERVAL_S": "0.5"}
        data = tmp_path / "data"
        async with server_process(data, env) as server:
            async with grpc.aio.insecure_channel(server.target) as ch:
                for i in range(3):
                    params = tasks_pb2.ImageToImageParams(
                        positive_prompt=f"job {i}",
                        steps=2,
                        options=common_pb2.JobOptions(
                            mode=common_pb2.RESPONSE_MODE_ASYNC, ref_id=f"crash-{i}"
                        ),
                    )
                    png = encode(quadrant_image(32 + i, 32), "PNG")
                    got = await generate(ch, "ImageToImage", params, {"image": png})
                    assert got.kinds == ["accepted"]
            async with asyncio.timeout(30):
                # The first job is on the agent, held; the second waits in the agent's queue.
                while comfy.running_prompt is None or len(comfy.pending_prompts) != 1:
                    await asyncio.sleep(0.02)
            states = {j.ref_id: j.state for j in await list_jobs(server.target)}
            assert states["crash-0"] == states["crash-1"] == job_pb2.Job.STATE_RUNNING
            assert states["crash-2"] == job_pb2.Job.STATE_QUEUED
            server.proc.send_signal(signal.SIGKILL)
            await server.proc.wait()

        queued = [body["prompt_id"] for body in comfy.received.prompts]
        comfy.release(KSAMPLER)  # the agent runs both prompts while no server is up
        async with asyncio.timeout(30):
            while not all(comfy.history(pid) for pid in queued):
                await asyncio.sleep(0.02)
        async with server_process(data, env) as server:
            async with asyncio.timeout(60):
                while True:
                    jobs = await list_jobs(server.target)
                    if all(j.state == job_pb2.Job.STATE_SUCCEEDED for j in jobs):
                        break
                    assert not any(j.state == job_pb2.Job.STATE_FAILED for j in jobs), jobs
                    await asyncio.sleep(0.1)
        assert len(jobs) == 3 and all(j.outputs for j in jobs)
        # Re-attached, not re-run: each job's prompt was queued once. The two that ended while
        # no server watched sent their images to a closed socket (nothing is written to the
        # agent's disk): each was queued again once, for its frames, naming the prompt it
        # repeats; the third job was queued after the restart.
        prompts = comfy.received.prompts
        repeats = [repeated(body["prompt"]) for body in prompts if repeated(body["prompt"])]
        assert sorted(repeats) == sorted(queued)
        assert len(prompts) == 5
        assert not list((tmp_path / "comfy" / "temp").iterdir())
        assert not list((tmp_path / "comfy" / "output").iterdir())


async def test_a_small_input_goes_with_its_job_and_survives_sigkill(tmp_path: Path) -> None:
    # The embedded store keeps a small input in the job's own create: no spool file, and an
    # ASYNC job accepted before a crash still runs after the restart, from the stored bytes.
    data = tmp_path / "data"
    png = encode(quadrant_image(24, 24), "PNG")
    down = {"AISERVER_AGENTS": "http://127.0.0.1:9", "AISERVER_AGENT_PROBE_INTERVAL_S": "0.5"}
    async with server_process(data, down) as server:
        async with grpc.aio.insecure_channel(server.target) as ch:
            params = tasks_pb2.ImageToImageParams(
                positive_prompt="kept",
                steps=1,
                options=common_pb2.JobOptions(mode=common_pb2.RESPONSE_MODE_ASYNC, ref_id="small"),
            )
            got = await generate(ch, "ImageToImage", params, {"image": png})
            assert got.kinds == ["accepted"]
        server.proc.send_signal(signal.SIGKILL)
        await server.proc.wait()
    spooled = [p for p in (data / "spool").rglob("*") if p.is_file()]
    assert spooled == []  # no file for it, not even a partial one
    with contextlib.closing(sqlite3.connect(data / "jobs.db")) as db:
        assert db.execute("SELECT data FROM job_input_bytes").fetchall() == [(png,)]

    async with ComfyStandIn(tmp_path / "comfy") as comfy:
        env = {"AISERVER_AGENTS": comfy.url, "AISERVER_AGENT_PROBE_INTERVAL_S": "0.5"}
        async with server_process(data, env) as server:
            async with asyncio.timeout(60):
                while True:
                    (job,) = await list_jobs(server.target)
                    if job.state == job_pb2.Job.STATE_SUCCEEDED:
                        break
                    assert job.state != job_pb2.Job.STATE_FAILED, job
                    await asyncio.sleep(0.1)
        assert [u.data for u in comfy.received.uploads] == [png]  # the bytes it was given
    with contextlib.closing(sqlite3.connect(data / "jobs.db")) as db:
        assert db.execute("SELECT count(*) FROM job_input_bytes").fetchone() == (0,)  # ended
