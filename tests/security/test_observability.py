"""Prometheus metrics, and logs that carry request and job ids but never a secret."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import httpx
import pytest
from imagetasks.v1 import common_pb2, job_service_pb2_grpc, tasks_pb2
from imagetasks.v1 import job_service_pb2 as jpb
from prometheus_client.parser import text_string_to_metric_families

from tests.security.conftest import (
    API_KEYS,
    KEYS,
    PNG,
    auth,
    bearer,
    channel_to,
    http_base,
    keyed_service,
    upscale,
)
from tests.support.comfy_standin import ComfyStandIn
from tests.support.generation import generate
from tests.support.server_process import ServerProcess
from tests.webhooks.receiver import Receiver


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_jobs_bytes_agents_and_refusals(tmp_path: Path) -> None:
    async with (
        keyed_service(tmp_path, metrics_port=0) as (service, _),
        channel_to(service) as ch,
        httpx.AsyncClient(base_url=http_base(service), timeout=30) as http,
    ):
        got = await upscale(ch, "alice")
        jobs = job_service_pb2_grpc.JobServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError):
            await jobs.ListJobs(
                jpb.ListJobsRequest(), metadata=(("authorization", "Bearer wrong-0123456789ab"),)
            )
        with pytest.raises(grpc.aio.AioRpcError):
            await jobs.GetJob(jpb.GetJobRequest(name="jobs/nope"), metadata=bearer("alice"))
        # The public port wants an admin key; the metrics port answers anyone (bind it privately).
        for headers, status, reason in (
            ({}, 401, "API_KEY_MISSING"),
            ({"Authorization": "Bearer not-a-key-0123456789"}, 401, "API_KEY_INVALID"),
            (auth("alice"), 403, "ADMIN_ONLY"),
        ):
            res = await http.get("/metrics", headers=headers)
            assert res.status_code == status
            assert res.json()["responseStatus"]["errorCode"] == reason
        res = await http.get("/metrics", headers=auth("ops"))
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
        own = await http.get(f"http://127.0.0.1:{service.metrics_port}/metrics")
        assert own.status_code == 200
        for text in (res.text, own.text):
            found = samples(text)
            upscale_job = {"task": "ImageUpscale"}
            assert (
                value(found, "aiserver_jobs_finished_total", state="SUCCEEDED", **upscale_job) == 1
            )
            assert (
                value(
                    found,
                    "aiserver_job_duration_seconds_count",
                    provider=got.final.provider,
                    **upscale_job,
                )
                == 1
            )
            assert value(found, "aiserver_job_queue_wait_seconds_count", **upscale_job) == 1
            assert value(found, "aiserver_jobs", state="QUEUED", **upscale_job) == 0
            assert ("aiserver_queue_depth", ()) in found
            assert value(found, "aiserver_agent_up", agent="gpu-0", kind="comfyui") == 1
            assert value(found, "aiserver_agent_capacity", agent="gpu-0") == 1
            method = "GenerationService/ImageUpscale"
            assert value(found, "aiserver_received_bytes_total", method=method) > len(PNG)
            assert value(found, "aiserver_sent_bytes_total", method=method) > len(
                got.output_bytes(0)
            )
            assert value(found, "aiserver_rejected_requests_total", reason="API_KEY_INVALID") == 1
            assert value(found, "aiserver_rejected_requests_total", reason="JOB_NOT_FOUND") == 1
            assert value(found, "aiserver_rpcs_total", method=method, code="OK") == 1
            assert (
                value(
                    found,
                    "aiserver_rpcs_total",
                    method="JobService/ListJobs",
                    code="UNAUTHENTICATED",
                )
                == 1
            )


async def test_metrics_are_open_in_open_mode_and_can_be_turned_off(tmp_path: Path) -> None:
    async with (
        keyed_service(tmp_path, api_keys="") as (service, _),
        httpx.AsyncClient(base_url=http_base(service), timeout=30) as http,
    ):
        assert (await http.get("/metrics")).status_code == 200
    async with (
        keyed_service(tmp_path / "off", http_metrics=False) as (service, _),
        httpx.AsyncClient(base_url=http_base(service), timeout=30) as http,
    ):
        res = await http.get("/metrics", headers=auth("ops"))
        assert res.status_code == 404


SECRETS = {
    **{f"api key {k}": v for k, v in KEYS.items()},
    "presented wrong key": "wrong-but-secret-looking-key-42",
    "webhook secret": "whsec-very-secret-0123456789",
    "signing secret": "url-signing-secret-0123456789",
    "old signing secret": "old-url-signing-secret-0123456789",
}


async def test_logs_carry_ids_and_never_a_secret(tmp_path: Path) -> None:
    """A real server process at DEBUG, JSON logs: every kind of call with keys, a wrong key,
    signed URLs and a signed webhook; then its whole stderr is searched."""
    async with (
        ComfyStandIn(tmp_path / "comfy") as comfy,
        Receiver() as hook,
        ServerProcess(
            tmp_path / "data",
            {
                "AISERVER_API_KEYS": API_KEYS,
                "AISERVER_LOG_LEVEL": "DEBUG",
                "AISERVER_AGENTS": comfy.url,
                "AISERVER_WEBHOOK_SECRET": SECRETS["webhook secret"],
                "AISERVER_WEBHOOK_ALLOW_PRIVATE": "true",
                "AISERVER_ARTIFACT_ACCESS": "signed",
                "AISERVER_URL_SIGNING_SECRETS": ",".join(
                    (SECRETS["signing secret"], SECRETS["old signing secret"])
                ),
            },
        ) as server,
    ):
        async with grpc.aio.insecure_channel(server.target) as ch:
            params = tasks_pb2.ImageUpscaleParams(options=common_pb2.JobOptions(reply_to=hook.url))
            got = await generate(
                ch,
                "ImageUpscale",
                params,
                {"image": PNG},
                metadata=(*bearer("alice"), ("x-request-id", "req-logs-1")),
            )
            job_id = got.final.name.removeprefix("jobs/")
            with pytest.raises(grpc.aio.AioRpcError):
                await job_service_pb2_grpc.JobServiceStub(ch).ListJobs(
                    jpb.ListJobsRequest(),
                    metadata=(("authorization", f"Bearer {SECRETS['presented wrong key']}"),),
                )
        async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as http:
            res = await http.get("/v1/jobs", headers={**auth("bob"), "X-Request-Id": "req-http-7"})
            assert res.status_code == 200
            res = await http.get(
                "/v1/jobs", headers={"Authorization": f"Bearer {SECRETS['presented wrong key']}"}
            )
            assert res.status_code == 401
            res = await http.post(
                "/api/ConvertImage",
                files={"image": ("a.png", PNG)},
                data={"OutputFormat": "webp"},
                headers=auth("ops"),
            )
            assert res.status_code == 200
            res = await http.get(got.final.outputs[0].url)  # signed, no key
            assert res.status_code == 200
            assert (await http.get("/metrics", headers=auth("ops"))).status_code == 200
        async with asyncio.timeout(30):
            while not hook.requests:
                await asyncio.sleep(0.05)
        assert "webhook-signature" in hook.requests[0].headers
        assert await server.stop() == 0
    text = "\n".join(server.lines)
    for what, secret in SECRETS.items():
        assert secret not in text, f"the {what} was logged"
    assert "Bearer" not in text and "authorization" not in text.lower()
    logs = server.logs()
    assert len(logs) > 20 and all({"time", "level", "logger", "request_id"} <= set(e) for e in logs)
    assert any(e["request_id"] == "req-logs-1" for e in logs)
    assert any(e["request_id"] == "req-http-7" for e in logs)
    about_job = [e for e in logs if e.get("job_id") == job_id]
    assert about_job, "no log line names the job"
    assert any(e["logger"].startswith("aiserver.providers") for e in about_job)
