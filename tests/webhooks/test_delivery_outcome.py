"""Each webhook delivery's outcome is kept on the job: GetJob and the shim's JSON show it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import httpx
from imagetasks.v1 import common_pb2, job_pb2, job_service_pb2, job_service_pb2_grpc, tasks_pb2

from aiserver.gateway import Gateway, GatewaySettings
from aiserver.webhooks import DeliveryOutcome, DeliveryStatus, webhook_record
from tests.support.generation import comfy_service, generate
from tests.support.images import encode, quadrant_image
from tests.webhooks.receiver import Receiver

PNG = encode(quadrant_image(16, 16), "PNG")


async def _webhook_of(ch: grpc.aio.Channel, name: str) -> job_pb2.WebhookDelivery:
    stub = job_service_pb2_grpc.JobServiceStub(ch)
    async with asyncio.timeout(30):
        while True:
            job = (await stub.GetJob(job_service_pb2.GetJobRequest(name=name))).job
            if job.HasField("webhook"):
                return job.webhook
            await asyncio.sleep(0.05)


async def _run(tmp_path: Path, receiver: Receiver) -> tuple[job_pb2.WebhookDelivery, Any]:
    async with comfy_service(tmp_path, webhook_allow_hosts=("127.0.0.1",)) as (service, _):
        settings = GatewaySettings.from_settings(service.settings, spool_dir=tmp_path)
        gw = Gateway(f"127.0.0.1:{service.grpc_port}", host="127.0.0.1", port=0, settings=settings)
        await gw.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch:
                params = tasks_pb2.ImageUpscaleParams(
                    options=common_pb2.JobOptions(reply_to=receiver.url)
                )
                got = await generate(ch, "ImageUpscale", params, {"image": PNG})
                name = got.final.name
                webhook = await _webhook_of(ch, name)
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
                shim = (await http.get(f"/v1/{name}")).json()
        finally:
            await gw.stop()
    return webhook, shim


async def test_a_delivered_webhook_is_recorded(tmp_path: Path) -> None:
    async with Receiver(200) as receiver:
        webhook, shim = await _run(tmp_path, receiver)
    assert webhook.state == job_pb2.WebhookDelivery.STATE_DELIVERED
    assert (webhook.attempts, webhook.last_http_status, webhook.last_error) == (1, 200, "")
    assert webhook.end_time.seconds > 0
    assert shim["job"]["webhook"]["state"] == "STATE_DELIVERED"
    assert shim["job"]["webhook"]["lastHttpStatus"] == 200


async def test_a_refused_answer_is_recorded(tmp_path: Path) -> None:
    async with Receiver(410) as receiver:  # a final answer: no retry
        webhook, shim = await _run(tmp_path, receiver)
    assert webhook.state == job_pb2.WebhookDelivery.STATE_FAILED
    assert (webhook.attempts, webhook.last_http_status, webhook.last_error) == (1, 410, "HTTP 410")
    assert shim["job"]["webhook"]["lastError"] == "HTTP 410"


def test_outcomes_map_to_records() -> None:
    refused = DeliveryOutcome(
        "j", "m", "", DeliveryStatus.REFUSED, 1, None, "address 10.0.0.7 is not public"
    )
    record = webhook_record(refused)
    assert (record.state, record.attempts, record.http_status) == ("REFUSED", 1, None)
    assert record.error == "address 10.0.0.7 is not public"
    delivered = DeliveryOutcome("j", "m", "h", DeliveryStatus.DELIVERED, 2, 204, "HTTP 204")
    assert webhook_record(delivered).error == ""
